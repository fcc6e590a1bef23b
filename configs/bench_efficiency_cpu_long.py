# The efficiency preset's main arms trained five times longer (issue: which way the gain moves as
# training goes on): 6.1M tokens per run, one seed, GPT-2 arch, evaluated every 0.6M tokens.
#   python experiments.py configs/bench_efficiency_cpu_long.py [--eff_seeds=2: a second seed, the first reused]
# Every evaluation's snapshot is kept (ckpt_{iter}.pt), so BLiMP can be read against training tokens
# (harness.py --tasks=blimp --ckpt=...). About 70 min on 2 cores (two one-thread runs at a time).
include('bench_efficiency_cpu.py')
out_json = 'out-bench/bench_efficiency_cpu_long.json'
eff_dir = 'out-bench-eff-cpu-long'
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes'
eff_seeds = 1
eff_archs = 'gpt2'
batch_size = 16  # 2,048 tokens per iteration
max_iters = 3000  # 6.14M tokens per run (1.1 passes over the 5.5M train tokens)
warmup_iters = 60
eval_interval = 300
eval_iters = 3  # 48 fixed val windows (6,144 targets)
keep_checkpoints = 10
# BLiMP of every arm (the first 100 pairs of each paradigm: 6,700 pairs) and of the baseline's snapshots
blimp = True
blimp_limit = 100
blimp_snapshots = 'baseline'
