# Gemma-style 500M (arch='gemma'): the paper's 500M scale (its 43.65% faster-adaptation figure).
# Gemma 1 2B's recipe (heads of 256, one shared key/value head, GeGLU 8 x d) at 16 layers and d=1024
# (4 query heads), GPT-2's vocabulary, 1024-token window.
# LIME on causal tags by default (pos_causal,ner_causal: each token's tags computed from the tokens
# up to it, shift 0). The arms of "what LIME's honest gain is made of" (experiments.py's ARMS) share
# everything but these flags, one arm a line `#   <arm>: <flags>` (shell syntax, added after this config;
# tests/test_common.py checks that each line gives its arm):
#   baseline:               --metadata='' --out_dir=out-gemma-500m-baseline
#   lime_causal:            # this config's default (out_dir out-gemma-500m-lime-causal)
#   lime1_predict:          --meta_predict=True --out_dir=out-gemma-500m-lime1-predict
#   predict_token_classes:  --meta_predict=True --meta_classes=token --out_dir=out-gemma-500m-predict-token-classes
#   predict_random_classes: --meta_predict=True --meta_classes=random --out_dir=out-gemma-500m-predict-random-classes
#   aux_loss:               --meta_predict=True --meta_weight=0.0 --out_dir=out-gemma-500m-aux-loss
#   lime:                   --metadata=pos,ner --out_dir=out-gemma-500m-lime  # reads the future
#   lime1:                  --metadata=pos,ner --meta_shift=1 --out_dir=out-gemma-500m-lime1  # reads the future
# lime1_predict: LIME+1 predicting its own next tags (val_nll: the exact marginal over them at the last
# evaluation, about 200 teacher-forced evaluations' cost; a top-k bound before). Its controls: each token's
# majority tags (a lookup), those classes moved to random tokens, the tag loss alone (no tags in).
# lime (the paper's full tags) and lime1 (the paper's oracle LIME+1) read the next words: no val_nll.
# data_dir: prepare.py --ner binary (the 6 NER tags below) --tags full,causal (full: lime, lime1 only)
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gemma_500m.py
# parameters: 496,093,184 (meta device); +55,296 with the 48 POS + 6 NER tag tables (0.011%)
# the self-predicting arms (tag tables, next-tag tables, tag heads): +167,936 (0.034%); their memory:
# as below plus under 1 GiB (estimated, not measured: the heads' activations, the exact marginal's
# buffers at evaluation)
# tokens/iteration = 8 batch * 64 accum * 1024 block = 524,288; 40,000 iters ~ 21B tokens.
# memory per GPU under DDP (computed, see README): 10.2 GiB for fp32 weights, gradients, AdamW
# moments, DDP's gradient buckets and autocast's bf16 weight copies (22 B/param), + 13.3 GiB saved
# activations for 8 x 1024 tokens, + ~1.6 GiB logits gradient: ~25.1 GiB (fits a 40 GB A100).
out_dir = 'out-gemma-500m-lime-causal'
data_dir = 'data/pretrain'
metadata = 'pos_causal,ner_causal'
meta_shift = 0
arch = 'gemma'
n_layer = 16
n_head = 4
n_kv_head = 1
n_embd = 1024
mlp_hidden = 8192
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
