# CPU demo: a tiny LIME model (POS + NER embeddings) on data/gutenberg (python prepare.py), 2 cores, < 10 min.
# python train.py configs/cpu_demo.py
# Same steps and batches for the other arms of the comparison:
#   python train.py configs/cpu_demo_baseline.py   (no metadata)
#   python train.py configs/cpu_demo_lime1.py      (LIME+1: tags of the next token)
#   python train.py configs/cpu_demo_predict.py    (LIME+1 predicting the next tags itself)
# tokens/iteration = 16 * 64 = 1,024; 600 iters ~ 0.6M tokens (the train split is ~2M tokens).
# The 50257-way output layer dominates the cost at this size, so the model is narrow and the window short.
out_dir = 'out-cpu-demo-lime'
data_dir = 'data/gutenberg'
metadata = 'pos,ner'
meta_shift = 0
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
