# Training throughput of baseline / LIME / LIME+1 at GPT-2 small scale on one GPU:
#   python bench.py configs/bench_throughput_124m.py
# Random tokens and tags (speed does not depend on the values); bf16 autocast and torch.compile.
mode = 'throughput'
out_json = 'out-bench/bench_throughput_124m.json'
device = 'cuda'
dtype = 'bfloat16'
compile = True
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 16
vocab_size = 50257
tp_warmup = 5
tp_steps = 20
tp_rounds = 5
