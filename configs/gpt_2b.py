# ~2.0B-parameter GPT (30 layers, d=2304): the paper's 2B scale.
# LIME on causal tags by default (pos_causal,ner_causal: each token's tags computed from the tokens
# up to it, shift 0). The arms of "what LIME's honest gain is made of" (experiments.py's ARMS) share
# everything but these flags, one arm a line `#   <arm>: <flags>` (shell syntax, added after this config;
# tests/test_common.py checks that each line gives its arm):
#   baseline:               --metadata='' --out_dir=out-gpt-2b-baseline
#   lime_causal:            # this config's default (out_dir out-gpt-2b-lime-causal)
#   lime1_predict:          --meta_predict=True --out_dir=out-gpt-2b-lime1-predict
#   predict_token_classes:  --meta_predict=True --meta_classes=token --out_dir=out-gpt-2b-predict-token-classes
#   predict_random_classes: --meta_predict=True --meta_classes=random --out_dir=out-gpt-2b-predict-random-classes
#   aux_loss:               --meta_predict=True --meta_weight=0.0 --out_dir=out-gpt-2b-aux-loss
#   lime:                   --metadata=pos,ner --out_dir=out-gpt-2b-lime  # reads the future
#   lime1:                  --metadata=pos,ner --meta_shift=1 --out_dir=out-gpt-2b-lime1  # reads the future
# lime1_predict: LIME+1 predicting its own next tags (val_nll: the exact marginal over them at the last
# evaluation, about 200 teacher-forced evaluations' cost; a top-k bound before). Its controls: each token's
# majority tags (a lookup), those classes moved to random tokens, the tag loss alone (no tags in).
# lime (the paper's full tags) and lime1 (the paper's oracle LIME+1) read the next words: no val_nll.
# data_dir: prepare.py --ner binary (the 6 NER tags below) --tags full,causal (full: lime, lime1 only)
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gpt_2b.py
# parameters: 2,029,321,728 (meta device); +124,416 with the 48 POS + 6 NER tag tables (0.0061%);
# the self-predicting arms (tag tables, next-tag tables, tag heads): +377,856 (0.019%)
# tokens/iteration = 4 batch * 256 accum * 1024 block = 1,048,576 (1M); 40,000 iters ~ 42B tokens.
out_dir = 'out-gpt-2b-lime-causal'
data_dir = 'data/pretrain'
metadata = 'pos_causal,ner_causal'
meta_shift = 0
n_layer = 30
n_head = 18
n_embd = 2304
block_size = 1024
batch_size = 4
gradient_accumulation_steps = 256
max_iters = 40000
lr_decay_iters = 40000
warmup_iters = 1000
learning_rate = 2e-4
min_lr = 2e-5
eval_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
