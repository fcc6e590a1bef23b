# ~540M-parameter GPT (24 layers, d=1280): the paper's 500M scale. LIME by default (POS + NER, shift 0).
# The three arms of the paper's comparison share everything but the metadata flags:
#   baseline: --metadata=''   LIME: (default)   LIME+1: --meta_shift=1 --out_dir=out-gpt-500m-lime1
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/gpt_500m.py
# tokens/iteration = 8 batch * 64 accum * 1024 block = 524,288; 40,000 iters ~ 21B tokens.
out_dir = 'out-gpt-500m-lime'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
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
