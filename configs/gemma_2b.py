# Gemma-style 2B (arch='gemma'): the paper's 2B scale on the paper's kind of model. Gemma 1 2B's shape
# exactly (18 layers, d=2048, 8 query heads of 256 sharing one key/value head, GeGLU 16384), with
# GPT-2's vocabulary (50257) and a 1024-token window instead of Gemma's 256k and 8192.
# LIME by default (POS + NER, shift 0); the three arms share everything but the metadata flags:
#   baseline: --metadata='' --out_dir=out-gemma-2b-baseline
#   LIME:     (default)
#   LIME+1:   --meta_shift=1 --out_dir=out-gemma-2b-lime1
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gemma_2b.py
# parameters: 2,084,810,752 (meta device); +110,592 with the 48 POS + 6 NER tag tables (0.0053%)
# tokens/iteration = 4 batch * 256 accum * 1024 block = 1,048,576 (1M); 40,000 iters ~ 42B tokens.
# memory per GPU under DDP (computed, see README): 42.7 GiB for fp32 weights, gradients, AdamW
# moments, DDP's gradient buckets and autocast's bf16 weight copies (22 B/param), + 13.9 GiB saved
# activations for 4 x 1024 tokens, + ~0.8 GiB logits gradient: ~57.5 GiB, fits an 80 GB H100
# (batch_size=8 would need ~72 GiB: too close).
out_dir = 'out-gemma-2b-lime'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
meta_shift = 0
arch = 'gemma'
n_layer = 18
n_head = 8
n_kv_head = 1
n_embd = 2048
mlp_hidden = 16384
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
