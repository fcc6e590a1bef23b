# CPU demo, LIME+1 arm (position t sees the POS/NER tags of token t+1): otherwise identical to configs/cpu_demo.py.
# python train.py configs/cpu_demo_lime1.py
# tokens/iteration = 16 * 64 = 1,024; 600 iters ~ 0.6M tokens (the train split is ~2M tokens).
# The 50257-way output layer dominates the cost at this size, so the model is narrow and the window short.
out_dir = 'out-cpu-demo-lime1'
data_dir = 'data/gutenberg'
metadata = 'pos,ner'
meta_shift = 1
device = 'cpu'
dtype = 'float32'
compile = False
n_layer = 4
n_head = 4
n_embd = 64
block_size = 64
batch_size = 16
dropout = 0.0
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
learning_rate = 4e-3
min_lr = 4e-4
eval_interval = 100
eval_iters = 10  # 160 fixed val windows = 10,240 target tokens
log_interval = 50
