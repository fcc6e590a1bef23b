# BLiMP where it lifts off (issue 24), on one GPU: on 2 CPU cores the 4-layer baseline's BLiMP rose
# from chance after 6M tokens to 0.548 at 12.3M (docs/results.md "BLiMP"), short of the 0.58 at which
# a comparison of the arms says much, and a comparison there costs hours of CPU. This preset trains
# the honest arms long enough for a small model to learn some grammar and scores every run on BLiMP:
#   python experiments.py configs/experiments_blimp_gpu.py [--blimp_dir=DIR]
# baseline, LIME with causal tags, LIME+1 predicting its own next tags, and its lookup control, 3 seeds
# each (12 runs, GPT-2 arch, 4 at a time on the one GPU), 6 layers x 384 (12.3M parameters with the
# 4096 vocabulary), 19.7M tokens per run (3.6 passes over data/nltk_mix_4k's 5.5M train tokens);
# BLiMP: the first 100 pairs of each paradigm (6,700 pairs; blimp_limit=0 scores all), self-predicting runs
# by their exact marginal (all 288 tag combinations at every position: the CPU's top-8 bound is not
# needed on a GPU), and the baseline's snapshots (BLiMP against tokens).
# The GPU check's third command (after bench.py configs/bench_gpu_check.py and experiments.py
# configs/experiments_gpu_check.py). Not yet measured on a GPU: estimated 10 min on one H100. A command stopped by a time limit
# continues when run again: finished runs and BLiMP scores are reused (eff_reuse).
# BLiMP needs --blimp_dir=DIR where ../shared/blimp/data is not beside the repository.
mode = 'efficiency'
out_json = 'out-bench/experiments_blimp_gpu.json'
device = 'cuda'
dtype = 'bfloat16'
compile = False  # 12 short runs: compiling each would cost more than it saves
data_dir = 'data/nltk_mix_4k'
data_input = 'nltk_mix'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-blimp-gpu'
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes'
eff_seeds = 3
eff_archs = 'gpt2'
eff_parallel = 4  # training processes at once on the one GPU
train_threads = 4  # OMP_NUM_THREADS of each: 4 x 4 = 16 cores
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.1  # 3.6 passes over the data: at 2.2 passes the CPU run's train loss was 0.5 below its val loss
batch_size = 32  # 8,192 tokens per iteration
max_iters = 2400  # 19.7M tokens per run
warmup_iters = 60
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 400
eval_iters = 4  # 128 fixed val windows
marginal_k = 16
keep_checkpoints = 7  # every evaluation's snapshot: BLiMP against tokens (blimp_snapshots)
blimp = True
blimp_limit = 100
blimp_marginal_k = 0  # exact
blimp_snapshots = 'baseline'
