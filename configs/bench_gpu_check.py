# One short GPU check, in two commands (together < 8 min on one H200), and a third where time allows:
#   python bench.py configs/bench_gpu_check.py                 # cost: this file
#   python experiments.py configs/experiments_gpu_check.py     # efficiency runs, then steering
#   python experiments.py configs/experiments_blimp_gpu.py     # BLiMP where it lifts off (longer runs)
# This file, the cost part:
# 1) throughput of baseline / LIME / LIME+1 at GPT-2 small scale (124M, 50257 vocab, block 1024),
#    bf16 autocast + torch.compile, random tokens (no dataset needed);
# 2) one Gemma-style throughput row: LIME on arch='gemma' at the same size (12 layers, d=768, 12 query
#    heads sharing 4 key/value heads, GeGLU 3072, compiled, bf16): about a minute more (not yet measured).
# throughput: the 124M setup of bench_throughput_124m.py (cuda, bf16, compile), fewer steps
include('bench_throughput_124m.py')
mode = 'gpu_check'
out_json = 'out-bench/bench_gpu_check.json'
tp_data = 'random'
tp_warmup = 3
tp_steps = 10
tp_rounds = 3
gc_gemma_variants = 'lime'
n_kv_head = 4  # the gemma row only
