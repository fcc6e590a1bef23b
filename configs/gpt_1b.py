# ~1.0B-parameter GPT (24 layers, d=1792): the paper's 1B scale. LIME by default (POS + NER, shift 0).
#   baseline: --metadata=''   LIME: (default)   LIME+1: --meta_shift=1 --out_dir=out-gpt-1b-lime1
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gpt_1b.py
# tokens/iteration = 8 batch * 128 accum * 1024 block = 1,048,576 (1M); 40,000 iters ~ 42B tokens.
out_dir = 'out-gpt-1b-lime'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
meta_shift = 0
n_layer = 24
n_head = 14
n_embd = 1792
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
