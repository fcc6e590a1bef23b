# Downstream CPU experiment (issue 13): cloze and arithmetic accuracy per model and tag policy.
#   python experiments.py configs/bench_downstream_cpu.py
# Trains baseline, LIME (causal tags), LIME+1 (full tags, metadata dropout 0.1 so that unhinted
# positions, <unk>, are in distribution) and LIME+1 with self-predicted tags (one seed each)
# on NLTK's Gutenberg books plus 40,000 generated arithmetic problems (lm-eval's format; none is a
# test problem), then scores each with harness.py's offline tasks (tasks/lime, built on first use).
# Sized for <= 30 minutes on 2 idle cores (two one-thread runs at a time).
include('bench_efficiency_cpu.py')  # its settings first, then this file's (common.exec_config)
mode = 'downstream'
out_json = 'out-bench/bench_downstream_cpu.json'
data_dir = 'data/gutenberg_arith_4k'
data_input = ''  # NLTK's Gutenberg books (plus the problems): not the efficiency preset's nltk_mix, whose
# Brown, webtext, State of the Union and inaugural documents are where lime_cloze's passages come from
eff_dir = 'out-bench-ds-cpu'
ds_task_dir = 'tasks/lime'
ds_arith_problems = 40000
lime1_meta_dropout = 0.1
max_iters = 1200  # 1.23M tokens per run, as the efficiency preset
eval_interval = 250
