# Learning-efficiency benchmark, CPU preset (2 cores, about 30 min, see README):
#   python experiments.py configs/bench_efficiency_cpu.py
# Eight train.py runs on the same data, seed, batches and steps: baseline, LIME (pos,ner), LIME with
# causal tags, LIME+1, LIME+1 predicting its own next tags, shuffled-metadata control, a second
# baseline seed (run-to-run noise), and the baseline on GPT-2's own tokenization (compared by bpb).
# Vocabulary: GPT-2's first 4096 ranks (prepare.py --tokenizer gpt2-4096, a valid BPE): with the
# full 50257-way output layer a model this small would spend most of its time in the softmax.
# data/gutenberg_4k is built on first use (NLTK Gutenberg, full + causal tags).
# The Gemma-style model on the same runs (4 layers, d=128, 4 query / 2 key-value heads, GeGLU 512):
#   python experiments.py configs/bench_efficiency_cpu.py --arch=gemma --eff_dir=out-bench-eff-cpu-gemma
mode = 'efficiency'
out_json = 'out-bench/bench_efficiency_cpu.json'
device = 'cpu'
dtype = 'float32'
compile = False
data_dir = 'data/gutenberg_4k'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-eff-cpu'
eff_parallel = 2  # two one-thread runs at a time use 2 cores better than one two-thread run
train_threads = 1
n_layer = 4
n_head = 4
n_kv_head = 2  # --arch=gemma only: the 4 query heads share 2 key/value heads (gpt2 ignores it)
n_embd = 128
block_size = 128
batch_size = 8  # 1,024 tokens per iteration
max_iters = 1200  # 1.23M tokens per run (half an epoch of the 2.49M-token train split)
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 100
eval_iters = 16  # 128 fixed val windows = 16,384 target tokens
