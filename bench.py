"""
Benchmarks for LIME: what the metadata costs, what it buys, and how well LIME+1 hints steer.

$ python bench.py --mode=throughput                        # train-step tokens/s, param overhead, MFU
$ python bench.py --mode=throughput --arch=gemma           # the same on the Gemma-style model
$ python bench.py --mode=tagging                           # annotation words/s: fast path vs plain NLTK
$ python bench.py --mode=startup                           # how soon a fresh process tags (cached models)
$ python bench.py configs/bench_efficiency_cpu.py          # baseline vs LIME variants, same data/steps
$ python bench.py --mode=steering --ckpt_dir=out-bench-eff/lime1
$ python bench.py configs/bench_downstream_cpu.py            # cloze/arithmetic accuracy per model and tag policy
$ python bench.py configs/bench_gpu_check.py               # one short GPU smoke test of all of the above

Every module-level name below is a config key; config files (python, exec'd) and --key=value
flags override them in command-line order, unknown keys are an error (as in train.py).
Each mode prints a table and writes out_json (default out-bench/bench_<mode>.json), atomically.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from metadata import UNK

# -----------------------------------------------------------------------------
# default config values
mode = 'throughput'  # throughput | tagging | startup | efficiency | steering | curves | downstream | gpu_check
out_json = ''  # '' = out-bench/bench_<mode>.json
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False
threads = 0  # torch CPU threads for in-process modes; 0 = torch's default
# data: a prepare.py directory. The CPU presets use GPT-2's first 4096 ranks (a valid BPE) because
# the 50257-way output layer would dominate a small model's cost on CPU; built on demand if missing.
data_dir = 'data/gutenberg_4k'
data_tokenizer = 'gpt2-4096'  # only used to build data_dir when it is missing (build_data=True)
data_input = ''  # '' = NLTK's Gutenberg corpus; else comma-separated prepare.py --input paths
build_data = True
# model (throughput, efficiency)
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
vocab_size = 0  # throughput only: 0 = data_dir's vocab if it exists, else 4096
# throughput
tp_data = 'random'  # random | real (windows of data_dir; LIME+1 then reads the next token's tags)
tp_warmup = 3  # untimed steps per variant and round (the first round also absorbs compile time)
tp_steps = 10  # timed steps per variant and round
tp_rounds = 5  # rounds; variants are interleaved within each round
tp_variants = 'baseline,lime,lime1,lime1_predict'  # lime1_predict: LIME+1 with its own tag heads
peak_flops = 0.0  # for MFU; 0 = the detected GPU's bf16 peak
gc_gemma_variants = ''  # gpu_check: also time these variants on arch='gemma' (same sizes, n_kv_head above)
# tagging
tag_ner = 'binary'
tag_warm_words = 300000  # words of the corpus annotated (untimed) before the warm-cache timing
tag_time_words = 150000  # words timed for tiktoken and the fast path
tag_ref_words = 60000  # words timed for plain NLTK and the causal path (a prefix of the timed words)
tag_doc_chars = 20000  # books are cut at paragraph breaks into documents of about this many chars
tag_workers = 0  # 0 = os.cpu_count()
tag_tokenizer = 'gpt2'
tag_reference = True  # time plain NLTK too (slow)
tag_causal = True  # time the causal path too
# startup: fresh processes from the interpreter's start to one sentence's tags (metadata.py's disk
# cache as the user has it: the first process builds it if missing, reported apart)
startup_runs = 12
startup_text = 'The old man the boat.'
# efficiency
eff_runs = 'baseline,lime,lime_causal,lime1,lime1_predict,shuffled,baseline_seed2,baseline_plain'
plain_data_dir = ''  # baseline_plain: data_dir's documents and split prepared with --tokenization plain; '' = data_dir + '_plain' (built on first use)
eff_dir = 'out-bench-eff'  # each run trains in eff_dir/<run>
eff_reuse = True  # skip a run whose eff_dir/<run> finished with identical arguments
max_iters = 1000
eval_interval = 100
eval_iters = 10
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
weight_decay = 0.1
gradient_accumulation_steps = 1
eff_n_layer = 0  # model of the efficiency runs; 0 = the model keys above (gpu_check: a small
eff_n_head = 0  # model for the short runs, next to a 124M throughput test)
eff_n_embd = 0
eff_block_size = 0
eff_batch_size = 0
lime1_meta_dropout = 0.0  # the paper's LIME+1 trains without; >0 teaches the model what <unk> (no hint) means
meta_inject_layer = 0  # lime1_predict runs: the block after which the next tags are predicted and added; 0 = n_layer // 2
marginal_positions = 1024  # lime1_predict: val positions where the bound is compared with the next-tag marginal
launcher = ''  # prefix for train.py instead of the python running bench, e.g. 'torchrun --standalone --nproc_per_node=8'
eff_parallel = 1  # training processes at once (CPU: 2 one-thread runs beat 1 two-thread run)
train_threads = 0  # OMP_NUM_THREADS for the training subprocesses; 0 = inherit
plot = True  # eff_dir/curves.png when matplotlib is installed
# downstream: train ds_runs on data_dir (the default corpus plus generated arithmetic problems, none of
# them a test problem), then score each with harness.py's offline tasks under every tag policy it has
ds_runs = 'baseline,lime_causal,lime1,lime1_predict,baseline_seed2'
ds_task_dir = 'tasks/lime'  # built here (harness.py --build_tasks) when missing
ds_tasks = 'lime_cloze,lime_arithmetic,lime_arithmetic_hinted,lime_arithmetic_ll'
ds_arith_problems = 20000  # arithmetic problems mixed into the training corpus (50 per document)
ds_cloze_n = 500  # harness.py cloze_n / arith_n / task_seed for the tasks built here
ds_arith_n = 50
ds_task_seed = 1234
ds_limit = 0  # examples per task; 0 = all
# curves: python bench.py --mode=curves RUN_DIR [RUN_DIR ...]
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
ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ('throughput', 'tagging', 'startup', 'efficiency', 'steering', 'curves', 'downstream', 'gpu_check')
PAPER_FRACTION = 0.4365  # the paper's headline: LIME reaches the baseline's loss with 43.65% of its tokens


def fail(msg):
    raise SystemExit(msg)


def configure(argv):
    """Config files and --key=value flags over the defaults above, with train.py's checks."""
    from train import configure as train_configure
    cfg, _ = train_configure(argv, DEFAULTS)
    if cfg['mode'] not in MODES:
        fail(f"config error: mode must be one of {', '.join(MODES)}, got {cfg['mode']!r}")
    if cfg['dtype'] not in ('float32', 'bfloat16', 'float16'):
        fail(f"config error: dtype must be float32, bfloat16 or float16, got {cfg['dtype']!r}")
    if cfg['startup_runs'] < 1:
        fail(f"config error: startup_runs must be >= 1, got {cfg['startup_runs']}")
    return cfg


# -----------------------------------------------------------------------------
# small helpers

def finite(obj):
    """JSON-safe copy: NaN/inf -> None (json.dump would write invalid JSON), numpy -> python."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj):
    # write then rename: a reader never sees a half-written result
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, 'w') as f:
        json.dump(finite(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def table(rows, cols):
    """Print a list of dicts as an aligned text table; cols = [(key, header, format)]."""
    def cell(v, fmt):
        if v is None:
            return '-'
        return format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)
    cells = [[h for _, h, _ in cols]] + [[cell(r.get(k), f) for k, _, f in cols] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, c in enumerate(cells):
        print('  '.join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(c)))
        if j == 0:
            print('  '.join('-' * x for x in w))


def env_info(C):
    info = dict(python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__,
                device=C.device, dtype=C.dtype, compile=C.compile, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    if C.device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def ensure_dataset(C):
    """data_dir must hold train/val tokens with the full and causal streams; build it with
    prepare.py (a subprocess) if it is missing and build_data allows."""
    meta = os.path.join(C.data_dir, 'meta.json')
    if os.path.isfile(meta):
        return json.load(open(meta))
    if not C.build_data:
        fail(f"{meta}: not found (build it with prepare.py, or set --build_data=True)")
    return build_dataset(C.data_dir, ['--ner', 'binary', '--tags', 'full,causal', '--tokenizer', C.data_tokenizer]
                         + (['--input'] + C.data_input.split(',') if C.data_input else []))


def build_dataset(out_dir, args):
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), *args, '--out_dir', out_dir]
    print('building the dataset:', ' '.join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        fail(f"prepare.py failed (exit {r.returncode}) building {out_dir}")
    print(f"built {out_dir} in {time.time() - t0:.0f}s", flush=True)
    return json.load(open(os.path.join(out_dir, 'meta.json')))


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


def autocast_ctx(C):
    if not C.device.startswith('cuda'):
        return nullcontext()  # CPU runs in float32 (bf16 autocast on CPU is slower, not faster)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[C.dtype]
    return torch.amp.autocast(device_type='cuda', dtype=ptdtype)


def sync(C):
    if C.device.startswith('cuda'):
        torch.cuda.synchronize()


def arch_args(C):
    """The architecture keys of a bench config, as train.py and GPTConfig take them."""
    return dict(arch=C.arch, n_kv_head=C.n_kv_head if C.arch == 'gemma' else 0, mlp_hidden=C.mlp_hidden)


# -----------------------------------------------------------------------------
# throughput: training-step tokens/s of baseline, LIME and LIME+1 on identical batches

TP_VARIANTS = ('baseline', 'lime', 'lime1', 'lime1_predict')


def run_throughput(C):
    from model import GPT, GPTConfig
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    streams = ('pos', 'ner')
    info = None
    if C.tp_data == 'real' or (C.vocab_size == 0 and os.path.isfile(os.path.join(C.data_dir, 'meta.json'))):
        info = ensure_dataset(C) if C.tp_data == 'real' else json.load(open(os.path.join(C.data_dir, 'meta.json')))
    V = C.vocab_size or (info['vocab_size'] if info else 4096)
    n_tags = tuple(len(info['streams'][s]['tags']) for s in streams) if info else (48, 6)
    B, T = C.batch_size, C.block_size
    n_batches = C.tp_warmup + C.tp_steps
    g = torch.Generator().manual_seed(C.seed)

    # the same batches for every variant; LIME+1 only differs in which tags it reads
    def batches(shift):
        if C.tp_data == 'real':
            if info is None or 'pos' not in info['streams']:
                fail(f"{C.data_dir}: no pos/ner streams for --tp_data=real")
            from train import Split
            if V != info['vocab_size']:
                fail(f"config error: vocab_size={V} but {C.data_dir} has {info['vocab_size']}")
            sp = Split(C.data_dir, 'train', streams, shift)
            starts = torch.randint(sp.n - T - 1, (n_batches, B), generator=torch.Generator().manual_seed(C.seed))
            return [sp.windows(s.tolist(), T) for s in starts]
        out = []
        for _ in range(n_batches):
            x = torch.randint(V, (B, T + 1), generator=g)
            meta = {s: torch.randint(3, n, (B, T), generator=g) for s, n in zip(streams, n_tags)}
            out.append((x[:, :-1], x[:, 1:], meta))
        return out

    variants = [v for v in C.tp_variants.split(',') if v]
    for v in variants:
        if v not in TP_VARIANTS:
            fail(f"config error: unknown throughput variant {v!r} ({', '.join(TP_VARIANTS)})")
    data = {0: batches(0)}
    if 'lime1' in variants or 'lime1_predict' in variants:  # lime1_predict: its next tags, as inputs
        data[1] = batches(1) if C.tp_data == 'real' else data[0]  # random tags: a shift changes nothing
    data = {k: [(x.to(C.device), y.to(C.device), {s: m.to(C.device) for s, m in meta.items()})
                for x, y, meta in v] for k, v in data.items()}

    ctx = autocast_ctx(C)
    scaler_on = C.dtype == 'float16' and C.device.startswith('cuda')
    runs = {}
    for v in variants:
        torch.manual_seed(C.seed)  # same init: LIME = baseline weights + metadata tables
        ms = streams if v != 'baseline' else ()
        try:
            cfg = GPTConfig(n_layer=C.n_layer, n_head=C.n_head, n_embd=C.n_embd, block_size=T, bias=C.bias,
                            dropout=C.dropout, vocab_size=V, meta_streams=ms, meta_n_tags=n_tags[:len(ms)],
                            meta_shift=1 if v == 'lime1' else 0, meta_predict=v == 'lime1_predict',
                            meta_inject_layer=(C.meta_inject_layer or C.n_layer // 2) if v == 'lime1_predict' else 0,
                            **arch_args(C))
        except ValueError as e:
            fail(f"config error: {e}")
        raw = GPT(cfg).to(C.device)
        opt = raw.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cuda' if C.device.startswith('cuda') else 'cpu')
        model = torch.compile(raw) if C.compile else raw
        scaler = torch.amp.GradScaler('cuda', enabled=scaler_on)
        runs[v] = dict(raw=raw, model=model, opt=opt, scaler=scaler, shift=1 if v == 'lime1' else 0,
                       predict=v == 'lime1_predict',
                       tps=[], dt=[], n_params=raw.get_num_params(), n_meta=raw.get_num_meta_params())

    def step(r, batch, next_batch):
        x, y, meta = batch
        with ctx:  # a self-predicting model reads its tags and learns the next token's (teacher-forced)
            _, loss = r['model'](x, meta if r['n_meta'] else None, targets=y,
                                 next_meta=next_batch[2] if r['predict'] else None)
        r['scaler'].scale(loss).backward()
        r['scaler'].unscale_(r['opt'])
        torch.nn.utils.clip_grad_norm_(r['raw'].parameters(), 1.0)
        r['scaler'].step(r['opt'])
        r['scaler'].update()
        r['opt'].zero_grad(set_to_none=True)
        return loss

    t_first = {}
    for rnd in range(C.tp_rounds):
        # interleaved, and the order rotates each round, so slow drifts (thermal, other
        # processes on a shared box) hit every variant alike
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            r, bs = runs[v], data[runs[v]['shift']]
            t0 = time.perf_counter()
            nbs = data[1] if r['predict'] else bs
            for i in range(C.tp_warmup):
                step(r, bs[i], nbs[i])
            sync(C)
            if rnd == 0:
                t_first[v] = time.perf_counter() - t0  # includes compilation
            t0 = time.perf_counter()
            for i in range(C.tp_steps):
                loss = step(r, bs[C.tp_warmup + i], nbs[C.tp_warmup + i])
            loss.item()
            sync(C)
            dt = time.perf_counter() - t0
            r['dt'].append(dt / C.tp_steps)
            r['tps'].append(B * T * C.tp_steps / dt)
        print(f"round {rnd + 1}/{C.tp_rounds}: " +
              ', '.join(f"{v} {runs[v]['tps'][-1]:,.0f} tok/s" for v in variants), flush=True)

    base = runs.get('baseline')
    rows, out = [], {}
    for v in variants:
        r = runs[v]
        med = statistics.median(r['tps'])
        mfu = r['raw'].estimate_mfu(B, statistics.median(r['dt']), C.peak_flops or None)
        res = dict(tokens_per_sec_median=med, tokens_per_sec_rounds=r['tps'],
                   tokens_per_sec_min=min(r['tps']), tokens_per_sec_max=max(r['tps']),
                   step_ms_median=1000 * statistics.median(r['dt']), mfu=mfu,
                   n_params=r['n_params'], n_meta_params=r['n_meta'],
                   meta_params_pct=100 * r['n_meta'] / r['n_params'],
                   first_round_warmup_s=t_first.get(v))
        if base:
            res['ratio_vs_baseline'] = med / statistics.median(base['tps'])
            # per-round ratios (same round = same conditions): their spread shows the noise
            res['ratio_rounds'] = [a / b for a, b in zip(r['tps'], base['tps'])]
            res['param_overhead'] = r['n_params'] - base['n_params']
            res['param_overhead_pct'] = 100 * (r['n_params'] - base['n_params']) / base['n_params']
        out[v] = res
        rows.append(dict(variant=v, **res))
    print()
    table(rows, [('variant', 'variant', ''), ('tokens_per_sec_median', 'tok/s (median)', ',.0f'),
                 ('tokens_per_sec_min', 'min', ',.0f'), ('tokens_per_sec_max', 'max', ',.0f'),
                 ('ratio_vs_baseline', 'vs baseline', '.3f'), ('step_ms_median', 'ms/step', '.1f'),
                 ('n_params', 'params', ',d'), ('param_overhead', '+params', ',d'),
                 ('param_overhead_pct', '+params %', '.4f'), ('mfu', 'MFU', '.3f')])
    return dict(variants=out, vocab_size=V, meta_n_tags=dict(zip(streams, n_tags)), batch_size=B,
                block_size=T, n_layer=C.n_layer, n_head=C.n_head, n_embd=C.n_embd, data=C.tp_data,
                arch=C.arch, n_kv_head=cfg.n_kv_head, mlp_hidden=cfg.mlp_hidden,
                warmup_steps=C.tp_warmup, timed_steps=C.tp_steps, rounds=C.tp_rounds)


# -----------------------------------------------------------------------------
# tagging: words/s of the annotation pipeline, fast path vs plain NLTK

def corpus_docs(C):
    """Documents in a fixed order: NLTK's Gutenberg books (or data_input files), each cut at
    paragraph breaks into pieces of about tag_doc_chars characters (realistic web-document
    sizes, and pieces that spread evenly over worker processes)."""
    texts = []
    if C.data_input:
        sys.path.insert(0, ROOT)
        import prepare
        texts = list(prepare.iter_texts(prepare.enumerate_documents(C.data_input.split(','))))
    else:
        from nltk.corpus import gutenberg
        texts = [gutenberg.raw(f) for f in gutenberg.fileids()]
    docs = []
    for text in texts:
        cur = []
        n = 0
        for para in text.split('\n\n'):
            cur.append(para)
            n += len(para) + 2
            if n >= C.tag_doc_chars:
                docs.append('\n\n'.join(cur))
                cur, n = [], 0
        if cur:
            docs.append('\n\n'.join(cur))
    return docs


def take_words(docs, n_words):
    """The first docs holding about n_words words (whitespace count: only for choosing docs)."""
    out, n = [], 0
    for d in docs:
        if n >= n_words:
            break
        out.append(d)
        n += len(d.split())
    return out, docs[len(out):]


# --- the jobs, run in forked child processes (fresh caches unless warmed explicitly); every
# setting is an argument: a job is job(docs, ner, reference)

def _job_tiktoken(docs, ner, reference):
    import metadata as md
    enc = md.encoding()
    t0 = time.perf_counter()
    for d in docs:
        enc.encode_ordinary(d)
    return time.perf_counter() - t0


def _job_full(docs, ner, reference):
    import metadata as md
    t0 = time.perf_counter()
    for d in docs:
        md.annotate_text(d, ner=ner, reference=reference)
    return time.perf_counter() - t0


def _job_causal(docs, ner, reference):
    import metadata as md
    # token ids come from the full annotation first (untimed), as in prepare.py, which annotates
    # a document fully and then causally: the per-word caches are warm from the same text
    ids = [md.annotate_text(d, ner=ner)[0] for d in docs]
    md.annotate_ids(ids[0][:8], ner=ner, tags='causal', reference=reference)  # loads its models
    import gc
    gc.collect()
    t0 = time.perf_counter()
    for x in ids:
        md.annotate_ids(x, ner=ner, tags='causal', reference=reference)
    return time.perf_counter() - t0


def _job_causal_ids(ids_list, ner, reference):
    import metadata as md
    t0 = time.perf_counter()
    for x in ids_list:
        md.annotate_ids(x, ner=ner, tags='causal', reference=reference)
    return time.perf_counter() - t0


def _job_count(docs, ner, reference):
    import metadata as md
    return [int(np.count_nonzero(md.annotate_text(d, ner=ner)[1]['word'] == md.WORD_B)) for d in docs]


def _child(job, docs, ner, reference, warm_docs):
    """In a fresh process: load the models (untimed, on one short sentence), optionally
    annotate warm_docs (untimed) so the per-word caches hold a corpus' worth of words, then
    time job(docs, ner, reference)."""
    import metadata as md
    md.annotate_text("Mr. Smith went to Washington.", ner=ner, reference=reference)
    for d in warm_docs:
        md.annotate_text(d, ner=ner)
    # annotation pauses the garbage collector: collect the warm-up's garbage now, not on the clock
    import gc
    gc.collect()
    return job(docs, ner, reference)


def _pool_run(job, doc_lists, ner, reference, workers):
    """All workers: one job per document list, spread over a pool of forked processes (they
    inherit the parent's caches, so a warm parent gives warm workers); wall time of the whole map."""
    import multiprocessing as mp
    with mp.get_context('fork').Pool(workers) as pool:
        pool.map(_noop, range(workers))  # start the workers before the clock
        t0 = time.perf_counter()
        pool.starmap(job, [(d, ner, reference) for d in doc_lists], chunksize=1)
        return time.perf_counter() - t0


def _noop(_):
    return None


def run_tagging(C):
    import multiprocessing as mp
    sys.path.insert(0, ROOT)
    import metadata as md
    try:
        md.set_tokenizer(C.tag_tokenizer)
        md.ensure_resources(C.tag_ner)
    except md.MetadataError as e:
        fail(str(e))
    md.encoding()  # tiktoken's tables load once here; children inherit them
    workers = C.tag_workers or os.cpu_count()
    docs = corpus_docs(C)
    warm, rest = take_words(docs, C.tag_warm_words)
    timed, _ = take_words(rest, C.tag_time_words)
    ref, _ = take_words(timed, C.tag_ref_words)
    if not timed:
        fail("tagging: the corpus has no documents left after the warm-up words (lower tag_warm_words)")
    ctx = mp.get_context('fork')

    def child(job, docs, reference=False, warm_docs=()):
        # a pool of one fresh process per measurement: every measurement starts from cold caches
        with ctx.Pool(1) as p:
            return p.apply(_child, (job, docs, C.tag_ner, reference, list(warm_docs)))

    t0 = time.time()
    counts = child(_job_count, timed)
    words_timed, words_ref = sum(counts), sum(counts[:len(ref)])
    print(f"corpus: {len(warm)} warm-up docs, {len(timed)} timed docs ({words_timed:,} words), "
          f"{len(ref)} reference docs ({words_ref:,} words); {workers} workers", flush=True)
    rows = []

    def add(name, text, procs, cache, seconds, words):
        rows.append(dict(name=name, text=text, procs=procs, cache=cache, seconds=seconds, words=words,
                         words_per_sec=words / seconds if seconds > 0 else None))
        print(f"  {name:<22} {text:<5} procs={procs} {cache:<5} {words:>9,} words {seconds:8.2f}s "
              f"{rows[-1]['words_per_sec'] or 0:>12,.0f} words/s", flush=True)

    add('tiktoken', 'timed', 1, '-', child(_job_tiktoken, timed), words_timed)
    add('full fast', 'timed', 1, 'cold', child(_job_full, timed), words_timed)
    add('full fast', 'timed', 1, 'warm', child(_job_full, timed, warm_docs=warm), words_timed)
    add('full fast', 'ref', 1, 'cold', child(_job_full, ref), words_ref)
    add('full fast', 'ref', 1, 'warm', child(_job_full, ref, warm_docs=warm), words_ref)
    if C.tag_reference:
        add('full NLTK', 'ref', 1, '-', child(_job_full, ref, reference=True), words_ref)
    if C.tag_causal:
        add('causal fast', 'ref', 1, 'warm', child(_job_causal, ref, warm_docs=warm), words_ref)
        if C.tag_reference:
            add('causal NLTK', 'ref', 1, '-', child(_job_causal, ref, reference=True), words_ref)

    # all workers: warm the parent once, then every pool forks from it (warm workers)
    if workers > 1:
        md.annotate_text("Mr. Smith went to Washington.", ner=C.tag_ner, reference=True)
        for d in warm:
            md.annotate_text(d, ner=C.tag_ner)
        import gc
        gc.collect()
        each = lambda docs: [[d] for d in docs]  # one job per document
        add('tiktoken', 'timed', workers, '-', _pool_run(_job_tiktoken, each(timed), C.tag_ner, False, workers),
            words_timed)
        add('full fast', 'timed', workers, 'warm',
            _pool_run(_job_full, each(timed), C.tag_ner, False, workers), words_timed)
        if C.tag_reference:
            add('full NLTK', 'ref', workers, '-', _pool_run(_job_full, each(ref), C.tag_ner, True, workers),
                words_ref)
        if C.tag_causal:
            # token ids from the parent (untimed): the workers time the causal annotation only
            ref_ids = [md.annotate_text(d, ner=C.tag_ner)[0] for d in ref]
            gc.collect()
            add('causal fast', 'ref', workers, 'warm',
                _pool_run(_job_causal_ids, each(ref_ids), C.tag_ner, False, workers), words_ref)

    def wps(name, text, procs, cache):
        for r in rows:
            if (r['name'], r['text'], r['procs'], r['cache']) == (name, text, procs, cache):
                return r['words_per_sec']
        return None

    speedup = {}
    ref_nltk = wps('full NLTK', 'ref', 1, '-')
    if ref_nltk:
        speedup['full_warm'] = wps('full fast', 'ref', 1, 'warm') / ref_nltk
        speedup['full_cold'] = wps('full fast', 'ref', 1, 'cold') / ref_nltk
    if wps('causal NLTK', 'ref', 1, '-') and wps('causal fast', 'ref', 1, 'warm'):
        speedup['causal_warm'] = wps('causal fast', 'ref', 1, 'warm') / wps('causal NLTK', 'ref', 1, '-')
    tk = wps('tiktoken', 'timed', 1, '-')
    fast_over_tiktoken = wps('full fast', 'timed', 1, 'warm') / tk if tk else None
    print()
    table(rows, [('name', 'pipeline', ''), ('text', 'text', ''), ('procs', 'procs', 'd'), ('cache', 'cache', ''),
                 ('words', 'words', ',d'), ('seconds', 'seconds', '.2f'), ('words_per_sec', 'words/s', ',.0f')])
    print('speedup fast/NLTK (same text, one process): ' +
          ', '.join(f"{k} {v:.1f}x" for k, v in speedup.items()))
    if fast_over_tiktoken:
        print(f"fast full annotation runs at {100 * fast_over_tiktoken:.1f}% of tiktoken's encoding speed")
    return dict(rows=rows, speedup_fast_over_nltk=speedup, fast_warm_over_tiktoken=fast_over_tiktoken,
                words_timed=words_timed, words_ref=words_ref, docs_warm=len(warm), docs_timed=len(timed),
                docs_ref=len(ref), workers=workers, ner=C.tag_ner, tokenizer=C.tag_tokenizer,
                corpus=C.data_input or 'nltk.corpus.gutenberg (fileid order)', doc_chars=C.tag_doc_chars,
                elapsed_s=time.time() - t0,
                notes=("'ref' text = the first docs of 'timed'; warm = the per-word caches first filled by "
                       "annotating the preceding warm-up docs; cold = a fresh process (models loaded, "
                       "caches empty); causal rows time annotate_ids(ids, tags='causal') after an untimed "
                       "full annotation of the same docs (as prepare.py does)."))


# -----------------------------------------------------------------------------
# startup: how soon a fresh process tags. Per run (interleaved): `python -c pass` (Python's own
# start-up, for scale), the metadata.py CLI on one sentence end to end, and a process that times
# each step from the interpreter's start to that sentence's tags.

_STARTUP_STEPS = r"""
import json, sys, time
t0 = t = time.perf_counter()
laps = {}
def lap(name):
    global t
    now = time.perf_counter()
    laps[name], t = now - t, now
text, ner = sys.argv[1:3]
import numpy; lap('import numpy')
import metadata as md; lap('import metadata')
md.ensure_resources(ner); lap('import nltk')
md._sentence_tokenizer(); lap('punkt')
md._pos_tagger(False); lap('POS tagger')
if ner != 'none':
    md._ne_chunker(ner, False); lap('NE chunker')
md.encoding(); lap('GPT-2')
md.annotate_text(text, ner=ner); lap('first sentence')
laps['ready to tag'] = t - t0
print(json.dumps(dict(laps=laps, nltk_modules=sum(m.split('.')[0] == 'nltk' for m in sys.modules))))
"""


def run_startup(C):
    def wall(cmd, stdin=None):
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True)
        if r.returncode:
            fail(f"startup: {' '.join(cmd[:2])[:60]} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return time.perf_counter() - t, r.stdout

    steps = [sys.executable, '-c', _STARTUP_STEPS, C.startup_text, C.tag_ner]
    cli = [sys.executable, 'metadata.py', '--ner', C.tag_ner]
    first_cli, _ = wall(cli, C.startup_text)   # builds the disk cache if it is missing
    times = {'python -c pass': [], 'metadata.py CLI, one sentence': []}
    nltk_modules = set()
    for _ in range(C.startup_runs):
        times['python -c pass'].append(wall([sys.executable, '-c', 'pass'])[0])
        times['metadata.py CLI, one sentence'].append(wall(cli, C.startup_text)[0])
        got = json.loads(wall(steps)[1])
        for k, v in got['laps'].items():
            times.setdefault(k, []).append(v)
        nltk_modules.add(got['nltk_modules'])
    rows = [dict(step=k, min_s=min(v), median_s=statistics.median(v), max_s=max(v)) for k, v in times.items()]
    print(f"\n{C.startup_runs} runs each (wall seconds; the steps are timed inside one process, from the "
          f"interpreter's start); the first CLI run: {first_cli:.2f} s")
    table(rows, [('step', 'step', ''), ('min_s', 'min s', '.3f'), ('median_s', 'median s', '.3f'),
                 ('max_s', 'max s', '.3f')])
    print(f"NLTK modules loaded by tagging: {sorted(nltk_modules)}")
    return dict(rows=rows, first_cli_s=first_cli, nltk_modules=sorted(nltk_modules), text=C.startup_text,
                ner=C.tag_ner, cache_dir=os.environ.get('LIME_CACHE_DIR', ''))


# -----------------------------------------------------------------------------
# efficiency: baseline vs LIME variants trained by train.py on the same data, seed, batches, steps

RUN_SPECS = {
    'baseline': dict(metadata=''),
    'lime': dict(metadata='pos,ner'),
    'lime_causal': dict(metadata='pos_causal,ner_causal'),
    'lime1': dict(metadata='pos,ner', meta_shift=1),
    # LIME+1 without an oracle: own causal tags in, the next token's tags predicted by the model itself
    'lime1_predict': dict(metadata='pos_causal,ner_causal', meta_predict=True),
    'lime1_predict_full': dict(metadata='pos,ner', meta_predict=True),  # the same, predicting full tags
    'shuffled': dict(metadata='pos,ner', meta_shuffle=True),
    'baseline_seed2': dict(metadata='', seed_offset=1),
    # the tokenization itself: GPT-2's own encoding of the same documents (its own data dir), compared by val_bpb
    'baseline_plain': dict(metadata='', tokenization='plain'),
}
LABELS = {'baseline': 'baseline', 'lime': 'LIME (full tags)', 'lime_causal': 'LIME (causal tags)',
          'lime1': 'LIME+1 (full, oracle next-token tags)', 'lime1_predict': 'LIME+1, self-predicted tags (causal)',
          'lime1_predict_full': 'LIME+1, self-predicted tags (full)', 'shuffled': 'shuffled tags (control)',
          'baseline_seed2': 'baseline, seed 2', 'baseline_plain': 'baseline, plain tokenization'}


def train_args(C, name, out_dir):
    spec = dict(RUN_SPECS[name])
    m = {k: getattr(C, 'eff_' + k) or getattr(C, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size')}
    data = plain_dir(C) if spec.get('tokenization') == 'plain' else C.data_dir
    args = dict(data_dir=os.path.abspath(data), out_dir=os.path.abspath(out_dir),
                metadata=spec.get('metadata', ''), meta_shift=spec.get('meta_shift', 0),
                meta_shuffle=spec.get('meta_shuffle', False), seed=C.seed + spec.get('seed_offset', 0),
                **m, **arch_args(C), bias=C.bias, dropout=C.dropout,
                gradient_accumulation_steps=C.gradient_accumulation_steps, max_iters=C.max_iters,
                lr_decay_iters=C.max_iters, warmup_iters=C.warmup_iters, learning_rate=C.learning_rate,
                min_lr=C.min_lr, weight_decay=C.weight_decay, eval_interval=C.eval_interval,
                eval_iters=C.eval_iters, log_interval=max(C.max_iters // 10, 1), device=C.device,
                dtype=C.dtype, compile=C.compile, always_save_checkpoint=True, overwrite=True)  # a rerun replaces
    if name == 'lime1' and C.lime1_meta_dropout > 0:
        args['meta_dropout'] = C.lime1_meta_dropout
    if spec.get('meta_predict'):
        args.update(meta_predict=True, meta_inject_layer=C.meta_inject_layer)
    return [f"--{k}={v}" for k, v in args.items()]


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_runs(C, jobs):
    """Train runs with train.py in subprocesses (own processes: no state leaks between runs, and
    train.py stays the single source of truth for training), eff_parallel at a time.
    jobs: [(name, out_dir)]. Returns {name: (log rows, wall s)}. A finished run with identical
    arguments is reused when eff_reuse (bench_args.json in its out_dir records them)."""
    done, todo = {}, []
    for name, out_dir in jobs:
        args = train_args(C, name, out_dir)
        stamp, log_path = os.path.join(out_dir, 'bench_args.json'), os.path.join(out_dir, 'log.jsonl')
        if C.eff_reuse and os.path.isfile(stamp) and os.path.isfile(log_path):
            prev = json.load(open(stamp))
            rows = read_log(log_path)
            if prev.get('args') == args and rows and rows[-1]['iter'] == C.max_iters:
                print(f"{name}: reusing the finished run in {out_dir}", flush=True)
                done[name] = (rows, prev.get('wall_s'))
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
            print(f"{name}: val loss {rows[-1]['val_loss']:.4f}, acc {rows[-1]['val_acc']:.4f} ({wall:.0f}s)",
                  flush=True)
            done[name] = (rows, wall)
    return done


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
def predict_marginal(C, run_dir):
    """How loose is the bound? At the last position of marginal_positions val windows, the bound's
    term (-log p(data's next tags) - log p(next token | them)) next to the one-step marginal
    -log sum_v p(v) p(next token | v) over the next tags v of the marginalised streams (all streams
    jointly when their tag vocabularies multiply to <= 512, else the smallest stream), rerunning
    blocks k+1..L once per v. The past tags are the data's in both; with causal streams they are a
    function of the past tokens, so the marginal is the exact NLL of the next token under the
    model with its next tags summed out (a language model; generation would pay a forward of
    blocks k+1..L per value). For scale, the same positions under the honest runs of eff_dir
    (baseline, LIME causal) where they have checkpoints."""
    import itertools
    import torch.nn.functional as F
    from model import GPT
    from train import Split, eval_starts, load_checkpoint
    ck = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'))
    model = GPT.from_checkpoint(ck, C.device).eval()
    cfg = model.config
    streams, n_tags, T = list(cfg.meta_streams), cfg.meta_n_tags, cfg.block_size
    val = Split(ck['config']['data_dir'], 'val', streams, 0)
    marg = streams if math.prod(n_tags) <= 512 else [streams[int(np.argmin(n_tags))]]
    combos = list(itertools.product(*[range(n) for s, n in zip(streams, n_tags) if s in marg]))
    cols = {s: torch.tensor([c[j] for c in combos], device=C.device) for j, s in enumerate(marg)}
    bound, marginal, tag_part = [], [], []
    starts = list(eval_starts(val.n, T, C.marginal_positions))
    for i in starts:
        x, y, meta = val.windows([i], T)
        nxt = val.next_tags([i], T)
        x, meta = x.to(C.device), {k: v.to(C.device) for k, v in meta.items()}
        nxt = {k: v.to(C.device) for k, v in nxt.items()}
        h = model.lower(x, meta)
        logp_tag = {s: F.log_softmax(tl[0, -1].float(), -1) for s, tl in zip(streams, model.tag_logits(h[:, -1:]))}
        # the upper blocks see the candidate tags only at the last position: run the prefix once
        # into a KV cache, then the last position once per candidate (a batch of len(combos))
        cache = model.new_kv_cache(1)
        model.upper(model.inject(h[:, :-1], {s: v[:, :-1] for s, v in nxt.items()}), kv_cache=cache)
        cache.k, cache.v = cache.k.repeat(1, len(combos), 1, 1, 1), cache.v.repeat(1, len(combos), 1, 1, 1)
        nm = {s: nxt[s][:, -1:].repeat(len(combos), 1) for s in streams}
        for s in marg:
            nm[s][:, -1] = cols[s]
        logits, _ = model.upper(model.inject(h[:, -1:].expand(len(combos), -1, -1), nm), kv_cache=cache, start_pos=T - 1)
        logp_tok = F.log_softmax(logits[:, -1].float(), -1)[:, int(y[0, -1])]
        lp = sum(logp_tag[s][cols[s]] for s in marg)
        fixed = sum(logp_tag[s][int(nxt[s][0, -1])] for s in streams if s not in marg)
        k = combos.index(tuple(int(nxt[s][0, -1]) for s in marg))
        bound.append(-float(lp[k] + fixed + logp_tok[k]))
        tag_part.append(-float(lp[k] + fixed))
        marginal.append(-float(torch.logsumexp(lp + logp_tok, 0) + fixed))
    same = {}  # honest runs at the same positions (same data dir: same val tokens)
    for name in ('baseline', 'lime_causal'):
        path = os.path.join(os.path.dirname(run_dir), name, 'ckpt.pt')
        if not os.path.isfile(path):
            continue
        ckr = load_checkpoint(path)
        if ckr['config']['data_dir'] != ck['config']['data_dir']:
            continue
        m = GPT.from_checkpoint(ckr, C.device).eval()
        sp = Split(ckr['config']['data_dir'], 'val', list(m.config.meta_streams), 0)
        nll = []
        for i in starts:
            x, y, meta = sp.windows([i], T)
            logits, _ = m(x.to(C.device), {k: v.to(C.device) for k, v in meta.items()} or None)
            nll.append(-float(F.log_softmax(logits[0, -1].float(), -1)[int(y[0, -1])]))
        # paired by position: the standard error of the mean difference says whether it is noise
        diff = np.array(marginal) - np.array(nll)
        same[name] = dict(nll=float(np.mean(nll)), marginal_minus=float(diff.mean()),
                          se=float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None)
    res = dict(positions=len(bound), marginalised=marg, values=len(combos), bound=float(np.mean(bound)),
               marginal=float(np.mean(marginal)), tag_cost=float(np.mean(tag_part)),
               gap=float(np.mean(bound) - np.mean(marginal)), same_positions=same)
    print(f"\nbound vs one-step marginal over the next {'/'.join(marg)} tags ({len(combos)} values), "
          f"{res['positions']} val positions: bound {res['bound']:.4f} (of it tags {res['tag_cost']:.4f}), "
          f"marginal {res['marginal']:.4f}, gap {res['gap']:.4f} nats/token" +
          ''.join(f"; {n} at the same positions {v['nll']:.4f} (marginal minus it {v['marginal_minus']:+.4f}, "
                  f"s.e. {v['se'] or 0:.4f})" for n, v in same.items()))
    return res


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def run_curves(C, run_dirs):
    """curves: draw_curves over any run directories (each with a log.jsonl); the first is the baseline
    unless curves_baseline names another. Prints where each run first reaches the baseline's final
    val_nll / accuracy."""
    if not run_dirs:
        fail("curves: give run directories, e.g. python bench.py --mode=curves out-a out-b")
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


def run_efficiency(C):
    info = ensure_dataset(C)
    names = [n for n in C.eff_runs.split(',') if n]
    for n in names:
        if n not in RUN_SPECS:
            fail(f"config error: unknown efficiency run {n!r} ({', '.join(RUN_SPECS)})")
    if 'baseline' not in names:
        fail("config error: eff_runs must include 'baseline' (the reference of every comparison)")
    for n in names:
        for s in RUN_SPECS[n]['metadata'].split(','):
            if s and s not in info['streams']:
                fail(f"{C.data_dir}: stream '{s}' missing for run '{n}' (prepare.py --tags full,causal)")
    names = ['baseline'] + [n for n in names if n != 'baseline']
    plain = [n for n in names if RUN_SPECS[n].get('tokenization') == 'plain']
    plain_info = ensure_plain_dataset(C, info) if plain else None
    logs, walls = {}, {}
    t0 = time.time()
    res = train_runs(C, [(n, os.path.join(C.eff_dir, n)) for n in names])
    for n in names:
        logs[n], walls[n] = res[n]
    runs = summarize_runs(logs, walls, other_tokens=plain)
    rows = [dict(run=LABELS.get(n, n), **{k: v for k, v in r.items() if k != 'curve'},
                 **{k + '_cell': reach_cell(r, k) for k in ('frac_tokens_to_baseline_nll',
                                                            'frac_tokens_to_baseline_acc_honest',
                                                            'frac_tokens_to_baseline_loss',
                                                            'frac_tokens_to_baseline_acc',
                                                            'frac_tokens_to_baseline_bpb')})
            for n, r in runs.items()]
    print()
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
    print("val_nll: NLL per token of the val text as a generative model of text alone (or its upper bound); "
          "'-' (and n/a) for runs that read tags depending on tokens they have not seen (full tags, LIME+1's "
          "oracle next-token tags, shuffled tags). 'to base ...': fraction of the baseline's tokens to reach its "
          "final value; the paper's columns use val_loss/val_acc whatever the run reads (a meta_predict run's "
          "val_loss/val_acc are read with the data's next tags). '-' = never reached. val_bpb: val_nll in bits per "
          "UTF-8 byte of the val targets, the one number comparable across tokenizations: baseline_plain (GPT-2's "
          "own encoding of the same documents, same tokens per iteration) is compared on it alone.")
    marginal = None
    if 'lime1_predict' in names and C.marginal_positions > 0:
        marginal = predict_marginal(C, os.path.join(C.eff_dir, 'lime1_predict'))
    png = None
    if C.plot:
        png = draw_curves({n: logs[n] for n in names}, 'baseline', os.path.join(C.eff_dir, 'curves.png'))
    return dict(runs=runs, marginal=marginal, baseline_final_tokens=logs['baseline'][-1]['tokens'],
                data_dir=C.data_dir,
                tokenizer=info.get('tokenizer'), vocab_size=info.get('vocab_size'),
                train_tokens=info.get('train_tokens'), eff_dir=C.eff_dir, plot=png,
                tokens_per_iter=logs['baseline'][-1]['tokens'] // max(C.max_iters, 1),
                plain_data_dir=plain_dir(C) if plain else None,
                plain_train_tokens=plain_info.get('train_tokens') if plain_info else None,
                max_iters=C.max_iters, wall_s=time.time() - t0, train_args=train_args(C, 'baseline', 'OUT'),
                notes=("frac_tokens_to_baseline_*: fraction of the baseline's training tokens at which the run "
                       "first reaches the baseline's final value (linear interpolation between eval points): "
                       "_nll and _acc_honest on what the run could compute from the past alone (None for runs "
                       "that read the future: reads_future), _loss and _acc the paper's metric on val_loss and "
                       "val_acc whatever the run reads; baseline_seed2 shows run-to-run noise. marginal: the "
                       "lime1_predict bound against the one-step marginal over its next tags."))


# -----------------------------------------------------------------------------
# steering: LIME+1 with oracle hints vs <unk> hints vs the baseline; hinted generation

def ensure_ckpt(C, run_dir, name):
    if os.path.isfile(run_dir) or os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):  # a checkpoint file, or a run
        return
    print(f"{run_dir}/ckpt.pt not found: training run '{name}' now", flush=True)
    ensure_dataset(C)
    train_runs(C, [(name, run_dir)])


@torch.no_grad()
def steering_accuracy(C, models, val, streams, T):
    """Next-token accuracy and loss on fixed val windows for the LIME+1 model with oracle hints
    (the true next token's tags), with every tag <unk>, and for the baseline (same windows); for a
    self-predicting model (models['predict']) with the data's next tags (an oracle too) and with its
    heads' own argmax tags (from the past alone)."""
    from train import eval_starts
    starts = eval_starts(val.n, T, C.steer_windows)
    ctx = autocast_ctx(C)
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
                h = pm.lower(x, own_in['meta'])
                out['predict_oracle_tags'] = pm.upper(pm.inject(h, own_in['next']), targets=y)
                own = {s: tl.argmax(-1) for s, tl in zip(pm.config.meta_streams, pm.tag_logits(h))}
                out['predict_own_tags'] = pm.upper(pm.inject(h, own), targets=y)
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
    from train import eval_starts
    P, G = C.steer_prompt, C.steer_new_tokens
    gstarts = eval_starts(val.n, P + G + 1, C.steer_samples)
    xs, _, ms = val.windows(gstarts, P + G)  # ms[s][:, t] = tag of token t+1
    prompts = xs[:, :P].tolist()
    base = lambda s: s[:-len('_causal')] if s.endswith('_causal') else s
    hints = {base(s): m[:, P - 1:P - 1 + G].numpy() for s, m in ms.items()}  # tags of true tokens P..P+G-1
    gen = torch.Generator(device=C.device).manual_seed(C.seed)
    greedy = C.steer_top_k == 0
    kw = dict(temperature=0 if greedy else C.steer_temperature, top_k=1 if greedy else C.steer_top_k,
              ctx=autocast_ctx(C), generator=gen, tag_generated=False)
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
            h = [{s: int(hints[base(s)][b][j]) for s in mstreams} for j in range(G)] if use_hints else None
            tagger = md.CausalStream(ner) if model.config.meta_streams else None
            r = generate(model, prompt, G, tagger=tagger, hints=h, **kw)
            causal = md.annotate_ids(np.array(r['tokens']), ner=ner, tags='causal')
            own = {base(s): np.array(v) for s, v in r['given'].items()}
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
    sys.path.insert(0, ROOT)
    from model import GPT
    from train import Split, load_checkpoint  # weights_only: a checkpoint never runs code
    from sample import checkpoint_path
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
    cks = {}
    for k, d in dirs.items():
        ensure_ckpt(C, d, {'predict': 'lime1_predict'}.get(k, k))
        cks[k] = load_checkpoint(checkpoint_path(d))
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
    models = {k: GPT.from_checkpoint(c, C.device).eval() for k, c in cks.items()}
    T = ck['model_args']['block_size']
    if C.steer_prompt + C.steer_new_tokens > T:
        fail(f"config error: steer_prompt + steer_new_tokens = {C.steer_prompt + C.steer_new_tokens} "
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
    bases = [s[:-len('_causal')] if s.endswith('_causal') else s for s in streams]
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
        try:
            harness.build_task_dir(C.ds_task_dir, C.ds_cloze_n, C.ds_arith_n, C.ds_task_seed)
        except harness.HarnessError as e:
            fail(str(e))
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


DS_LABELS = {'lime1': 'LIME+1 (full tags)'}  # which tags it reads is the policy column's business


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
        if n not in RUN_SPECS or RUN_SPECS[n].get('tokenization') or RUN_SPECS[n].get('meta_shuffle'):
            fail(f"config error: ds_runs: {n!r} is not a run downstream can score "
                 f"({', '.join(k for k, v in RUN_SPECS.items() if not v.get('tokenization') and not v.get('meta_shuffle'))})")
    res = train_runs(C, [(n, os.path.join(C.eff_dir, n)) for n in names])
    t_train = time.time() - t0
    tasks = [t for t in C.ds_tasks.split(',') if t]
    rows, kinds = [], {}
    t1 = time.time()
    for n in names:
        try:
            sc = harness.Scorer(os.path.join(C.eff_dir, n), '', C.device, 16, C.dtype)
        except harness.HarnessError as e:
            fail(str(e))
        for pol in harness.POLICIES[sc.kind]:
            sc.set_policy(pol)
            hinted_ok = sc.kind in ('lime1', 'predict')
            ts = [t for t in tasks if hinted_ok or not t.endswith('_hinted')]  # others ignore hints: same as unhinted
            te = time.time()
            try:
                out = harness.evaluate(harness.make_lm(scorer=sc), ts, C.ds_task_dir, C.ds_limit, -1, 1000,
                                       log_samples=True)
            except harness.HarnessError as e:
                fail(str(e))
            r, smp = out['results'], out.get('samples', {})
            get = lambda t, k: r.get(t, {}).get(k)
            ppl = get('lime_cloze', 'perplexity,none')
            row = dict(run=n, label=DS_LABELS.get(n, LABELS.get(n, n)), model=harness.KIND_NAMES[sc.kind], policy=pol,
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
          "model's own next tags (cloze ll: the bound, tag log-prob included); oracle = the continuation's own "
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
# gpu_check: one short pass over throughput, efficiency and steering (sized by the config file)

def run_gpu_check(C, cfg):
    from types import SimpleNamespace
    out = {}
    t0 = time.time()
    out['throughput'] = run_throughput(C)
    if C.gc_gemma_variants:
        out['throughput_gemma'] = run_throughput(SimpleNamespace(**{**cfg, 'arch': 'gemma',
                                                                    'tp_variants': C.gc_gemma_variants}))
    # the efficiency runs are short: compiling each of them would cost more than it saves
    C = SimpleNamespace(**{**cfg, 'compile': False})
    out['efficiency'] = run_efficiency(C)
    C2 = SimpleNamespace(**{**cfg, 'compile': False, 'ckpt_dir': os.path.join(C.eff_dir, 'lime1'),
                            'base_ckpt_dir': os.path.join(C.eff_dir, 'baseline')})
    if 'lime1' in C.eff_runs.split(','):
        out['steering'] = run_steering(C2)
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
    if C.threads:
        torch.set_num_threads(C.threads)
    if C.device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"config error: device={C.device} but CUDA is not available")
    sys.path.insert(0, ROOT)
    t0 = time.time()
    print(f"bench mode={C.mode} arch={C.arch} device={C.device} dtype={C.dtype} compile={C.compile}", flush=True)
    res = {'throughput': run_throughput, 'tagging': run_tagging, 'startup': run_startup, 'efficiency': run_efficiency,
           'steering': run_steering, 'curves': lambda C: run_curves(C, run_dirs),
           'downstream': run_downstream}.get(C.mode)
    result = res(C) if res else run_gpu_check(C, cfg)
    path = C.out_json or os.path.join("out-bench", f"bench_{C.mode}.json")
    write_json(path, dict(mode=C.mode, config=cfg, env=env_info(C), result=result,
                          wall_s=time.time() - t0, time=time.strftime('%Y-%m-%d %H:%M:%S')))
    print(f"\nwrote {path} ({time.time() - t0:.0f}s)")


if __name__ == '__main__':
    main(sys.argv[1:])
