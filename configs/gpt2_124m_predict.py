# GPT-2 small (124M) + LIME+1 without an oracle (meta_predict): position t reads token t's causal
# tags; after block 6 a tag head per stream predicts token t+1's tags, which are embedded and added for
# the upper blocks. An honest language model: val_nll is its NLL with the next tags summed out (the
# exact marginal over 48 x 6 tag combinations at the last evaluation, about 200 teacher-forced
# evaluations' cost; a top-k bound, marginal_k, before). Same data, steps and batches as
# gpt2_124m_baseline.py. Arms, one a line `#   <arm>: <flags>` (see gpt2_124m_baseline.py): this
# config, and the three controls that say what its gain is made of:
#   lime1_predict:          # this config's default (out_dir out-gpt2-124m-lime1-predict)
#   predict_token_classes:  --meta_classes=token --out_dir=out-gpt2-124m-predict-token-classes
#   predict_random_classes: --meta_classes=random --out_dir=out-gpt2-124m-predict-random-classes
#   aux_loss:               --meta_weight=0.0 --out_dir=out-gpt2-124m-aux-loss
# predict_token_classes: each token's majority tags in the train split (a lookup, no tagger);
# predict_random_classes: those classes moved to other tokens at random (same class sizes, no meaning);
# aux_loss: the tag heads' loss alone, the tags adding nothing to the input.
# parameters: +125,952 over the baseline (tag tables, next-tag tables, tag heads: 0.10%)
# 8 GPUs on one node: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_predict.py
# tokens/iteration = 491,520 (~0.5M), as the baseline
include('gpt2_124m_baseline.py')  # its settings first, then this file's (common.exec_config)
out_dir = 'out-gpt2-124m-lime1-predict'
metadata = 'pos_causal,ner_causal'
meta_shift = 0
meta_predict = True
