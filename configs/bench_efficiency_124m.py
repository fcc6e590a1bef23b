# Learning-efficiency benchmark at GPT-2 small scale (124M), on 8 GPUs of one node: what LIME's
# honest gain is made of (the CPU preset's comparison, configs/bench_efficiency_cpu.py, at 124M):
#   python experiments.py configs/bench_efficiency_124m.py
# Six runs one after the other, each 5,000 iterations x 0.5M tokens = 2.5B tokens, hours per run on
# 8 H100-class GPUs, compared with the baseline on val documents (paired, same initial weights and batches):
#   baseline                no metadata
#   lime_causal             LIME with causal tags (from the past only: needs a tagger at inference)
#   lime1_predict           LIME+1 predicting its own next tags; val_nll = the exact marginal over them
#                           at the last evaluation (about 200 teacher-forced evaluations' cost)
#   predict_token_classes   the same with each token's majority tags as its "tags" (a lookup, no tagger)
#   predict_random_classes  the same with those classes moved to other tokens at random (same sizes)
#   aux_loss                the tag heads' loss alone, the tags adding nothing to the input
# One seed per arm: more with --eff_seeds=N (N times the runs; standard errors over seeds and documents).
# The paper's arms, which read the future (no val_nll): add them with --eff_runs=...,lime,lime1.
# data_dir: a large corpus written by prepare.py with both tag kinds (full GPT-2 vocabulary), e.g.
#   python prepare.py --input <text files> --out_dir data/pretrain --ner binary --tags full,causal
mode = 'efficiency'
out_json = 'out-bench/bench_efficiency_124m.json'
device = 'cuda'
dtype = 'bfloat16'
compile = True
launcher = 'torchrun --standalone --nproc_per_node=8'
data_dir = 'data/pretrain'
data_input = ''  # data_dir is prepared by hand (above), not built from the nltk_mix corpus
build_data = False
eff_dir = 'out-bench-eff-124m'
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes,predict_random_classes,aux_loss'
eff_seeds = 1  # more with --eff_seeds
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40  # global; 5 per GPU on 8 GPUs
max_iters = 5000
warmup_iters = 200
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 250
eval_iters = 50
