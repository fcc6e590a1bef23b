# The one-command demo (README's quickstart): python experiments.py configs/quickstart.py
# Builds the CPU corpus if it is missing (NLTK's Gutenberg, Brown, webtext, State of the Union and
# inaugural corpora, split by document; binary NER: works offline with the NLTK data present), trains
# four small models on the same data, seed, batches and steps, and shows what LIME bought against the
# baseline: a table, out-quickstart/curves.png and BLiMP. About 10 minutes on 2 cores (2 more to build the data).
#   baseline        no metadata
#   lime            LIME with full tags (the paper's setting; full tags read the next words)
#   lime_causal     LIME with causal tags (computed from the past only)
#   lime1_predict   LIME+1 predicting the next token's tags itself (an honest language model)
# One seed, one arch: the comparison that counts seeds and controls is configs/bench_efficiency_cpu.py.
include('bench_efficiency_cpu.py')  # its settings first, then this file's (common.exec_config)
out_json = 'out-quickstart/quickstart.json'
eff_dir = 'out-quickstart'
eff_runs = 'baseline,lime,lime_causal,lime1_predict'
eff_seeds = 1
eff_archs = 'gpt2'
max_iters = 600  # 0.6M tokens per run
eval_interval = 100
# BLiMP's first 20 pairs of each paradigm (1,340 pairs) for every run: models this small and this
# early are at chance on it (docs/results.md#blimp), so it shows the scoring, not a difference
blimp = True
blimp_limit = 20
