# GPT-2 small (124M) + LIME+1, the paper's oracle look-ahead variant: position t sees the (full) POS/NER
# tags of token t+1, the token it predicts. It reads the future (the true next token's tags, and full
# tags look ahead further): no val_nll, its val_loss not comparable with the baseline's; LIME+1 without
# the oracle is gpt2_124m_predict.py. Same data, steps and batches as gpt2_124m_baseline.py.
# Arms, one a line `#   <arm>: <flags>` (see gpt2_124m_baseline.py):
#   lime1:  # this config (out_dir out-gpt2-124m-lime1): reads the future
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime1.py
# tokens/iteration = 491,520 (~0.5M), as the baseline
include('gpt2_124m_baseline.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-gpt2-124m-lime1'
metadata = 'pos,ner'
meta_shift = 1
