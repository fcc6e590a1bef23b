# Learning-efficiency benchmark at GPT-2 small scale (124M), on 8 GPUs of one node:
#   python experiments.py configs/bench_efficiency_124m.py
# Six runs one after the other (baseline, LIME, LIME causal, LIME+1, shuffled control, baseline
# seed 2), each 5,000 iterations x 0.5M tokens = 2.5B tokens: hours per run on 8 H100-class GPUs.
# data_dir: a large corpus written by prepare.py with both tag kinds (full GPT-2 vocabulary), e.g.
#   python prepare.py --input <text files> --out_dir data/pretrain --ner binary --tags full,causal
mode = 'efficiency'
out_json = 'out-bench/bench_efficiency_124m.json'
device = 'cuda'
dtype = 'bfloat16'
compile = True
launcher = 'torchrun --standalone --nproc_per_node=8'
data_dir = 'data/pretrain'
build_data = False
eff_dir = 'out-bench-eff-124m'
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
