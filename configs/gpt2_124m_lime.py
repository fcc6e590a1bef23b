# GPT-2 small (124M) + LIME: POS and NER metadata embeddings added to the token embeddings
# (position t sees the tags of token t). Same data, steps and batches as gpt2_124m_baseline.py.
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime.py
# tokens/iteration = 491,520 (~0.5M), as the baseline
include('gpt2_124m_baseline.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-gpt2-124m-lime'
metadata = 'pos,ner'
meta_shift = 0
