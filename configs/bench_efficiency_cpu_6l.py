# The efficiency preset at a second model size (issue: which way the gain moves as the output
# layer's bottleneck eases): 6 layers, d=256 (5.7M parameters against 1.3M), the same data, tokens,
# schedule and six arms, one seed, GPT-2 arch.
#   python experiments.py configs/bench_efficiency_cpu_6l.py
include('bench_efficiency_cpu.py')
out_json = 'out-bench/bench_efficiency_cpu_6l.json'
eff_dir = 'out-bench-eff-cpu-6l'
eff_seeds = 1
eff_archs = 'gpt2'
n_layer = 6
n_head = 4  # head size 64
n_embd = 256
# BLiMP of every arm (the first 100 pairs of each paradigm: 6,700 pairs; measured for the four main arms)
blimp = True
blimp_limit = 100
