# ~540M-parameter GPT (24 layers, d=1280): the paper's 500M scale.
# LIME on causal tags by default (pos_causal,ner_causal: each token's tags computed from the tokens
# up to it, shift 0). The arms of "what LIME's honest gain is made of" (experiments.py's ARMS) share
# everything but these flags, one arm a line `#   <arm>: <flags>` (shell syntax, added after this config;
# tests/test_common.py checks that each line gives its arm):
#   baseline:               --metadata='' --out_dir=out-gpt-500m-baseline
#   lime_causal:            # this config's default (out_dir out-gpt-500m-lime-causal)
#   lime1_predict:          --meta_predict=True --out_dir=out-gpt-500m-lime1-predict
#   predict_token_classes:  --meta_predict=True --meta_classes=token --out_dir=out-gpt-500m-predict-token-classes
#   predict_random_classes: --meta_predict=True --meta_classes=random --out_dir=out-gpt-500m-predict-random-classes
#   aux_loss:               --meta_predict=True --meta_weight=0.0 --out_dir=out-gpt-500m-aux-loss
#   lime:                   --metadata=pos,ner --out_dir=out-gpt-500m-lime  # reads the future
#   lime1:                  --metadata=pos,ner --meta_shift=1 --out_dir=out-gpt-500m-lime1  # reads the future
# lime1_predict: LIME+1 predicting its own next tags (val_nll: the exact marginal over them at the last
# evaluation, about 200 teacher-forced evaluations' cost; a top-k bound before). Its controls: each token's
# majority tags (a lookup), those classes moved to random tokens, the tag loss alone (no tags in).
# lime (the paper's full tags) and lime1 (the paper's oracle LIME+1) read the next words: no val_nll.
# data_dir: prepare.py --ner binary (the 6 NER tags below) --tags full,causal (full: lime, lime1 only)
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gpt_500m.py
# parameters: 537,561,600 (meta device); +69,120 with the 48 POS + 6 NER tag tables (0.013%);
# the self-predicting arms (tag tables, next-tag tables, tag heads): +209,920 (0.039%)
# tokens/iteration = 8 batch * 64 accum * 1024 block = 524,288; 40,000 iters ~ 21B tokens.
out_dir = 'out-gpt-500m-lime-causal'
data_dir = 'data/pretrain'
metadata = 'pos_causal,ner_causal'
meta_shift = 0
n_layer = 24
n_head = 20
n_embd = 1280
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 64
max_iters = 40000
lr_decay_iters = 40000
warmup_iters = 1000
learning_rate = 3e-4
min_lr = 3e-5
eval_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
