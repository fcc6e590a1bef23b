# One short GPU check of bench.py (< 8 min on one H200):
#   python bench.py configs/bench_gpu_check.py
# 1) throughput of baseline / LIME / LIME+1 at GPT-2 small scale (124M, 50257 vocab, block 1024),
#    bf16 autocast + torch.compile, random tokens (no dataset needed for this part);
# 2) a short efficiency run (every arm of eff_runs) on data/gutenberg_4k with a small model, eager;
# 3) steering on that run's LIME+1, self-predicting LIME+1 and baseline checkpoints.
# 4) one Gemma-style throughput row: LIME on arch='gemma' at the same size (12 layers, d=768, 12 query
#    heads sharing 4 key/value heads, GeGLU 3072, compiled, bf16): about a minute more (not yet measured).
# data/gutenberg_4k is built with prepare.py if missing (full + causal tags; takes a few minutes
# on 16 cores): carry a prebuilt copy to skip that.
# throughput: the 124M setup of bench_throughput_124m.py (cuda, bf16, compile), fewer steps
exec(open(__file__.replace('bench_gpu_check.py', 'bench_throughput_124m.py')).read())
mode = 'gpu_check'
out_json = 'out-bench/bench_gpu_check.json'
tp_data = 'random'
tp_warmup = 3
tp_steps = 10
tp_rounds = 3
gc_gemma_variants = 'lime'
n_kv_head = 4  # the gemma row only
# efficiency: train.py runs with the eff_* model below (the model keys above are for throughput)
data_dir = 'data/gutenberg_4k'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-gpu-check'
eff_reuse = False
eff_n_layer = 6
eff_n_head = 6
eff_n_embd = 384
eff_block_size = 256
eff_batch_size = 32
max_iters = 300
eval_interval = 50
eval_iters = 10
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
steer_windows = 128
steer_samples = 32
