# One short GPU check, the experiments part (the cost part: python bench.py configs/bench_gpu_check.py):
#   python experiments.py configs/experiments_gpu_check.py
# 1) a short version of "what LIME's honest gain is made of" (the decomposition of
#    configs/bench_efficiency_cpu.py) on data/nltk_mix_4k with a small model, eager (the runs are
#    short: compiling each would cost more than it saves): the arms
#      baseline, lime_causal, lime1_predict (LIME+1 predicting its own next tags), its three controls
#      (predict_token_classes, predict_random_classes, aux_loss), and lime1 (the paper's oracle LIME+1,
#      which reads the future: for the steering part),
#    2 seeds x 2 archs (gpt2, gemma) x 7 arms = 28 runs of 300 iterations, 4 at a time on the one GPU
#    (tiny models leave it mostly idle; wall times are then shared-GPU times: costs are bench.py's);
#    with BLiMP for every run (the first 100 pairs of each paradigm, 6,700 pairs; self-predicting arms by
#    the top-8 bound of their marginal; BLiMP needs --blimp_dir=DIR where ../shared/blimp/data is not
#    beside the repository, e.g. a copy carried to the GPU machine as data/blimp);
# 2) steering on the lime1, lime1_predict and baseline checkpoints.
# Evaluation: 128 fixed val windows (4 x 32, 32,768 targets) shared out between the val documents: the
# exact marginal of a self-predicting run at its last evaluation costs about 200 teacher-forced
# evaluations (48 x 6 tag combinations), so keep eval_iters small.
# data/nltk_mix_4k is built if missing (NLTK's Gutenberg, Brown, webtext, State of the Union and
# inaugural corpora, split by document; full + causal tags, binary NER; a few minutes on 16 cores):
# carry a prebuilt copy to skip that. A few minutes on one H100 in all (estimated, not yet measured).
mode = 'gpu_check'
out_json = 'out-bench/experiments_gpu_check.json'
device = 'cuda'
dtype = 'bfloat16'
compile = False
data_dir = 'data/nltk_mix_4k'
data_input = 'nltk_mix'
data_tokenizer = 'gpt2-4096'
eff_dir = 'out-bench-gpu-check'
eff_reuse = False
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes,predict_random_classes,aux_loss,lime1'
eff_seeds = 2
eff_archs = 'gpt2,gemma'
eff_parallel = 4  # training processes at once on the one GPU
train_threads = 4  # OMP_NUM_THREADS of each: 4 x 4 = 16 cores
n_layer = 6
n_head = 6
n_kv_head = 2  # gemma: the 6 query heads share 2 key/value heads (gpt2 ignores it)
n_embd = 384
block_size = 256
batch_size = 32
max_iters = 300
eval_interval = 50
eval_iters = 4
marginal_k = 16  # evaluations before the last: the top-k bound of the marginal
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
steer_windows = 128
steer_samples = 32
blimp = True
blimp_limit = 100
