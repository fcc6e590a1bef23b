# GPT-2 small (124M) baseline: the reference arm of "what LIME's honest gain is made of", at a scale
# below the paper's smallest (500M) so the comparison is cheap to run. Its arms live in four configs,
# each documenting its own one a line, `#   <arm>: <flags>` (experiments.py's ARMS names; shell syntax,
# flags added after the config; tests/test_common.py checks that each line gives its arm):
#   baseline:  # this config (out_dir out-gpt2-124m-baseline)
# The other arms: gpt2_124m_lime.py (LIME on causal tags; the paper's full tags), gpt2_124m_predict.py
# (LIME+1 predicting its own next tags, and its three controls), gpt2_124m_lime1.py (the paper's oracle
# LIME+1). Only val_nll compares arms (docs/training.md); the paper's full-tag arms read the future.
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_baseline.py
# tokens/iteration = 12 batch * 40 accum * 1024 block = 491,520 (~0.5M); 20,000 iters ~ 9.8B tokens.
# data_dir: a large corpus written by prepare.py, both tag kinds (full: the paper's arms only), binary NER
# (6 tags; typed NER has 16, and the exact marginal of the self-predicting arms then sums 48 x 16
# combinations instead of 48 x 6), e.g.
#   python prepare.py --input <text files> --out_dir data/pretrain --ner binary --tags full,causal
out_dir = 'out-gpt2-124m-baseline'
data_dir = 'data/pretrain'
metadata = ''
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40  # global; divided across ranks (5 per GPU on 8 GPUs)
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 700
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 500
eval_iters = 50
log_interval = 10
weight_decay = 0.1
compile = True
