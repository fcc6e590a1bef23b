# GPT-2 small (124M) + LIME on causal tags: POS and NER metadata embeddings added to the token
# embeddings, position t seeing the tags of token t computed from tokens <= t (pos_causal,ner_causal),
# so its val_nll is an honest language model's. Same data, steps and batches as gpt2_124m_baseline.py.
# The paper's full tags are `--metadata=pos,ner`, which read the next words (NLTK's taggers look
# ahead): no val_nll, its val_loss not comparable with the baseline's. Arms, one a line
# `#   <arm>: <flags>` (see gpt2_124m_baseline.py):
#   lime_causal:  # this config's default (out_dir out-gpt2-124m-lime-causal)
#   lime:         --metadata=pos,ner --out_dir=out-gpt2-124m-lime  # the paper's full tags: reads the future
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime.py
# tokens/iteration = 491,520 (~0.5M), as the baseline
include('gpt2_124m_baseline.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-gpt2-124m-lime-causal'
metadata = 'pos_causal,ner_causal'
meta_shift = 0
