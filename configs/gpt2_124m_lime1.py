# GPT-2 small (124M) + LIME+1: position t sees the POS/NER tags of token t+1 (the token it predicts),
# the paper's look-ahead variant. Same data, steps and batches as gpt2_124m_baseline.py.
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime1.py
# tokens/iteration = 12 batch * 40 accum * 1024 block = 491,520 (~0.5M); 20,000 iters ~ 9.8B tokens.
# data_dir: a large corpus written by prepare.py, e.g. python prepare.py --input <text files> --out_dir data/pretrain
out_dir = 'out-gpt2-124m-lime1'
data_dir = 'data/pretrain'
metadata = 'pos,ner'
meta_shift = 1
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40  # global; divided across ranks (5 per GPU on 8 GPUs)
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 700
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 500
eval_iters = 50
log_interval = 10
weight_decay = 0.1
compile = True
