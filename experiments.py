"""
Experiments with LIME: train models with train.py and compare them (what the metadata buys, how
well LIME+1 hints steer, downstream accuracy). The cost measurements (throughput, MFU, tagging,
start-up) are bench.py's.

$ python experiments.py configs/quickstart.py               # the one-command demo: 4 runs, a table, curves
$ python experiments.py configs/bench_efficiency_cpu.py     # baseline vs LIME variants, same data/steps
$ python experiments.py --mode=steering --ckpt_dir=out-bench-eff/lime1
$ python experiments.py configs/bench_downstream_cpu.py     # cloze/arithmetic accuracy per model and tag policy
$ python experiments.py --mode=curves RUN_DIR [RUN_DIR ...] # curves of any train.py runs against the first
$ python experiments.py configs/experiments_gpu_check.py    # a short efficiency + steering pass on a GPU

Engines: train.py trains every run, as a subprocess (no state shared between runs); the steering
mode generates with sample.generate; the downstream mode scores with harness.py (its offline tasks
through lm-eval). Those are the only scripts it imports, inside the modes that use them; the helpers
it shares with bench.py (config checks, tables, the dataset build, the result file) are common.py's.

Every module-level name below is a config key; config files (python, exec'd) and --key=value
flags override them in command-line order, unknown keys are an error (as in train.py).
Each mode prints a table and writes out_json (default out-bench/bench_<mode>.json), atomically.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from common import (ROOT, arch_args, autocast, build_dataset, checkpoint_path, configure_mode, cooldown_start, ensure_dataset, fail,
                    load_model, read_log, run_main, setup_torch, table, write_atomic, write_json, write_result)
from metadata import UNK, base_stream, is_causal

# -----------------------------------------------------------------------------
# default config values
mode = 'efficiency'  # efficiency | tightness | steering | curves | downstream | gpu_check (efficiency, then steering)
out_json = ''  # '' = out-bench/bench_<mode>.json
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False
threads = 0  # torch CPU threads for the in-process modes (steering); 0 = torch's default
# data: a prepare.py directory, built on demand if missing (GPT-2's first 4096 ranks: a valid BPE
# whose output layer does not dominate a small model's cost on CPU)
data_dir = 'data/nltk_mix_4k'
data_tokenizer = 'gpt2-4096'  # only used to build data_dir when it is missing (build_data=True)
# 'nltk_mix': NLTK's Gutenberg, Brown (15 genres), webtext, State of the Union and inaugural corpora,
# one JSONL file per source, one document per line, split by document (about 65 val documents of 5
# sources); '' = NLTK's Gutenberg books alone (2 val documents); else comma-separated prepare.py --input paths
data_input = 'nltk_mix'
build_data = True
plain_data_dir = ''  # baseline_plain: data_dir's documents and split prepared with --tokenization plain; '' = data_dir + '_plain' (built on first use)
# the model every run trains (train.py's keys)
arch = 'gpt2'  # 'gpt2' or 'gemma' (model.py)
n_layer = 4
n_head = 4
n_kv_head = 2  # gemma only (ignored for gpt2, so one preset serves both archs): 0 = n_head, 1 = multi-query
n_embd = 128
mlp_hidden = 0  # MLP hidden width (gemma: per gate/up projection); 0 = 4 * n_embd
block_size = 128
batch_size = 16
bias = False  # gpt2 only
dropout = 0.0
lime1_meta_dropout = 0.0  # the paper's LIME+1 trains without; >0 teaches the model what <unk> (no hint) means
meta_inject_layer = 0  # lime1_predict runs: the block after which the next tags are predicted and added; 0 = n_layer // 2
# training (train.py's keys; lr_decay_iters = max_iters)
max_iters = 1000
eval_interval = 100
eval_iters = 10
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
weight_decay = 0.1
gradient_accumulation_steps = 1
launcher = ''  # prefix for train.py instead of the python running experiments, e.g. 'torchrun --standalone --nproc_per_node=8'
train_threads = 0  # OMP_NUM_THREADS for the training subprocesses; 0 = inherit
marginal_k = 8  # train.py's: a self-predicting run's val_nll before its last evaluation is the top-k bound
keep_checkpoints = 0  # train.py's: also keep every run's last N evaluation snapshots (ckpt_{iter}.pt: BLiMP against tokens)
cool_branches = False  # cooldown arms: also cool down from each of their evaluation snapshots before their own cooldown (train.py --branch_from), the same fraction of each branch's budget: the plain model at several budgets
# efficiency: the arms of ARMS below, each trained in eff_dir/<arm> (seed i > 1: eff_dir/<arm>_seed<i>)
eff_runs = 'baseline,lime_causal,lime1_predict,predict_token_classes,predict_random_classes,aux_loss'
eff_seeds = 1  # seeds per arm (seed, seed + 1, ...; arm runs of the same seed index share init and batches)
eff_archs = ''  # '' = arch; or comma-separated, e.g. 'gpt2,gemma': each arch's runs in eff_dir/<arch>/
eff_boot = 2000  # bootstrap resamples (seeds and val documents) behind every standard error
eff_dir = 'out-bench-eff'  # each run trains in eff_dir/<run> (also the downstream runs)
eff_reuse = True  # skip a run whose eff_dir/<run> finished with identical arguments
eff_parallel = 1  # training processes at once (CPU: 2 one-thread runs beat 1 two-thread run)
plot = True  # eff_dir/curves.png when matplotlib is installed
# downstream: train ds_runs on data_dir (the default corpus plus generated arithmetic problems, none of
# them a test problem), then score each with harness.py's offline tasks under every tag policy it has
ds_runs = 'baseline,lime_causal,lime1,lime1_predict'
ds_task_dir = 'tasks/lime'  # built here (harness.py --build_tasks) when missing
ds_tasks = 'lime_cloze,lime_arithmetic,lime_arithmetic_hinted,lime_arithmetic_ll'
ds_arith_problems = 20000  # arithmetic problems mixed into the training corpus (50 per document)
ds_cloze_n = 500  # harness.py cloze_n / arith_n / task_seed for the tasks built here
ds_arith_n = 50
ds_task_seed = 1234
ds_limit = 0  # examples per task; 0 = all
# BLiMP (harness.py --tasks=blimp): every run of the efficiency comparison scored on blimp_dir's pairs
blimp = False
blimp_dir = 'auto'  # official-format paradigm files; 'auto' = ../shared/blimp/data (published results beside it)
blimp_limit = 0  # the first N pairs of each paradigm; 0 = all
blimp_marginal_k = 8  # self-predicting runs: the top-k bound of the marginal (0 = exact: about 30x dearer on CPU)
blimp_snapshots = ''  # arms (comma-separated) whose first seed's kept snapshots (keep_checkpoints) are scored too: BLiMP against tokens
# tightness: python experiments.py --mode=tightness --ckpt_dir=RUN (a self-predicting run on causal streams)
tight_ks = '1,2,4,8,16,32'  # the top-k bounds measured against the exact marginal, on the run's val windows
# curves: python experiments.py --mode=curves RUN_DIR [RUN_DIR ...]
curves_baseline = ''  # the run the others are measured against; '' = the first directory given
curves_png = 'out-bench/curves.png'
# steering
ckpt_dir = ''  # a LIME+1 run dir with ckpt.pt, or a checkpoint file; '' = eff_dir/lime1 (trained now if missing)
base_ckpt_dir = ''  # the baseline run dir or checkpoint file; '' = eff_dir/baseline (trained now if missing)
predict_ckpt_dir = ''  # self-predicting LIME+1 run dir; '' = lime1_predict beside ckpt_dir (trained if missing there)
steer_predict = True  # also compare the self-predicting model (with and without hints)
steer_windows = 64  # fixed val windows for next-token accuracy
steer_samples = 16  # generations (one per val window)
steer_prompt = 32  # prompt tokens (real val text)
steer_new_tokens = 32  # generated tokens, each with a hint (the real next tokens' tags)
steer_top_k = 0  # 0 = greedy
steer_temperature = 1.0
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
MODES = ('efficiency', 'tightness', 'steering', 'curves', 'downstream', 'gpu_check')
PAPER_FRACTION = 0.4365  # the paper's headline: LIME reaches the baseline's loss with 43.65% of its tokens


def configure(argv):
    """Config files and --key=value flags over the defaults above, mode and dtype checked."""
    return configure_mode(argv, DEFAULTS, MODES)


# -----------------------------------------------------------------------------
# the arms: what each run changes against the baseline (train.py keys), and its label in tables.
# Every experiment picks its runs from here by name.

ARMS = {
    'baseline': dict(metadata='', label='baseline', tagger=False),
    'lime': dict(metadata='pos,ner', label='LIME (full tags)'),
    'lime_causal': dict(metadata='pos_causal,ner_causal', label='LIME (causal tags)'),
    # downstream labels it by its tags alone: which tags it reads is the policy column's business
    'lime1': dict(metadata='pos,ner', meta_shift=1, label='LIME+1 (full, oracle next-token tags)',
                  ds_label='LIME+1 (full tags)'),
    # LIME+1 without an oracle: own causal tags in, the next token's tags predicted by the model itself
    'lime1_predict': dict(metadata='pos_causal,ner_causal', meta_predict=True,
                          label='LIME+1, self-predicted tags (causal)'),
    'lime1_predict_full': dict(metadata='pos,ner', meta_predict=True, label='LIME+1, self-predicted tags (full)'),
    'shuffled': dict(metadata='pos,ner', meta_shuffle=True, label='shuffled tags (control)'),
    # the controls that say what the self-predicting model's gain is made of (train.py's meta_classes):
    # its streams replaced by each token's majority tags in the train split (a lookup table, no tagger),
    # or by those classes moved to other tokens at random (same class sizes, no linguistic meaning);
    # and the tag heads' loss alone, the tags adding nothing to the input (meta_weight 0)
    'predict_token_classes': dict(metadata='pos_causal,ner_causal', meta_predict=True, meta_classes='token',
                                  label='self-predicted, context-free classes (control)', tagger=False),
    'predict_random_classes': dict(metadata='pos_causal,ner_causal', meta_predict=True, meta_classes='random',
                                   label='self-predicted, random classes (control)', tagger=False),
    'aux_loss': dict(metadata='pos_causal,ner_causal', meta_predict=True, meta_weight=0.0,
                     label='tag loss only, no tags in (control)', tagger=False),
    # LIME as a training-time accelerator (MeCo-style): tags for all but the last tenth, then none
    # (train.py's meta_cooldown); the final model is a plain language model, evaluated with no tags
    'lime_cooldown': dict(metadata='pos,ner', meta_cooldown=0.1, label='LIME (full tags), no-tag cooldown (10%)',
                          tagger=False),
    'lime_causal_cooldown': dict(metadata='pos_causal,ner_causal', meta_cooldown=0.1,
                                 label='LIME (causal tags), no-tag cooldown (10%)', tagger=False),
    # its control: the tags read through a fixed permutation of positions (same frequencies, aligned
    # with nothing), then the same cooldown: what extra inputs alone do to the plain model at the end
    'shuffled_cooldown': dict(metadata='pos,ner', meta_shuffle=True, meta_cooldown=0.1,
                              label='shuffled tags, no-tag cooldown (control)', tagger=False),
    # the tokenization itself: GPT-2's own encoding of the same documents (its own data dir), compared by val_bpb
    'baseline_plain': dict(metadata='', tokenization='plain', label='baseline, plain tokenization'),
}


# -----------------------------------------------------------------------------
# efficiency: baseline vs LIME variants trained by train.py on the same data, seed, batches, steps

def plain_dir(C):
    return C.plain_data_dir or C.data_dir.rstrip('/') + '_plain'


def ensure_plain_dataset(C, info):
    """The baseline_plain arm's data: data_dir's documents, split, tokenizer and NER mode, prepared
    with --tokenization plain (GPT-2's own encoding of the whole text), from data_dir's meta.json."""
    d = plain_dir(C)
    meta = os.path.join(d, 'meta.json')
    same = ('tokenizer', 'ner', 'train_docs', 'val_docs', 'inputs', 'seed', 'val_fraction')
    if os.path.isfile(meta):
        p = json.load(open(meta))
        bad = [k for k in same if p.get(k) != info.get(k)]
        if p.get('tokenization') != 'plain' or bad:
            fail(f"{meta}: not data_dir's documents with plain tokenization (differs in: "
                 f"{', '.join(bad) or 'tokenization'}); remove it or set plain_data_dir")
        return p
    if info.get('tokenization', 'lime') == 'plain':
        fail(f"{C.data_dir} is plain-tokenized already: baseline_plain compares plain with LIME tokenization")
    if info.get('merged_from') or info.get('num_shards', 1) != 1:
        fail(f"{C.data_dir} was merged from shards: build its plain twin with prepare.py and set plain_data_dir")
    if not C.build_data:
        fail(f"{meta}: not found (prepare.py --tokenization plain, or set --build_data=True)")
    inputs = info.get('inputs') or []
    args = ['--tokenization', 'plain', '--tags', 'full', '--tokenizer', info['tokenizer'], '--ner', info['ner'],
            '--seed', str(info['seed']), '--val_fraction', str(info['val_fraction'])]
    if inputs != ['nltk.corpus.gutenberg']:
        args += ['--input'] + inputs
    p = build_dataset(d, args)
    bad = [k for k in same if p.get(k) != info.get(k)]
    if bad:
        fail(f"{d}: plain twin differs from {C.data_dir} in {', '.join(bad)}")
    return p


def train_args(C, name, out_dir, seed_index=0):
    """train.py's arguments for arm name, trained in out_dir with seed C.seed + seed_index: the arm's
    changes over the shared settings."""
    spec = ARMS[name]
    data = plain_dir(C) if spec.get('tokenization') == 'plain' else C.data_dir
    args = dict(data_dir=os.path.abspath(data), out_dir=os.path.abspath(out_dir),
                metadata=spec.get('metadata', ''), meta_shift=spec.get('meta_shift', 0),
                meta_shuffle=spec.get('meta_shuffle', False), seed=C.seed + seed_index,
                n_layer=C.n_layer, n_head=C.n_head, n_embd=C.n_embd, block_size=C.block_size,
                batch_size=C.batch_size, **arch_args(C), bias=C.bias, dropout=C.dropout,
                gradient_accumulation_steps=C.gradient_accumulation_steps, max_iters=C.max_iters,
                lr_decay_iters=C.max_iters, warmup_iters=C.warmup_iters, learning_rate=C.learning_rate,
                min_lr=C.min_lr, weight_decay=C.weight_decay, eval_interval=C.eval_interval,
                eval_iters=C.eval_iters, log_interval=max(C.max_iters // 10, 1), device=C.device,
                dtype=C.dtype, compile=C.compile, always_save_checkpoint=True, overwrite=True)  # a rerun replaces
    keep = C.keep_checkpoints
    if C.cool_branches and 'meta_cooldown' in spec:  # every evaluation's snapshot: the branches start there
        keep = max(keep, C.max_iters // C.eval_interval + 1)
    if keep:  # only when asked: the argument list of older runs stays the same (eff_reuse)
        args['keep_checkpoints'] = keep
    if name == 'lime1' and C.lime1_meta_dropout > 0:
        args['meta_dropout'] = C.lime1_meta_dropout
    if spec.get('meta_predict'):
        args.update(meta_predict=True, meta_inject_layer=C.meta_inject_layer, marginal_k=C.marginal_k)
    for k in ('meta_classes', 'meta_weight', 'meta_cooldown'):
        if k in spec:
            args[k] = spec[k]
    return [f"--{k}={v}" for k, v in args.items()]


def train_runs(C, jobs):
    """Train runs with train.py in subprocesses (own processes: no state leaks between runs, and
    train.py stays the single source of truth for training), eff_parallel at a time.
    jobs: [(name, out_dir)] or [(name, out_dir, seed index, C of the arch)], or with train.py's
    arguments last (the cooldown branches). Returns {out_dir: (log rows, wall s)}. A finished run with
    identical arguments is reused when eff_reuse (bench_args.json in its out_dir records them; a
    branch also needs its snapshot to be older than that record)."""
    done, todo = {}, []
    for job in jobs:
        name, out_dir, i, Ca, args = (tuple(job) + (0, C, None)[len(job) - 2:])[:5]
        args = args or train_args(Ca, name, out_dir, i)
        stamp, log_path = os.path.join(out_dir, 'bench_args.json'), os.path.join(out_dir, 'log.jsonl')
        if C.eff_reuse and os.path.isfile(stamp) and os.path.isfile(log_path):
            prev = json.load(open(stamp))
            rows = read_log(log_path)
            want = int(arg_value(args, 'max_iters'))
            src = arg_value(args, 'branch_from')
            fresh = not src or (os.path.isfile(src) and os.path.getmtime(src) < os.path.getmtime(stamp))
            if prev.get('args') == args and rows and rows[-1]['iter'] == want and fresh:
                print(f"{name}: reusing the finished run in {out_dir}", flush=True)
                done[out_dir] = (rows, prev.get('wall_s'))
                continue
        todo.append((name, out_dir, args))
    env = dict(os.environ)
    if C.train_threads:
        env['OMP_NUM_THREADS'] = str(C.train_threads)
    running = []
    while todo or running:
        while todo and len(running) < max(C.eff_parallel, 1):
            name, out_dir, args = todo.pop(0)
            os.makedirs(out_dir, exist_ok=True)
            logf = open(os.path.join(out_dir, 'train.log'), 'w')
            cmd = (C.launcher.split() if C.launcher else [sys.executable]) + [os.path.join(ROOT, 'train.py')] + args
            p = subprocess.Popen(cmd, stdout=logf,
                                 stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((p, logf, name, out_dir, args, time.time()))
        time.sleep(0.2)
        for job in list(running):
            p, logf, name, out_dir, args, t0 = job
            if p.poll() is None:
                continue
            running.remove(job)
            logf.close()
            wall = time.time() - t0
            if p.returncode != 0:
                for q in running:  # stop the other runs we started before failing
                    q[0].terminate()
                tail = open(os.path.join(out_dir, 'train.log')).read()[-2000:]
                fail(f"train.py failed for run '{name}' (exit {p.returncode}); log {out_dir}/train.log:\n{tail}")
            write_json(os.path.join(out_dir, 'bench_args.json'), dict(args=args, wall_s=wall))
            rows = read_log(os.path.join(out_dir, 'log.jsonl'))
            nll = rows[-1].get('val_nll')
            print(f"{out_dir}: val loss {rows[-1]['val_loss']:.4f}, val_nll "
                  f"{'n/a' if nll is None else f'{nll:.4f}'}, acc {rows[-1]['val_acc']:.4f} ({wall:.0f}s)", flush=True)
            done[out_dir] = (rows, wall)
    return done


def arg_value(args, key):
    """The value of --key=... in a train.py argument list, None if absent."""
    return next((a.split('=', 1)[1] for a in args if a.startswith(f'--{key}=')), None)


def branch_jobs(C, name, run_dir, i, Ca):
    """The cooldown branches of one cooldown arm's run (cool_branches): from each kept snapshot at
    iteration b before the run's own cooldown, a new run (train.py --branch_from) whose budget B is
    b / (1 - meta_cooldown) iterations, the last B - b without tags; the lr schedule, batches and seed
    continue the run's own. Each gives a plain model at B iterations: [(name, out_dir, i, Ca, args)]."""
    f = ARMS[name]['meta_cooldown']
    jobs = []
    for b in range(C.eval_interval, cooldown_start(C.max_iters, f), C.eval_interval):
        snap = os.path.join(run_dir, f'ckpt_{b:06d}.pt')
        if not os.path.isfile(snap):
            fail(f"{snap}: missing: the cooldown branches start from the run's kept snapshots (rerun the arm)")
        budget = round(b / (1 - f))
        out_dir = f"{run_dir}_branch{b:06d}"
        args = [a for a in train_args(Ca, name, out_dir, i) if not a.startswith(('--max_iters=', '--meta_cooldown=',
                                                                                     '--keep_checkpoints='))]
        args += [f'--branch_from={os.path.abspath(snap)}', f'--max_iters={budget}',
                 f'--meta_cooldown={(budget - b) / budget!r}', '--keep_checkpoints=0']
        jobs.append((name, out_dir, i, Ca, args))
    return jobs


def first_reach(rows, key, target, better):
    """Tokens at which a curve first reaches target (linear interpolation between eval points);
    None if it never does."""
    prev = None
    for r in rows:
        v = r.get(key)
        if v is None:
            continue
        if better(v, target):
            if prev is None or prev[1] == v:
                return r['tokens']
            (t0, v0), (t1, v1) = prev, (r['tokens'], v)
            return t0 + (t1 - t0) * (target - v0) / (v1 - v0)
        prev = (r['tokens'], v)
    return None


def honest_acc_key(rows):
    """The accuracy a run could compute from the past alone: val_acc_own for meta_predict runs (its
    val_acc is read with the data's next tags), val_acc for runs with val_nll, None otherwise."""
    last = rows[-1]
    if last.get('val_nll') is None:
        return None
    return 'val_acc_own' if last.get('val_acc_own') is not None else 'val_acc'


def summarize_runs(logs, walls, baseline='baseline', other_tokens=()):
    """Final numbers per run and the fraction of the baseline's tokens at which each run first
    reaches the baseline's final value: on val_nll and honest accuracy (runs that read the future
    have none: reads_future), and, as in the paper, on val_loss and val_acc whatever the run reads;
    on val_bpb for every run that has it. Runs in other_tokens see other tokens (another
    tokenization): only val_bpb compares them with the baseline."""
    base = logs[baseline][-1]
    base_tokens = base['tokens']
    frac = lambda t: t / base_tokens if t is not None and base_tokens else None
    out = {}
    for name, rows in logs.items():
        last = rows[-1]
        acc_key = honest_acc_key(rows)
        lower, higher = (lambda v, t: v <= t), (lambda v, t: v >= t)
        out[name] = dict(
            final_val_loss=last['val_loss'], final_val_ppl=last['val_ppl'], final_val_acc=last['val_acc'],
            final_val_nll=last.get('val_nll'), final_val_loss_bound=last.get('val_loss_bound'),
            final_val_acc_honest=last.get(acc_key) if acc_key else None,
            final_val_acc_word_start=last.get('val_acc_word_start'),
            final_val_acc_word_cont=last.get('val_acc_word_cont'),
            reads_future=last.get('val_nll') is None,
            tokens=last['tokens'], wall_s=walls.get(name),  # with eff_parallel > 1 runs share the machine
            tokens_per_sec=last['tokens'] / walls[name] if walls.get(name) else None,
            frac_tokens_to_baseline_nll=(frac(first_reach(rows, 'val_nll', base['val_nll'], lower))
                                         if last.get('val_nll') is not None else None),
            frac_tokens_to_baseline_acc_honest=frac(first_reach(rows, acc_key, base['val_acc'], higher))
            if acc_key else None,
            frac_tokens_to_baseline_loss=frac(first_reach(rows, 'val_loss', base['val_loss'], lower)),
            frac_tokens_to_baseline_acc=frac(first_reach(rows, 'val_acc', base['val_acc'], higher)),
            final_val_bpb=last.get('val_bpb'), final_val_bytes_per_token=last.get('val_bytes_per_token'),
            frac_tokens_to_baseline_bpb=(frac(first_reach(rows, 'val_bpb', base['val_bpb'], lower))
                                         if last.get('val_bpb') is not None and base.get('val_bpb') is not None
                                         else None),
            other_tokens=name in other_tokens,
            curve={k: [r.get(k) for r in rows] for k in ('iter', 'tokens', 'val_loss', 'val_nll', 'val_bpb', 'val_ppl',
                                                         'val_acc', 'val_acc_own', 'val_acc_word_start',
                                                         'val_acc_word_cont', 'train_loss')})
        if name in other_tokens:  # per-token numbers of other tokens: not comparable with the baseline's
            for k in ('frac_tokens_to_baseline_nll', 'frac_tokens_to_baseline_acc_honest',
                      'frac_tokens_to_baseline_loss', 'frac_tokens_to_baseline_acc'):
                out[name][k] = None
    return out


def reach_cell(r, key):
    """'n/a' for a run that reads the future (or, except on bpb, sees other tokens), 'never' when it
    does not reach the baseline."""
    if r['reads_future'] and key in ('frac_tokens_to_baseline_nll', 'frac_tokens_to_baseline_acc_honest',
                                     'frac_tokens_to_baseline_bpb'):
        return 'n/a'
    if r.get('other_tokens') and key != 'frac_tokens_to_baseline_bpb':
        return 'n/a'
    return 'never' if r[key] is None else f"{100 * r[key]:.1f}%"


@torch.no_grad()
def run_tightness(C):
    """How tight is the top-k bound, and what does it cost? On the val windows train.py evaluates (its
    eval config, documents shared out), the self-predicting run's val_nll as the exact marginal and
    as the top-k bound for each k of tight_ks, each timed against the teacher-forced evaluation (one
    forward with the data's next tags): the table behind train.py's default marginal_k."""
    import torch.nn.functional as F
    from common import Split, eval_starts
    if not C.ckpt_dir:
        fail("tightness: give --ckpt_dir=RUN (a self-predicting run: meta_predict on causal streams)")
    model, ck = load_model(C.ckpt_dir, C.device)
    cfg, rc = model.config, ck['config']
    if not cfg.meta_predict or not (rc.get('meta_classes', 'data') != 'data' or all(map(is_causal, cfg.meta_streams))):
        fail(f"{checkpoint_path(C.ckpt_dir)}: not a self-predicting model on causal streams (no marginal to bound)")
    val = Split(rc['data_dir'], 'val', list(cfg.meta_streams), 0)
    info = json.load(open(os.path.join(rc['data_dir'], 'meta.json')))
    T, bs = cfg.block_size, rc['batch_size']
    starts = eval_starts(val.n, T, rc['eval_iters'] * bs, val.doc_ends(info.get('eot_token')))
    if rc.get('meta_classes', 'data') != 'data':
        fail(f"{C.ckpt_dir}: a meta_classes control run; measure the bound on a run with the data's tags")
    ks = [int(k) for k in C.tight_ks.split(',') if k.strip()]

    def timed(fn):
        t0, tot = time.time(), 0.0
        for j in range(0, len(starts), bs):
            x, y, meta = val.windows(starts[j:j + bs], T)
            nxt = val.next_tags(starts[j:j + bs], T)
            with autocast(C.device, C.dtype):
                tot += float(fn(x.to(C.device), y.to(C.device), {k: v.to(C.device) for k, v in meta.items()},
                                {k: v.to(C.device) for k, v in nxt.items()}))
        return tot / (len(starts) * T), time.time() - t0

    def teacher_forced(x, y, meta, nxt):
        logits, _, _, _ = model.forward_predict(x, meta, nxt, targets=y)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction='sum')

    loss, t_tf = timed(teacher_forced)
    exact, t_exact = timed(lambda x, y, m, n: -model.marginal(x, m, n, y).double().sum())
    rows = [dict(k='exact', val_nll=exact, gap=0.0, s=t_exact, x_tf=t_exact / t_tf)]
    for k in ks:
        v, t = timed(lambda x, y, m, n: -model.marginal(x, m, n, y, top_k=k).double().sum())
        rows.append(dict(k=k, val_nll=v, gap=v - exact, s=t, x_tf=t / t_tf))
    combos = math.prod(cfg.meta_n_tags)
    print(f"\n{checkpoint_path(C.ckpt_dir)}: {len(starts)} val windows ({len(starts) * T:,} targets), "
          f"{combos} tag combinations; teacher-forced evaluation {t_tf:.2f}s (val_loss {loss:.4f})")
    table(rows, [('k', 'top-k', ''), ('val_nll', 'val_nll', '.4f'), ('gap', 'minus exact', '.4f'),
                 ('s', 'seconds', '.2f'), ('x_tf', 'x teacher-forced', '.1f')])
    return dict(ckpt_dir=C.ckpt_dir, windows=len(starts), tokens=len(starts) * T, combinations=combos,
                teacher_forced_s=t_tf, val_loss=loss, rows=rows, threads=torch.get_num_threads())


def draw_curves(logs, baseline, path):
    """One PNG of val_nll (val_loss, dashed, for runs that read the future), accuracy and the
    cohesion accuracies against training tokens for logs {label: log.jsonl rows}, with the
    baseline's final value marked, where each run first reaches it, and the paper's 43.65% of the
    baseline's tokens. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib); the numbers are in the JSON")
        return None
    base = logs[baseline]
    base_tokens = base[-1]['tokens']
    panels = [('val_nll', 'val NLL per token', lambda v, t: v <= t),
              ('val_acc', 'val next-token accuracy', lambda v, t: v >= t),
              ('val_acc_word_start', 'accuracy, word-start targets', lambda v, t: v >= t),
              ('val_acc_word_cont', 'accuracy, word-continuation targets', lambda v, t: v >= t)]

    def curve_key(rows, key):
        # (key to plot, from the past alone?): runs that read the future plot val_loss/val_acc, dashed;
        # a meta_predict run's accuracy is its own-tag accuracy (its val_acc is teacher-forced)
        honest = rows[-1].get('val_nll') is not None
        predict = rows[-1].get('val_loss_bound') is not None
        if key == 'val_nll':
            return ('val_nll', True) if honest else ('val_loss', False)
        if key == 'val_acc' and predict and rows[-1].get('val_acc_own') is not None:
            return 'val_acc_own', True
        return key, honest and not predict

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, (key, title, better) in zip(axes.flat, panels):
        target = base[-1].get(key)
        drawn = 0
        for k, (label, rows) in enumerate(logs.items()):
            color = f'C{k}'
            use, past_only = curve_key(rows, key)
            pts = [(r['tokens'], r.get(use)) for r in rows if r.get(use) is not None]
            if not pts:
                continue
            drawn += 1
            ax.plot(*zip(*pts), color=color, ls='-' if past_only else '--', label=label)
            reach = first_reach(rows, use, target, better) if target is not None else None
            if reach is not None and label != baseline:
                ax.axvline(reach, color=color, ls=':', lw=1)
                ax.annotate(f"{100 * reach / base_tokens:.0f}%", (reach, target), color=color, fontsize=8,
                            xytext=(3, 3 + 9 * k), textcoords='offset points')
        if not drawn:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{title}: not in these logs", ha='center', transform=ax.transAxes)
            continue
        if target is not None:
            ax.axhline(target, color='gray', lw=1, ls='--')
            ax.text(0, target, "baseline's final", color='gray', fontsize=8, va='bottom')
        ax.axvline(PAPER_FRACTION * base_tokens, color='black', lw=1, ls='-.', alpha=0.5)
        ax.text(PAPER_FRACTION * base_tokens, ax.get_ylim()[1], ' paper: 43.65%', fontsize=8, va='top')
        ax.set_title(title + ' (dashed: reads the future)', fontsize=10)
        ax.set_xlabel('training tokens')
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=110))
    plt.close(fig)
    return path


def run_curves(C, run_dirs):
    """curves: draw_curves over any run directories (each with a log.jsonl); the first is the baseline
    unless curves_baseline names another. Prints where each run first reaches the baseline's final
    val_nll / accuracy."""
    if not run_dirs:
        fail("curves: give run directories, e.g. python experiments.py --mode=curves out-a out-b")
    logs = {}
    for d in run_dirs:
        path = os.path.join(d, 'log.jsonl')
        if not os.path.isfile(path):
            fail(f"{path}: not found (a train.py run directory holds one)")
        rows = read_log(path)
        if not rows:
            fail(f"{path}: no evaluation rows yet")
        logs[os.path.basename(os.path.normpath(d))] = rows
    baseline = os.path.basename(os.path.normpath(C.curves_baseline or run_dirs[0]))
    if baseline not in logs:
        fail(f"curves_baseline={C.curves_baseline} is not one of the run directories")
    runs = summarize_runs(logs, {}, baseline)
    table([dict(run=k, **{c: reach_cell(r, c) for c in ('frac_tokens_to_baseline_nll', 'frac_tokens_to_baseline_loss',
                                                        'frac_tokens_to_baseline_acc')},
                final_val_nll=r['final_val_nll'], final_val_loss=r['final_val_loss']) for k, r in runs.items()],
          [('run', 'run', ''), ('final_val_loss', 'val loss', '.4f'), ('final_val_nll', 'val_nll', '.4f'),
           ('frac_tokens_to_baseline_nll', "to baseline's val_nll", ''),
           ('frac_tokens_to_baseline_loss', "to baseline's loss", ''),
           ('frac_tokens_to_baseline_acc', "to baseline's acc", '')])
    png = draw_curves(logs, baseline, C.curves_png)
    if png:
        print(f"wrote {png}")
    return dict(runs=runs, baseline=baseline, plot=png, run_dirs=[os.path.abspath(d) for d in run_dirs])


NLTK_MIX = ('gutenberg', 'brown', 'webtext', 'state_union', 'inaugural')


def nltk_mix_docs(d):
    """data_input='nltk_mix': NLTK's corpora as documents, d/<source>.jsonl, one {"text": ...} per line
    (a Gutenberg book, a Brown text, a webtext file, a speech). Brown is stored tokenized: its
    paragraphs are detokenized (NLTK's Treebank detokenizer) into running text."""
    import nltk.corpus as nc
    from nltk.tokenize.treebank import TreebankWordDetokenizer
    detok = TreebankWordDetokenizer().detokenize
    tmp = f"{d}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    for src in NLTK_MIX:
        corpus = getattr(nc, src)
        with open(os.path.join(tmp, src + '.jsonl'), 'w', encoding='utf-8') as f:
            for fid in corpus.fileids():
                if src == 'brown':
                    text = '\n\n'.join(' '.join(detok(s) for s in p) for p in corpus.paras(fid))
                else:
                    text = corpus.raw(fid)
                f.write(json.dumps({'text': text}) + '\n')
    if os.path.isdir(d):  # an older partial build of ours (the name is data_dir's + '-docs')
        import shutil
        shutil.rmtree(d)
    os.replace(tmp, d)


def val_sources(C, info):
    """{source: val documents} of an nltk_mix dataset (prepare.py's record split, common.record_in_val)."""
    from common import record_in_val
    docs = C.data_dir.rstrip('/') + '-docs'
    out = {}
    for src in NLTK_MIX:
        path = os.path.join(docs, src + '.jsonl')
        if os.path.isfile(path):
            n = sum(1 for _ in open(path, encoding='utf-8'))
            out[src] = sum(record_in_val(src, i, info['seed'], info['val_fraction']) for i in range(n))
    return out


def ensure_eff_dataset(C):
    """data_dir, built on first use: from the nltk_mix documents, NLTK's Gutenberg, or data_input's paths."""
    if C.data_input != 'nltk_mix' or os.path.isfile(os.path.join(C.data_dir, 'meta.json')):
        return ensure_dataset(C)
    if not C.build_data:
        fail(f"{C.data_dir}/meta.json: not found (set --build_data=True)")
    docs = C.data_dir.rstrip('/') + '-docs'
    nltk_mix_docs(docs)
    return build_dataset(C.data_dir, ['--ner', 'binary', '--tags', 'full,causal', '--tokenizer', C.data_tokenizer,
                                      '--input', docs])


def run_name(name, i):
    """The run directory's name of arm name's seed index i: name, name_seed2, name_seed3, ..."""
    return name if i == 0 else f"{name}_seed{i + 1}"


def read_docs(run_dir):
    """val_docs.json of a finished run: per val document, the sums behind its last val_nll and val_loss."""
    path = os.path.join(run_dir, 'val_docs.json')
    if not os.path.isfile(path):
        fail(f"{path}: not found (written by train.py at each evaluation; rerun the arm)")
    d = json.load(open(path))
    return d


def boot_se(A, N, boot, seed=0):
    """Mean over seeds of sum(A[s]) / sum(N), and its standard error over seeds and documents: a
    bootstrap that resamples the seeds (rows of A) and, independently, the documents (columns, the
    same ones for every seed: they are the same tokens), boot times. A: (seeds, docs) per-document
    NLL sums (or paired differences of them), N: (docs,) target tokens."""
    A, N = np.asarray(A, dtype=np.float64), np.asarray(N, dtype=np.float64)
    mean = float((A.sum(1) / N.sum()).mean())
    if boot <= 0 or A.size < 2:
        return mean, None
    rng = np.random.default_rng(seed)
    S, D = A.shape
    stats = np.empty(boot)
    for b in range(boot):
        si, di = rng.integers(S, size=S), rng.integers(D, size=D)
        stats[b] = (A[np.ix_(si, di)].sum(1) / N[di].sum()).mean()
    return mean, float(stats.std(ddof=1))


def decomposition(C, names, dirs, logs, walls, budgets=None):
    """The comparison table of one arch: per arm, val_nll (mean over seeds, s.e. over seeds and
    documents), its paired difference with the baseline (same seed index, same documents), the
    fraction of the baseline's tokens at which each seed first reaches the baseline's mean final
    val_nll (mean and s.e. over seeds), whether a tagger is needed at inference, and the share of
    each run's wall time spent evaluating. budgets: {run dir: rows}, a cooldown arm's plain models at
    several budgets (its branches' last rows, cool_branches): what its 'tokens to reach' reads."""
    docs = {n: [read_docs(d) for d in dirs[n]] for n in names}
    base = docs['baseline']
    N = np.asarray(base[0]['doc_tokens'])
    target = float(np.mean([logs[d][-1]['val_nll'] for d in dirs['baseline']]))
    base_tokens = logs[dirs['baseline'][0]][-1]['tokens']
    B = np.array([x['doc_nll'] for x in base])
    rows = []
    for n in names:
        if any(x['doc_nll'] is None for x in docs[n]):
            rows.append(dict(arm=n, label=ARMS[n]['label'], reads_future=True))
            continue
        if any(list(x['doc_tokens']) != list(N) for x in docs[n]):
            fail(f"{dirs[n][0]}: its val windows differ from the baseline's (another data_dir or eval config?)")
        A = np.array([x['doc_nll'] for x in docs[n]])
        mean, se = boot_se(A, N, C.eff_boot)
        S = min(len(A), len(B))
        delta, dse = boot_se(A[:S] - B[:S], N, C.eff_boot) if n != 'baseline' else (None, None)
        # a cooled-down arm is a plain model only after a cooldown: its evaluations without tags, and
        # the cooled-down branches' (every budget before its own cooldown's)
        cooled = lambda d: (sorted((budgets or {}).get(d, []) + [r for r in logs[d] if r.get('val_no_tags')],
                                   key=lambda r: r['tokens']) if 'meta_cooldown' in ARMS[n] else logs[d])
        reach = [first_reach(cooled(d), 'val_nll', target, lambda v, t: v <= t) for d in dirs[n]]
        got = [r / base_tokens for r in reach if r is not None]
        share = [sum(r.get('val_eval_s') or 0 for r in logs[d]) / walls[d] for d in dirs[n] if walls.get(d)]
        rows.append(dict(
            arm=n, label=ARMS[n]['label'], reads_future=False, seeds=len(A), val_nll=mean, val_nll_se=se,
            val_nll_seeds=(A.sum(1) / N.sum()).tolist(), delta=delta, delta_se=dse,
            reach_frac=float(np.mean(got)) if got else None,
            reach_frac_se=float(np.std(got, ddof=1) / math.sqrt(len(got))) if len(got) > 1 else None,
            reached=len(got), val_nll_kind=docs[n][0]['val_nll_kind'],
            tagger=ARMS[n].get('tagger', True), eval_share=float(np.mean(share)) if share else None,
            wall_s=float(np.mean([walls[d] for d in dirs[n] if walls.get(d)] or [float('nan')]))))
    return dict(rows=rows, baseline_final_val_nll=target, docs=len(N), tokens=int(N.sum()),
                seeds=len(B))


def train_branches(C, names, dirs, Ca):
    """Every cooldown run's branches (branch_jobs), trained or reused: ({run dir: the plain models'
    last log rows, with branched_at and their val_docs}, {run dir: the branches' wall s})."""
    jobs = {d: branch_jobs(C, n, d, i, Ca) for n in names if 'meta_cooldown' in ARMS[n] for i, d in enumerate(dirs[n])}
    got = train_runs(C, [j for js in jobs.values() for j in js])
    budgets, wall = {}, {}
    for d, js in jobs.items():
        # a branch's log starts with the snapshot's evaluation, ends with the plain model's
        budgets[d] = [dict(got[j[1]][0][-1], branched_at=got[j[1]][0][0]['iter'], docs=read_docs(j[1])) for j in js]
        wall[d] = sum(got[j[1]][1] or 0 for j in js)
    return budgets, wall


def cooldown_budgets(C, names, dirs, logs, budgets):
    """A cooldown arm's plain models at each budget (its branches, then its own end) beside the
    baseline at the same tokens: val_nll (mean over seeds; s.e. over seeds and documents from each
    plain model's val_docs.json), the baseline's val_nll there (its curve, interpolated between evaluations,
    same seed index) and the difference (s.e. over seeds only: the baseline's per-document numbers are
    kept for its last evaluation alone). Budgets before the end have not decayed their lr as far as
    the baseline's end has (the schedule continues the run's own)."""
    base = dirs['baseline']
    at = lambda rows, t: float(np.interp(t, [r['tokens'] for r in rows if r.get('val_nll') is not None],
                                         [r['val_nll'] for r in rows if r.get('val_nll') is not None]))
    out = {}
    for n in names:
        if 'meta_cooldown' not in ARMS[n] or not all(budgets.get(d) for d in dirs[n]):
            continue
        per_seed = [sorted(budgets[d], key=lambda r: r['tokens']) + [dict(logs[d][-1], docs=read_docs(d))]
                    for d in dirs[n]]
        rows = []
        for k in range(len(per_seed[0])):
            pts = [p[k] for p in per_seed]
            A = np.array([r['val_nll'] for r in pts])
            B = np.array([at(logs[b], r['tokens']) for b, r in zip(base, pts)])
            mean, se = boot_se([r['docs']['doc_nll'] for r in pts], pts[0]['docs']['doc_tokens'], C.eff_boot)
            sem = lambda v: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
            rows.append(dict(iter=pts[0]['iter'], tokens=pts[0]['tokens'], val_nll=mean, val_nll_se=se,
                             baseline_val_nll=float(B.mean()), delta=float((A - B).mean()), delta_se=sem(A - B),
                             branched_at=pts[0].get('branched_at')))
        out[n] = rows
    return out


def print_cooldown_budgets(dec, base_tokens):
    for n, rows in dec['cooldown_budgets'].items():
        print(f"\n{ARMS[n]['label']}: the plain model at each budget (no tags; Δ against the baseline at the same tokens)")
        table([dict(budget=f"{r['tokens']:,} ({100 * r['tokens'] / base_tokens:.0f}%)",
                    start='its own run' if r['branched_at'] is None else f"{r['branched_at']:,}",
                    nll=f"{r['val_nll']:.4f}" + (f" ± {r['val_nll_se']:.4f}" if r['val_nll_se'] is not None else ''),
                    base=f"{r['baseline_val_nll']:.4f}",
                    delta=f"{r['delta']:+.4f}" + (f" ± {r['delta_se']:.4f}" if r['delta_se'] is not None else ''))
               for r in rows],
              [('budget', 'tokens (of the baseline\'s)', ''), ('start', 'branched at iter', ''),
               ('nll', 'val_nll, no tags', ''), ('base', 'baseline there', ''), ('delta', 'Δ (s.e. over seeds)', '')])
    print("cooldown arms' 'tokens to baseline's final' above: interpolated between these budgets; branches' "
          "wall s per seed: " + ', '.join(f"{n} {w:.0f}" for n, w in dec['cooldown_branch_wall_s'].items()))


def print_decomposition(dec):
    fmt = lambda m, s: '-' if m is None else f"{m:+.4f}" + (f" ± {s:.4f}" if s is not None else '')
    cells = []
    for r in dec['rows']:
        if r['reads_future']:
            cells.append(dict(label=r['label'], nll='reads the future', delta='n/a', reach='n/a', tagger='yes'))
            continue
        reach = ('never' if not r['reached'] else f"{100 * r['reach_frac']:.1f}%"
                 + (f" ± {100 * r['reach_frac_se']:.1f}" if r['reach_frac_se'] is not None else '')
                 + (f" ({r['reached']}/{r['seeds']} seeds)" if r['reached'] < r['seeds'] else ''))
        cells.append(dict(label=r['label'], nll=fmt(r['val_nll'], r['val_nll_se']).lstrip('+'),
                          delta='' if r['arm'] == 'baseline' else fmt(r['delta'], r['delta_se']),
                          reach='' if r['arm'] == 'baseline' else reach, tagger='yes' if r['tagger'] else 'no',
                          kind=r['val_nll_kind'], share=r['eval_share'], wall=r['wall_s']))
    table(cells, [('label', 'arm', ''), ('nll', 'val_nll ± s.e.', ''), ('delta', 'Δ vs baseline (paired)', ''),
                  ('reach', "tokens to baseline's final", ''), ('tagger', 'tagger at inference', ''),
                  ('kind', 'val_nll', ''), ('share', 'eval share', '.2f'), ('wall', 'wall s', '.0f')])
    print(f"{dec['seeds']} seed(s) per arm, {dec['docs']} val documents, {dec['tokens']:,} target tokens; "
          "s.e.: bootstrap over seeds and documents; Δ: paired by seed index and document (same tokens). "
          "val_nll: NLL per token from the past alone (self-predicting arms: the exact marginal over their "
          "next tags). tokens to baseline's final: fraction of the baseline's training tokens at which an arm "
          "first reaches the baseline's mean final val_nll (earlier evaluations of self-predicting arms use the "
          "top-k bound, which is >= the marginal: a conservative figure).")


def run_efficiency(C):
    from types import SimpleNamespace
    info = ensure_eff_dataset(C)
    names = [n for n in C.eff_runs.split(',') if n]
    for n in names:
        if n not in ARMS:
            fail(f"unknown efficiency run {n!r} ({', '.join(ARMS)})")
    if 'baseline' not in names:
        fail("eff_runs must include 'baseline' (the reference of every comparison)")
    for n in names:
        for s in ARMS[n]['metadata'].split(','):
            if s and s not in info['streams']:
                fail(f"{C.data_dir}: stream '{s}' missing for run '{n}' (prepare.py --tags full,causal)")
    if C.eff_seeds < 1:
        fail(f"eff_seeds={C.eff_seeds}: must be >= 1")
    if C.blimp:
        import harness
        if not harness.resolve_blimp_dir(C.blimp_dir):  # an explicit directory that is missing fails here
            print("note: BLiMP skipped: no files at ../shared/blimp/data (--blimp_dir=DIR names others)", flush=True)
            C.blimp = False
    for n in (x for x in C.blimp_snapshots.split(',') if x):
        if C.blimp and n not in names:
            fail(f"blimp_snapshots: '{n}' is not one of the arms (eff_runs)")
    names = ['baseline'] + [n for n in names if n != 'baseline']
    plain = [n for n in names if ARMS[n].get('tokenization') == 'plain']
    plain_info = ensure_plain_dataset(C, info) if plain else None
    archs = [a for a in (C.eff_archs or C.arch).split(',') if a]
    for a in archs:
        if a not in ('gpt2', 'gemma'):
            fail(f"eff_archs: unknown arch {a!r} ('gpt2', 'gemma')")
    sources = val_sources(C, info) if C.data_input == 'nltk_mix' else {}
    if sources:
        print(f"{C.data_dir}: {info.get('val_docs')} val documents: "
              + ', '.join(f"{k} {v}" for k, v in sources.items()), flush=True)
    t0 = time.time()
    out = {}
    for arch in archs:
        Ca = SimpleNamespace(**{**vars(C), 'arch': arch})
        root = os.path.join(C.eff_dir, arch) if len(archs) > 1 else C.eff_dir
        dirs = {n: [os.path.join(root, run_name(n, i)) for i in range(C.eff_seeds)] for n in names}
        res = train_runs(C, [(n, dirs[n][i], i, Ca) for i in range(C.eff_seeds) for n in names])
        logs, walls = {d: r[0] for d, r in res.items()}, {d: r[1] for d, r in res.items()}
        budgets, branch_wall = train_branches(C, names, dirs, Ca) if C.cool_branches else ({}, {})
        first = {n: logs[dirs[n][0]] for n in names}  # seed 0: the per-run table and the curves
        runs = summarize_runs(first, {n: walls[dirs[n][0]] for n in names}, other_tokens=plain)
        print(f"\n{arch}, seed {C.seed}:")
        print_runs(runs)
        honest = [n for n in names if n not in plain]
        dec = decomposition(C, honest, dirs, logs, walls, budgets)
        print(f"\n{arch}: what the gain is made of")
        print_decomposition(dec)
        if budgets:
            dec['cooldown_budgets'] = cooldown_budgets(C, honest, dirs, logs, budgets)
            dec['cooldown_branch_wall_s'] = {n: float(np.mean([branch_wall[d] for d in dirs[n]]))
                                             for n in dec['cooldown_budgets']}
            print_cooldown_budgets(dec, logs[dirs['baseline'][0]][-1]['tokens'])
        png = None
        if C.plot:
            png = draw_curves(first, 'baseline', os.path.join(root, 'curves.png'))
        tpi = first['baseline'][-1]['tokens'] // max(C.max_iters, 1)
        bl = run_blimp(C, honest, dirs, root, tpi) if C.blimp else None
        out[arch] = dict(runs=runs, decomposition=dec, blimp=bl, baseline_final_tokens=first['baseline'][-1]['tokens'],
                         eff_dir=root, plot=png, run_dirs=dirs,
                         tokens_per_iter=first['baseline'][-1]['tokens'] // max(C.max_iters, 1),
                         train_args=train_args(Ca, 'baseline', 'OUT'))
    return dict(archs=out, data_dir=C.data_dir, tokenizer=info.get('tokenizer'), vocab_size=info.get('vocab_size'),
                train_tokens=info.get('train_tokens'), val_tokens=info.get('val_tokens'),
                val_docs=info.get('val_docs'), val_sources=sources, seeds=C.eff_seeds,
                plain_data_dir=plain_dir(C) if plain else None,
                plain_train_tokens=plain_info.get('train_tokens') if plain_info else None,
                max_iters=C.max_iters, wall_s=time.time() - t0,
                notes=("frac_tokens_to_baseline_*: fraction of the baseline's training tokens at which the run "
                       "first reaches the baseline's final value (linear interpolation between eval points): "
                       "_nll and _acc_honest on what the run could compute from the past alone (None for runs "
                       "that read the future: reads_future), _loss and _acc the paper's metric on val_loss and "
                       "val_acc whatever the run reads. decomposition: the arms over seeds, with standard "
                       "errors over seeds and val documents (see print_decomposition)."))


# -----------------------------------------------------------------------------
# BLiMP of every run: accuracy over seeds, paired with the baseline pair by pair

def blimp_scores(C, ckpt):
    """harness.py's BLiMP of one checkpoint (a run dir or a snapshot file), written beside it and
    reused while it is newer than the checkpoint and asked with the same settings (the file keeps
    one entry per setting: e.g. all pairs by the top-k bound and a subset by the exact marginal)."""
    import harness
    path = ckpt if os.path.isfile(ckpt) else checkpoint_path(ckpt)
    out = os.path.splitext(path)[0] + '.blimp.json'
    # run_efficiency has checked that blimp_dir resolves
    want = dict(blimp_dir=os.path.abspath(harness.resolve_blimp_dir(C.blimp_dir)), limit=C.blimp_limit,
                marginal_k=C.blimp_marginal_k)
    # the entries written since the checkpoint (read again before writing: a runner beside this one
    # may have added its own setting meanwhile)
    entries = lambda: (json.load(open(out)).get('entries', []) if os.path.isfile(out)
                       and os.path.getmtime(out) > os.path.getmtime(path) else [])
    plain = lambda w: {k: v for k, v in w.items() if k != 'marginal_k'}
    for e in entries():  # marginal_k only concerns runs scored by their marginal: a plain model's score stands
        if e['want'] == want or (e['blimp'].get('policy') != 'predict' and plain(e['want']) == plain(want)):
            return e['blimp']
    cfg = harness.configure([f'--out_dir={path}', '--tasks=blimp', f"--blimp_dir={want['blimp_dir']}",
                             f'--limit={C.blimp_limit}', f'--marginal_k={C.blimp_marginal_k}', f'--device={C.device}',
                             f'--dtype={C.dtype}', '--batch_size=64', '--bootstrap_iters=0',
                             f"--blimp_task_dir={os.path.join(C.eff_dir, 'blimp_tasks')}",
                             f"--out_json={os.path.splitext(path)[0] + '.harness.json'}"])
    res = harness.run(cfg)
    (pol, r), = res.items()  # the model's default policy: causal, or predict (its marginal)
    b = dict(r['blimp'], policy=pol, likelihood=r['lime'].get('likelihood'), label=r['lime']['policy_label'])
    write_json(out, dict(entries=[e for e in entries() if e['want'] != want] + [dict(want=want, blimp=b)]))
    return b


def published_blimp(C):
    """{model: {UID: accuracy}} of the results published with BLiMP (models_summary.jsonl beside the
    data directory), or {}."""
    import harness
    d = harness.resolve_blimp_dir(C.blimp_dir)
    path = os.path.join(os.path.dirname(os.path.abspath(d)), 'models_summary.jsonl') if d else ''
    if not os.path.isfile(path):
        return {}
    out = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            for m in ('ngram', 'lstm', 'txl', 'gpt2'):
                if isinstance(r.get(m), (int, float)):
                    out.setdefault(m, {})[r['UID']] = float(r[m])
    return out


def blimp_compare(C, names, dirs, res):
    """Per arm: BLiMP overall (the mean of paradigm accuracies; mean over seeds, s.e. over seeds and
    pairs by bootstrap), its paired difference with the baseline (same seed index, same pairs), the
    fields and paradigms (mean over seeds)."""
    b0 = res[dirs['baseline'][0]]
    uids = sorted(b0['paradigms'])
    pairs = [(u, i) for u in uids for i in sorted(b0['correct'][u], key=lambda x: (len(x), x))]
    w = np.array([len(pairs) / (len(uids) * len(b0['correct'][u])) for u, _ in pairs])  # paradigms weigh the same
    mat = lambda n: np.array([[res[d]['correct'][u][i] for u, i in pairs] for d in dirs[n]], dtype=np.float64) * w
    ones = np.ones(len(pairs))
    B = mat('baseline')
    rows = []
    for n in names:
        A = mat(n)
        mean, se = boot_se(A, ones, C.eff_boot)
        S = min(len(A), len(B))
        delta, dse = boot_se(A[:S] - B[:S], ones, C.eff_boot) if n != 'baseline' else (None, None)
        rs = [res[d] for d in dirs[n]]
        rows.append(dict(arm=n, label=ARMS[n]['label'], seeds=len(A), overall=mean, overall_se=se,
                         overall_seeds=[r['overall'] for r in rs], delta=delta, delta_se=dse,
                         fields={f: float(np.mean([r['fields'][f] for r in rs])) for f in rs[0]['fields']},
                         paradigms={u: float(np.mean([r['paradigms'][u] for r in rs])) for u in uids},
                         likelihood=rs[0].get('likelihood'), policy=rs[0].get('policy'),
                         wall_s=float(np.mean([r.get('wall_s') or 0 for r in rs]))))
    pub = published_blimp(C)
    field_of = b0['field_of']
    published = {m: dict(overall=float(np.mean([v[u] for u in uids])),
                         fields={f: float(np.mean([v[u] for u in uids if field_of[u] == f])) for f in rows[0]['fields']},
                         paradigms={u: v[u] for u in uids})
                 for m, v in pub.items() if all(u in v for u in uids)}
    return dict(rows=rows, pairs=len(pairs), paradigms=len(uids), published=published, field_of=field_of)


PUBLISHED_NAMES = dict(ngram='5-gram', lstm='LSTM', txl='Transformer-XL', gpt2='GPT-2 (1.5B)')


def print_blimp(cmp):
    fields = list(cmp['rows'][0]['fields'])
    pct = lambda m, s, sign='': '-' if m is None else f"{m:{sign}.4f}" + (f" ± {s:.4f}" if s else '')
    cells = [dict(label=r['label'], acc=pct(r['overall'], r['overall_se']), delta=pct(r['delta'], r['delta_se'], '+'),
                  by=r['likelihood'] or r['policy'], **{f: r['fields'][f] for f in fields}) for r in cmp['rows']]
    cells += [dict(label=f"published: {PUBLISHED_NAMES[m]}", acc=f"{p['overall']:.4f}", delta='', by='',
                   **{f: p['fields'][f] for f in fields}) for m, p in cmp['published'].items()]
    table(cells, [('label', 'arm', ''), ('acc', 'BLiMP ± s.e.', ''), ('delta', 'Δ vs baseline (paired)', '')]
          + [(f, f, '.3f') for f in fields] + [('by', 'scored by', '')])
    print(f"{cmp['pairs']} pairs in {cmp['paradigms']} paradigms; mean over seeds; s.e.: bootstrap over seeds and "
          "pairs; Δ paired by seed index and pair. Published models: the same paradigms, all 1,000 pairs each.")


def blimp_paradigm_table(cmp):
    """Markdown: every paradigm's accuracy per arm beside the published models'."""
    arms, pubs = cmp['rows'], list(cmp['published'])
    head = ['paradigm', 'field'] + [r['arm'] for r in arms] + [PUBLISHED_NAMES[m] for m in pubs]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for u in sorted(cmp['field_of'], key=lambda u: (cmp['field_of'][u], u)):
        lines.append('| ' + ' | '.join([u, cmp['field_of'][u]] + [f"{r['paradigms'][u]:.3f}" for r in arms]
                                       + [f"{cmp['published'][m]['paradigms'][u]:.3f}" for m in pubs]) + ' |')
    return '\n'.join(lines) + '\n'


def blimp_curve(C, run_dir, tokens_per_iter):
    """[(training tokens, BLiMP overall)] over the kept snapshots of a run and its final checkpoint."""
    import glob
    pts = []
    for f in sorted(glob.glob(os.path.join(run_dir, 'ckpt_[0-9]*.pt'))):
        it = int(os.path.basename(f)[5:-3])
        pts.append((it * tokens_per_iter, blimp_scores(C, f)['overall']))
    return pts


def run_blimp(C, names, dirs, root, tokens_per_iter):
    t0 = time.time()
    res = {d: blimp_scores(C, d) for n in names for d in dirs[n]}
    cmp = blimp_compare(C, names, dirs, res)
    print(f"\nBLiMP ({time.time() - t0:.0f}s)")
    print_blimp(cmp)
    md_path = os.path.join(root, 'blimp_paradigms.md')
    write_atomic(md_path, blimp_paradigm_table(cmp))
    print(f"per paradigm: {md_path}")
    snap = [n for n in C.blimp_snapshots.split(',') if n]
    if snap:
        cmp['curves'] = {n: blimp_curve(C, dirs[n][0], tokens_per_iter) for n in snap}
        for n, pts in cmp['curves'].items():
            print(f"BLiMP against tokens, {n}: " + ', '.join(f"{t / 1e6:.1f}M {v:.4f}" for t, v in pts))
    cmp['wall_s'] = time.time() - t0
    for r in cmp['rows']:
        r.pop('paradigms')  # in blimp_paradigms.md; the JSON keeps the summary
    return cmp


def print_runs(runs):
    rows = [dict(run=ARMS[n]['label'], **{k: v for k, v in r.items() if k != 'curve'},
                 **{k + '_cell': reach_cell(r, k) for k in ('frac_tokens_to_baseline_nll',
                                                            'frac_tokens_to_baseline_acc_honest',
                                                            'frac_tokens_to_baseline_loss',
                                                            'frac_tokens_to_baseline_acc',
                                                            'frac_tokens_to_baseline_bpb')})
            for n, r in runs.items()]
    table(rows, [('run', 'run', ''), ('final_val_loss', 'val loss', '.4f'), ('final_val_nll', 'val_nll', '.4f'),
                 ('final_val_bpb', 'val_bpb', '.4f'), ('final_val_bytes_per_token', 'bytes/token', '.3f'),
                 ('frac_tokens_to_baseline_bpb_cell', 'to base bpb', ''),
                 ('final_val_acc', 'acc', '.4f'), ('final_val_acc_honest', 'acc (past only)', '.4f'),
                 ('final_val_acc_word_start', 'acc word-start', '.4f'),
                 ('final_val_acc_word_cont', 'acc word-cont', '.4f'),
                 ('frac_tokens_to_baseline_nll_cell', 'to base val_nll', ''),
                 ('frac_tokens_to_baseline_acc_honest_cell', 'to base acc (past only)', ''),
                 ('frac_tokens_to_baseline_loss_cell', 'to base loss (paper)', ''),
                 ('frac_tokens_to_baseline_acc_cell', 'to base acc (paper)', ''), ('wall_s', 'wall s', '.0f')])
    print("val_nll: NLL per token of the val text as a generative model of text alone (self-predicting runs: "
          "the marginal over their next tags); '-' (and n/a) for runs that read tags depending on tokens they "
          "have not seen (full tags, LIME+1's oracle next-token tags, shuffled tags). 'to base ...': fraction of "
          "the baseline's tokens to reach its final value; the paper's columns use val_loss/val_acc whatever the "
          "run reads (a meta_predict run's val_loss/val_acc are read with the data's next tags). '-' = never "
          "reached. val_bpb: val_nll in bits per UTF-8 byte of the val targets, the one number comparable across "
          "tokenizations: baseline_plain is compared on it alone.")


# -----------------------------------------------------------------------------
# steering: LIME+1 with oracle hints vs <unk> hints vs the baseline; hinted generation

def ensure_ckpt(C, run_dir, name):
    if os.path.isfile(run_dir) or os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):  # a checkpoint file, or a run
        return
    print(f"{run_dir}/ckpt.pt not found: training run '{name}' now", flush=True)
    ensure_eff_dataset(C)
    train_runs(C, [(name, run_dir)])


@torch.no_grad()
def steering_accuracy(C, models, val, streams, T):
    """Next-token accuracy and loss on fixed val windows for the LIME+1 model with oracle hints
    (the true next token's tags), with every tag <unk>, and for the baseline (same windows); for a
    self-predicting model (models['predict']) with the data's next tags (an oracle too) and with its
    heads' own argmax tags (from the past alone)."""
    from common import eval_starts
    starts = eval_starts(val.n, T, C.steer_windows)
    ctx = autocast(C.device, C.dtype)
    arms = ['oracle_hints', 'unk_hints', 'baseline'] + (['predict_oracle_tags', 'predict_own_tags']
                                                         if 'predict' in models else [])
    acc = {k: [0, 0.0] for k in arms}
    n_tok = 0
    for j in range(0, len(starts), 16):
        x, y, meta = val.windows(starts[j:j + 16], T)  # meta: LIME+1's, the next token's tags
        x, y = x.to(C.device), y.to(C.device)
        meta = {s: m.to(C.device) for s, m in meta.items()}
        unk = {s: torch.full_like(m, UNK) for s, m in meta.items()}
        out = {}
        with ctx:
            out['oracle_hints'] = models['lime1'](x, meta, targets=y)
            out['unk_hints'] = models['lime1'](x, unk, targets=y)
            out['baseline'] = models['baseline'](x, None, targets=y)
            if 'predict' in models:
                pm, own_in = models['predict'], models['predict_inputs'](starts[j:j + 16], T)
                logits, loss, _, h = pm.forward_predict(x, own_in['meta'], own_in['next'], targets=y)
                out['predict_oracle_tags'] = logits, loss
                out['predict_own_tags'] = pm.forward_predict(x, own_in['meta'], targets=y, choose=pm.argmax_tags,
                                                             h=h)[:2]  # the lower blocks' output reused
        for key, (logits, loss) in out.items():
            acc[key][0] += int((logits.argmax(-1) == y).sum())
            acc[key][1] += float(loss) * y.numel()
        n_tok += y.numel()
    return {k: dict(acc=v[0] / n_tok, loss=v[1] / n_tok) for k, v in acc.items()}, len(starts)


def steering_generation(C, models, val, streams, ner):
    """Generation with hints taken from real val text (the real next tokens' tags, so the hint
    sequences follow the data's tag distribution), through sample.py's generate() (prompt tags
    computed online, causal, as a user gets them; KV cache). For each arm: the fraction of
    generated tokens whose causal tags (annotate_ids(prompt + generated, tags='causal')) equal the
    hints; for the self-predicting model without hints, equal the tags it picked itself."""
    import metadata as md
    from sample import generate
    from common import eval_starts
    P, G = C.steer_prompt, C.steer_new_tokens
    gstarts = eval_starts(val.n, P + G + 1, C.steer_samples)
    xs, _, ms = val.windows(gstarts, P + G)  # ms[s][:, t] = tag of token t+1
    prompts = xs[:, :P].tolist()
    hints = {base_stream(s): m[:, P - 1:P - 1 + G].numpy() for s, m in ms.items()}  # tags of true tokens P..P+G-1
    gen = torch.Generator(device=C.device).manual_seed(C.seed)
    greedy = C.steer_top_k == 0
    kw = dict(temperature=0 if greedy else C.steer_temperature, top_k=1 if greedy else C.steer_top_k,
              ctx=autocast(C.device, C.dtype), generator=gen, tag_generated=False)
    arms = [('hinted', 'lime1', True), ('unhinted_unk', 'lime1', False)]
    if 'predict' in models:
        arms += [('predict_hinted', 'predict', True), ('predict_unhinted', 'predict', False)]
    out = {}
    for key, name, use_hints in arms + [('baseline', 'baseline', False)]:
        model = models[name]
        mstreams = list(model.config.meta_streams) or streams
        match = {b: 0 for b in hints}
        both, sample_text = 0, None
        for b, prompt in enumerate(prompts):
            h = [{s: int(hints[base_stream(s)][b][j]) for s in mstreams} for j in range(G)] if use_hints else None
            tagger = md.CausalStream(ner) if model.config.meta_streams else None
            r = generate(model, prompt, G, tagger=tagger, hints=h, **kw)
            causal = md.annotate_ids(np.array(r['tokens']), ner=ner, tags='causal')
            own = {base_stream(s): np.array(v) for s, v in r['given'].items()}
            ok = None
            for bn in hints:
                # the target: the hints, or for the self-predicting model unhinted, its own tags
                m = causal[bn + '_causal'][P:] == (own[bn] if key == 'predict_unhinted' else hints[bn][b])
                match[bn] += int(m.sum())
                ok = m if ok is None else ok & m
            both += int(ok.sum())
            if sample_text is None:
                sample_text = md.decode_text(r['tokens'])[0]
        n = len(prompts) * G
        out[key] = dict(**{f'match_{bn}': match[bn] / n for bn in hints}, match_all=both / n, sample=sample_text,
                        target='own tags' if key == 'predict_unhinted' else 'hints')
    return out, len(prompts)


def run_steering(C):
    """LIME+1 with oracle hints vs <unk> hints vs the baseline, and the self-predicting model with
    its own tags or the hints: next-token accuracy, then hinted generation."""
    from common import Split  # train.py's val windows
    import metadata as md
    dirs = {'lime1': C.ckpt_dir or os.path.join(C.eff_dir, 'lime1'),
            'baseline': C.base_ckpt_dir or os.path.join(C.eff_dir, 'baseline')}
    if C.steer_predict:
        # the self-predicting run beside the LIME+1 one (eff_dir/lime1_predict by default)
        run = dirs['lime1'] if not os.path.isfile(dirs['lime1']) else os.path.dirname(os.path.abspath(dirs['lime1']))
        d = C.predict_ckpt_dir or os.path.join(os.path.dirname(os.path.abspath(run)), 'lime1_predict')
        if C.predict_ckpt_dir or not C.ckpt_dir or os.path.isfile(checkpoint_path(d)):
            dirs['predict'] = d
        else:
            print(f"{d}/ckpt.pt not found: the self-predicting arms are skipped (--predict_ckpt_dir=DIR)")
    models, cks = {}, {}
    for k, d in dirs.items():
        ensure_ckpt(C, d, {'predict': 'lime1_predict'}.get(k, k))
        models[k], cks[k] = load_model(d, C.device)  # weights_only: a checkpoint never runs code
    ck = cks['lime1']
    if ck['model_args'].get('meta_shift') != 1:
        fail(f"{checkpoint_path(dirs['lime1'])} is not a LIME+1 model (meta_shift={ck['model_args'].get('meta_shift')})")
    if 'predict' in cks and not cks['predict']['model_args'].get('meta_predict'):
        fail(f"{checkpoint_path(dirs['predict'])} is not a self-predicting model (meta_predict=False)")
    streams = list(ck['model_args']['meta_streams'])
    data_dir = ck['config']['data_dir']
    ds = ck.get('dataset') or json.load(open(os.path.join(data_dir, 'meta.json')))
    for k in cks:
        if cks[k].get('dataset', {}).get('tokenizer') != ds.get('tokenizer'):
            fail(f"{dirs[k]}: checkpoint uses another tokenizer than {dirs['lime1']}")
    T = ck['model_args']['block_size']
    if C.steer_prompt + C.steer_new_tokens > T:
        fail(f"steer_prompt + steer_new_tokens = {C.steer_prompt + C.steer_new_tokens} "
             f"> block_size {T}")
    val = Split(data_dir, 'val', streams, 1)
    if 'predict' in models:
        pval = Split(cks['predict']['config']['data_dir'], 'val', list(models['predict'].config.meta_streams), 0)
        models['predict_inputs'] = lambda st, T: dict(
            meta={s: m.to(C.device) for s, m in pval.windows(st, T)[2].items()},
            next={s: m.to(C.device) for s, m in pval.next_tags(st, T).items()})
    md.set_tokenizer(ds['tokenizer'])
    accuracy, n_windows = steering_accuracy(C, models, val, streams, T)
    t0 = time.time()
    generation, n_samples = steering_generation(C, models, val, streams, ds.get('ner', 'binary'))
    print()
    table([dict(arm=k, **v) for k, v in accuracy.items()],
          [('arm', 'next-token (val)', ''), ('acc', 'acc', '.4f'), ('loss', 'loss', '.4f')])
    print()
    bases = [base_stream(s) for s in streams]
    table([dict(arm=k, **v) for k, v in generation.items()],
          [('arm', 'generation', ''), ('target', 'matched against', '')] +
          [(f'match_{b}', f'{b} match', '.3f') for b in bases] + [('match_all', 'all match', '.3f')])
    print("oracle_hints and predict_oracle_tags read the true next token's tags (the future); "
          "predict_own_tags and predict_unhinted use only the model's own tags.")
    return dict(accuracy=accuracy, generation=generation, ckpt_dir=dirs['lime1'],
                base_ckpt_dir=dirs['baseline'], predict_ckpt_dir=dirs.get('predict'), data_dir=data_dir,
                streams=streams, windows=n_windows,
                samples=n_samples, prompt_tokens=C.steer_prompt, new_tokens=C.steer_new_tokens,
                top_k=C.steer_top_k, meta_dropout=ck['config'].get('meta_dropout', 0.0),
                generation_s=time.time() - t0, generator='sample.generate (prompt tags causal/online, KV cache)',
                greedy=C.steer_top_k == 0,
                notes=("hints = full tags of the real next tokens of val windows; match = the causal tags "
                       "(metadata.annotate_ids(prompt+generated, tags='causal')) of each generated token equal "
                       "its hint (predict_unhinted: the tags the model picked for it). unhinted_unk feeds <unk> "
                       "as every hint (meaningful only if the model was trained with meta_dropout > 0); "
                       "baseline = the baseline model, compared to the same hints."))


# -----------------------------------------------------------------------------
# downstream: cloze and arithmetic accuracy per model and tag policy (harness.py; lm-eval)

def ensure_downstream_data(C):
    """The offline tasks (ds_task_dir, built on first use) and data_dir: NLTK's Gutenberg books (or
    data_input) plus ds_arith_problems generated arithmetic problems in lm-eval's format, none of them
    a test problem (checked on every run, against the task file); kept in data_dir + '-docs'."""
    import harness
    task = os.path.join(C.ds_task_dir, 'arithmetic.jsonl')
    if not (os.path.isfile(task) and os.path.isfile(os.path.join(C.ds_task_dir, 'cloze.jsonl'))):
        harness.build_task_dir(C.ds_task_dir, C.ds_cloze_n, C.ds_arith_n, C.ds_task_seed)  # its errors: one line
    test = [json.loads(line) for line in open(task)]
    docs = C.data_dir.rstrip('/') + '-docs'
    arith = os.path.join(docs, 'arithmetic.jsonl')
    if not os.path.isfile(os.path.join(C.data_dir, 'meta.json')):
        if not C.build_data:
            fail(f"{C.data_dir}/meta.json: not found (set --build_data=True)")
        tmp = f"{docs}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        if not C.data_input:  # the default corpus, as files (prepare.py reads it with the problems)
            from nltk.corpus import gutenberg
            for f in gutenberg.fileids():
                with open(os.path.join(tmp, f), 'w', encoding='utf-8') as fo:
                    fo.write(gutenberg.raw(f))
        with open(os.path.join(tmp, 'arithmetic.jsonl'), 'w') as fo:
            for d in harness.arithmetic_train(C.ds_arith_problems, test, C.ds_task_seed, per_doc=500):
                fo.write(json.dumps({'text': d}) + '\n')
        if os.path.isdir(docs):
            import shutil
            shutil.rmtree(docs)
        os.replace(tmp, docs)
        build_dataset(C.data_dir, ['--ner', 'binary', '--tags', 'full,causal', '--tokenizer', C.data_tokenizer,
                                   '--input', docs] + (C.data_input.split(',') if C.data_input else []))
    # held apart: no test problem (question and answer) in the training documents
    if os.path.isfile(arith):
        held = {d['context'] + d['completion'] for d in test}
        seen = {p for line in open(arith) for p in json.loads(line)['text'].split('\n\n')}
        if held & seen:
            fail(f"{arith}: {len(held & seen)} test problems of {task} are in the training documents "
                 f"(rebuild {C.data_dir} after changing the tasks)")
    return json.load(open(os.path.join(C.data_dir, 'meta.json'))), test


def by_kind(samples, metric):
    """{kind: mean of metric} over lm-eval's per-document samples (arithmetic: 1da, 1ds, ... 3ds)."""
    acc = {}
    for x in samples:
        acc.setdefault(x['doc'].get('kind', '?'), []).append(float(x[metric]))
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def run_downstream(C):
    """Train ds_runs on the default corpus with arithmetic mixed in, then run harness.py's offline
    tasks on each run under every tag policy that applies to it: cloze accuracy and the final word's
    log-likelihood, arithmetic exact match by generation (unhinted; hinted CD for LIME+1 and
    meta_predict), and lm-eval's arithmetic metric (greedy continuation, a log-likelihood request)."""
    import harness
    t0 = time.time()
    info, test = ensure_downstream_data(C)
    names = [n for n in C.ds_runs.split(',') if n]
    for n in names:
        if n not in ARMS or ARMS[n].get('tokenization') or ARMS[n].get('meta_shuffle'):
            fail(f"ds_runs: {n!r} is not a run downstream can score "
                 f"({', '.join(k for k, v in ARMS.items() if not v.get('tokenization') and not v.get('meta_shuffle'))})")
    res = train_runs(C, [(n, os.path.join(C.eff_dir, n)) for n in names])
    res = {n: res[os.path.join(C.eff_dir, n)] for n in names}
    t_train = time.time() - t0
    tasks = [t for t in C.ds_tasks.split(',') if t]
    rows, kinds = [], {}
    t1 = time.time()
    for n in names:
        sc = harness.Scorer(os.path.join(C.eff_dir, n), '', C.device, 16, C.dtype)
        for pol in harness.POLICIES[sc.kind]:
            sc.set_policy(pol)
            hinted_ok = sc.kind in ('lime1', 'predict')
            ts = [t for t in tasks if hinted_ok or not t.endswith('_hinted')]  # others ignore hints: same as unhinted
            te = time.time()
            out = harness.evaluate(harness.make_lm(scorer=sc), ts, C.ds_task_dir, C.ds_limit, -1, 1000,
                                   log_samples=True)
            r, smp = out['results'], out.get('samples', {})
            get = lambda t, k: r.get(t, {}).get(k)
            ppl = get('lime_cloze', 'perplexity,none')
            row = dict(run=n, label=ARMS[n].get('ds_label', ARMS[n]['label']), model=harness.KIND_NAMES[sc.kind], policy=pol,
                       reads_future=sc.oracle, cloze_acc=get('lime_cloze', 'acc,none'), cloze_ppl=ppl,
                       cloze_ll=-math.log(ppl) if ppl else None,
                       arith_em=get('lime_arithmetic', 'exact_match,strip'),
                       arith_em_hinted=get('lime_arithmetic_hinted', 'exact_match,strip'),
                       arith_ll_acc=get('lime_arithmetic_ll', 'acc,none'), eval_s=time.time() - te)
            for t, key, m in (('lime_arithmetic', 'arith_em', 'exact_match'),
                              ('lime_arithmetic_hinted', 'arith_em_hinted', 'exact_match'),
                              ('lime_arithmetic_ll', 'arith_ll_acc', 'acc')):
                if t in smp:
                    kinds[(n, pol, key)] = by_kind(smp[t], m)
                    row[key + '_by_kind'] = kinds[(n, pol, key)]
            rows.append(row)
            print(f"{n} [{pol}]: " + ', '.join(f"{k} {row[k]:.4f}" for k in ('cloze_acc', 'cloze_ll', 'arith_em',
                                                                           'arith_em_hinted', 'arith_ll_acc')
                                              if row[k] is not None) + f" ({row['eval_s']:.0f}s)", flush=True)
    print()
    for x in rows:
        x['policy_cell'] = x['policy'] + (' (ORACLE)' if x['reads_future'] else '')
    table(rows, [('label', 'model', ''), ('policy_cell', 'tags', ''), ('cloze_acc', 'cloze acc', '.4f'),
                 ('cloze_ll', 'cloze ll (nats)', '.3f'), ('arith_em', 'arith EM', '.4f'),
                 ('arith_em_hinted', 'arith EM, hint CD', '.4f'), ('arith_ll_acc', 'arith acc (lm-eval)', '.4f')])
    print("tags: causal = the causal tags of the text so far (LIME+1: <unk> at scored positions); predict = the "
          "model's own next tags (cloze ll: its marginal over them, harness.py's marginal_k); oracle = the continuation's own "
          "tags (reads the future); unk = every tag <unk>. arith EM: exact match of the generated answer; hint CD: "
          "the first answer token hinted CD (a number, known from the task format); arith acc (lm-eval): the "
          "greedy continuation is the answer ('-': generation has no oracle, hints only for LIME+1/meta_predict).")
    kind_rows = [dict(label=x['label'], policy_cell=x['policy_cell'], **{k: v for k, v in x['arith_em_by_kind'].items()})
                 for x in rows if x.get('arith_em_by_kind')]
    if kind_rows:
        ks = sorted({k for x in kind_rows for k in x if k not in ('label', 'policy_cell')})
        print()
        table(kind_rows, [('label', 'arith EM by kind', ''), ('policy_cell', 'tags', '')] + [(k, k, '.3f') for k in ks])
    ds = {n: res[n][0][-1] for n in names}
    return dict(rows=rows, data_dir=C.data_dir, task_dir=C.ds_task_dir, tasks=tasks, eff_dir=C.eff_dir,
                runs={n: dict(final_val_loss=ds[n]['val_loss'], final_val_nll=ds[n].get('val_nll'),
                              final_val_bpb=ds[n].get('val_bpb'), wall_s=res[n][1]) for n in names},
                train_tokens=info.get('train_tokens'), arith_problems=C.ds_arith_problems,
                test_problems=len(test), max_iters=C.max_iters, train_s=t_train, eval_s=time.time() - t1,
                wall_s=time.time() - t0, train_args=train_args(C, 'baseline', 'OUT'))


# -----------------------------------------------------------------------------
# gpu_check: the efficiency runs, then steering on their checkpoints (sized by the config file)

def run_gpu_check(C):
    """The efficiency runs (every arch of eff_archs), then steering on each arch's LIME+1,
    self-predicting and baseline checkpoints."""
    from types import SimpleNamespace
    t0 = time.time()
    out = dict(efficiency=run_efficiency(C))
    if 'lime1' in C.eff_runs.split(','):
        out['steering'] = {}
        for arch, res in out['efficiency']['archs'].items():
            root = res['eff_dir']
            out['steering'][arch] = run_steering(SimpleNamespace(**{
                **vars(C), 'arch': arch, 'ckpt_dir': os.path.join(root, 'lime1'),
                'base_ckpt_dir': os.path.join(root, 'baseline')}))
    out['wall_s'] = time.time() - t0
    return out


# -----------------------------------------------------------------------------

def main(argv):
    from types import SimpleNamespace
    # curves: run directories may be given as plain arguments (config files are files, not directories)
    run_dirs = [a for a in argv if not a.startswith('--') and os.path.isdir(a)]
    cfg = configure([a for a in argv if a not in run_dirs])
    C = SimpleNamespace(**cfg)
    if run_dirs and C.mode != 'curves':
        fail(f"{run_dirs[0]}: a directory is only an argument of --mode=curves")
    setup_torch(C)
    t0 = time.time()
    print(f"experiments mode={C.mode} arch={C.arch} device={C.device} dtype={C.dtype} compile={C.compile}", flush=True)
    run = {'efficiency': run_efficiency, 'tightness': run_tightness, 'steering': run_steering, 'curves': lambda C: run_curves(C, run_dirs),
           'downstream': run_downstream, 'gpu_check': run_gpu_check}[C.mode]
    write_result(C, cfg, run(C), t0)


if __name__ == '__main__':
    sys.exit(run_main('experiments.py', main, sys.argv[1:]))
