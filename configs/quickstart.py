# The one-command demo (README's quickstart): python experiments.py configs/quickstart.py
# Builds the default corpus if it is missing (NLTK's Gutenberg, binary NER: works offline with the
# NLTK data present), trains four small models on the same data, seed, batches and steps, and shows
# what LIME bought against the baseline: a table and out-quickstart/curves.png. A few minutes on 2 cores.
#   baseline        no metadata
#   lime            LIME with full tags (the paper's setting; full tags read the next words)
#   lime_causal     LIME with causal tags (computed from the past only)
#   lime1_predict   LIME+1 predicting the next token's tags itself (an honest language model)
include('bench_efficiency_cpu.py')  # its settings first, then this file's (common.exec_config)
out_json = 'out-quickstart/quickstart.json'
eff_dir = 'out-quickstart'
eff_runs = 'baseline,lime,lime_causal,lime1_predict'
max_iters = 600  # 0.6M tokens per run
eval_interval = 50
marginal_positions = 0  # the bound-vs-marginal check is the efficiency bench's job
