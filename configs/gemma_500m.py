# Gemma-style 500M (arch='gemma'): the paper's 500M scale (its 43.65% faster-adaptation figure).
# Gemma 1 2B's recipe (heads of 256, one shared key/value head, GeGLU 8 x d) at 16 layers and d=1024
# (4 query heads), GPT-2's vocabulary, 1024-token window.
# LIME by default (POS + NER, shift 0); the three arms share everything but the metadata flags:
#   baseline: --metadata='' --out_dir=out-gemma-500m-baseline
#   LIME:     (default)
#   LIME+1:   --meta_shift=1 --out_dir=out-gemma-500m-lime1
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gemma_500m.py
# parameters: 496,093,184 (meta device); +55,296 with the 48 POS + 6 NER tag tables (0.011%)
# tokens/iteration = 8 batch * 64 accum * 1024 block = 524,288; 40,000 iters ~ 21B tokens.
# memory per GPU under DDP (computed, see README): 10.2 GiB for fp32 weights, gradients, AdamW
# moments, DDP's gradient buckets and autocast's bf16 weight copies (22 B/param), + 13.3 GiB saved
# activations for 8 x 1024 tokens, + ~1.6 GiB logits gradient: ~25.1 GiB (fits a 40 GB A100).
out_dir = 'out-gemma-500m-lime'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
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
