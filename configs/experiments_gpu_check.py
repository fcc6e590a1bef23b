# One short GPU check, the experiments part (the cost part: python bench.py configs/bench_gpu_check.py):
#   python experiments.py configs/experiments_gpu_check.py
# 1) a short efficiency run (every arm of eff_runs) on data/gutenberg_4k with a small model, eager
#    (the runs are short: compiling each would cost more than it saves);
# 2) steering on that run's LIME+1, self-predicting LIME+1 and baseline checkpoints.
# data/gutenberg_4k is built with prepare.py if missing (full + causal tags; takes a few minutes
# on 16 cores): carry a prebuilt copy to skip that.
mode = 'gpu_check'
out_json = 'out-bench/experiments_gpu_check.json'
device = 'cuda'
dtype = 'bfloat16'
compile = False
data_dir = 'data/gutenberg_4k'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-gpu-check'
eff_reuse = False
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 32
max_iters = 300
eval_interval = 50
eval_iters = 10
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
steer_windows = 128
steer_samples = 32
