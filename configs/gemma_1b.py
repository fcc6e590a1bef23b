# Gemma-style 1B (arch='gemma'): the paper's 1B scale. Gemma 1 2B's recipe (heads of 256, one shared
# key/value head, GeGLU 8 x d) at 16 layers and d=1536 (6 query heads), GPT-2's vocabulary, 1024-token window.
# LIME by default (POS + NER, shift 0); the three arms share everything but the metadata flags:
#   baseline: --metadata='' --out_dir=out-gemma-1b-baseline
#   LIME:     (default)
#   LIME+1:   --meta_shift=1 --out_dir=out-gemma-1b-lime1
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gemma_1b.py
# parameters: 1,071,295,488 (meta device); +82,944 with the 48 POS + 6 NER tag tables (0.0077%)
# tokens/iteration = 8 batch * 128 accum * 1024 block = 1,048,576 (1M); 40,000 iters ~ 42B tokens.
# memory per GPU under DDP (computed, see README): 22.0 GiB for fp32 weights, gradients, AdamW
# moments, DDP's gradient buckets and autocast's bf16 weight copies (22 B/param), + 19.1 GiB saved
# activations for 8 x 1024 tokens, + ~1.7 GiB logits gradient: ~42.7 GiB (an 80 GB H100 or a 48 GB card).
out_dir = 'out-gemma-1b-lime'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
meta_shift = 0
arch = 'gemma'
n_layer = 16
n_head = 6
n_kv_head = 1
n_embd = 1536
mlp_hidden = 12288
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 128
max_iters = 40000
lr_decay_iters = 40000
warmup_iters = 1000
learning_rate = 2.5e-4
min_lr = 2.5e-5
eval_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
