# Learning-efficiency benchmark, CPU preset: what LIME's honest gain is made of (docs/results.md).
#   python experiments.py configs/bench_efficiency_cpu.py
# Six arms x 3 seeds x 2 archs = 36 train.py runs on the same data and batches (seed i: the same
# initial weights and batches in every arm), each compared with the baseline on val documents:
#   baseline                no metadata
#   lime_causal             LIME with causal tags (from the past only: needs a tagger at inference)
#   lime1_predict           LIME+1 predicting its own next tags; val_nll = the exact marginal over them
#   predict_token_classes   the same with each token's majority tags as its "tags" (a lookup, no tagger)
#   predict_random_classes  the same with those classes moved to other tokens at random (same sizes)
#   aux_loss                the tag heads' loss alone, the tags adding nothing to the input
# About 100 min on 2 cores (two one-thread runs at a time). data/nltk_mix_4k is built on first use:
# NLTK's Gutenberg, Brown, webtext, State of the Union and inaugural corpora, split by document
# (63 val documents of all five sources; 5.5M train tokens), full + causal tags, binary NER.
# Vocabulary: GPT-2's first 4096 ranks (a valid BPE): with the full 50257-way output layer a model
# this small would spend most of its time in the softmax.
mode = 'efficiency'
out_json = 'out-bench/bench_efficiency_cpu.json'
device = 'cpu'
dtype = 'float32'
compile = False
data_dir = 'data/nltk_mix_4k'
data_input = 'nltk_mix'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-eff-cpu'
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes,predict_random_classes,aux_loss'
eff_seeds = 3
eff_archs = 'gpt2,gemma'
eff_parallel = 2  # two one-thread runs at a time use 2 cores better than one two-thread run
train_threads = 1
n_layer = 4
n_head = 4
n_kv_head = 2  # gemma: the 4 query heads share 2 key/value heads (gpt2 ignores it)
n_embd = 128
block_size = 128
batch_size = 8  # 1,024 tokens per iteration
max_iters = 1200  # 1.23M tokens per run
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
# evaluation: 24 fixed val windows (3,072 targets) shared out between the val documents; the exact
# marginal of a self-predicting run costs about 200 teacher-forced evaluations, so this keeps every
# run's evaluations under a quarter of its wall time (docs/results.md, the tightness table)
eval_interval = 200
eval_iters = 3
marginal_k = 8  # the tightness table in docs/results.md: 0.06 nats above the exact marginal at 6x a teacher-forced evaluation
