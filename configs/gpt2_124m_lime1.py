# GPT-2 small (124M) + LIME+1: position t sees the POS/NER tags of token t+1 (the token it predicts),
# the paper's look-ahead variant. Same data, steps and batches as gpt2_124m_baseline.py.
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime1.py
# tokens/iteration = 491,520 (~0.5M), as the baseline
include('gpt2_124m_baseline.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-gpt2-124m-lime1'
metadata = 'pos,ner'
meta_shift = 1
