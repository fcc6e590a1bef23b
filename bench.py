"""
Cost benchmarks for LIME: what the metadata costs in training speed, parameters, annotation and
start-up. The experiments that train and compare models (efficiency, steering, downstream, curves,
the quickstart) are experiments.py's.

$ python bench.py --mode=throughput                        # train-step tokens/s, param overhead, MFU
$ python bench.py --mode=throughput --arch=gemma           # the same on the Gemma-style model
$ python bench.py --mode=tagging                           # annotation words/s: fast path vs plain NLTK
$ python bench.py --mode=startup                           # how soon a fresh process tags (cached models)
$ python bench.py configs/bench_gpu_check.py               # the GPU check's cost part (its experiments part:
                                                           # python experiments.py configs/experiments_gpu_check.py)

Every module-level name below is a config key; config files (python, exec'd) and --key=value
flags override them in command-line order, unknown keys are an error (as in train.py).
Each mode prints a table and writes out_json (default out-bench/bench_<mode>.json), atomically.
"""

import json
import os
import statistics
import subprocess
import sys
import time


def startup_steps(text, ner):
    """`python bench.py --startup_steps TEXT NER`, the child of --mode=startup: a fresh process times
    each step from here to one sentence's tags (metadata.py's public functions, each loading what it
    needs on first use) and prints the laps as JSON. It runs before bench.py imports numpy and torch."""
    t0 = t = time.perf_counter()
    laps = {}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        laps[name], t = now - t, now
    import numpy  # noqa: F401 (timed: the first import of the tagging path)
    lap('import numpy')
    import metadata as md
    lap('import metadata')
    md.ensure_resources(ner)
    lap('import nltk')
    md.pos_tag_sents([['The', 'boat']])
    lap('POS tagger')
    if ner != 'none':
        md.ner_raw_resume([([('The', 'DT'), ('boat', 'NN')], 0, [], 2)], ner)  # not ner_tag_sents: it imports nltk.chunk
        lap('NE chunker')
    md.encoding()
    lap('GPT-2')
    md.annotate_text(text, ner=ner)
    lap('punkt, first sentence')
    laps['ready to tag'] = t - t0
    print(json.dumps(dict(laps=laps, nltk_modules=sum(m.split('.')[0] == 'nltk' for m in sys.modules))))


if __name__ == '__main__' and sys.argv[1:2] == ['--startup_steps']:
    startup_steps(*sys.argv[2:4])
    sys.exit()

# the rest imports torch: after the start-up child above, which times a process without it
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (ROOT, arch_args, autocast, configure_mode, ensure_dataset, fail, read_text,  # noqa: E402
                    run_main, setup_torch, table, write_result)

# -----------------------------------------------------------------------------
# default config values
mode = 'throughput'  # throughput | tagging | startup | gpu_check (throughput, and gc_gemma_variants on arch='gemma')
out_json = ''  # '' = out-bench/bench_<mode>.json
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False
threads = 0  # torch CPU threads; 0 = torch's default
# data: a prepare.py directory (throughput with tp_data='real'; experiments.py's runs), built on demand if
# missing with GPT-2's first 4096 ranks (a valid BPE whose output layer does not dominate a small model on CPU)
data_dir = 'data/gutenberg_4k'
data_tokenizer = 'gpt2-4096'  # only used to build data_dir when it is missing (build_data=True)
data_input = ''  # '' = NLTK's Gutenberg corpus; else comma-separated prepare.py --input paths (tagging: .txt files and directories)
build_data = True
# model (throughput)
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
vocab_size = 0  # 0 = data_dir's vocab if it exists, else 4096
meta_inject_layer = 0  # lime1_predict: the block after which the next tags are predicted and added; 0 = n_layer // 2
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
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
MODES = ('throughput', 'tagging', 'startup', 'gpu_check')


def configure(argv):
    cfg = configure_mode(argv, DEFAULTS, MODES)
    if cfg['startup_runs'] < 1:
        fail(f"startup_runs must be >= 1, got {cfg['startup_runs']}")
    return cfg


# -----------------------------------------------------------------------------
# small helpers

def sync(C):
    if C.device.startswith('cuda'):
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# throughput: training-step tokens/s of baseline, LIME and LIME+1 on identical batches

TP_VARIANTS = ('baseline', 'lime', 'lime1', 'lime1_predict')
TP_STREAMS = ('pos', 'ner')  # the metadata every LIME variant reads


def tp_batches(C, info, V, n_tags, shift, g):
    """tp_warmup + tp_steps batches (x, y, {stream: tags}) on C.device: windows of data_dir's train
    split with the tags shifted by shift (tp_data='real'), or random tokens and tags from g."""
    B, T, n_batches = C.batch_size, C.block_size, C.tp_warmup + C.tp_steps
    if C.tp_data == 'real':
        if info is None or 'pos' not in info['streams']:
            fail(f"{C.data_dir}: no pos/ner streams for --tp_data=real")
        from common import Split  # train.py's data loader: the batches training reads
        if V != info['vocab_size']:
            fail(f"vocab_size={V} but {C.data_dir} has {info['vocab_size']}")
        sp = Split(C.data_dir, 'train', TP_STREAMS, shift)
        starts = torch.randint(sp.n - T - 1, (n_batches, B), generator=torch.Generator().manual_seed(C.seed))
        out = [sp.windows(s.tolist(), T) for s in starts]
    else:
        out = []
        for _ in range(n_batches):
            x = torch.randint(V, (B, T + 1), generator=g)
            meta = {s: torch.randint(3, n, (B, T), generator=g) for s, n in zip(TP_STREAMS, n_tags)}
            out.append((x[:, :-1], x[:, 1:], meta))
    return [(x.to(C.device), y.to(C.device), {s: m.to(C.device) for s, m in meta.items()}) for x, y, meta in out]


def tp_variant(C, v, V, n_tags):
    """Variant v's model (the same init for all: LIME = baseline weights + metadata tables), its
    optimizer and grad scaler, and the lists its timings go to."""
    from model import GPT, GPTConfig
    torch.manual_seed(C.seed)
    ms = TP_STREAMS if v != 'baseline' else ()
    try:
        cfg = GPTConfig(n_layer=C.n_layer, n_head=C.n_head, n_embd=C.n_embd, block_size=C.block_size, bias=C.bias,
                        dropout=C.dropout, vocab_size=V, meta_streams=ms, meta_n_tags=n_tags[:len(ms)],
                        meta_shift=1 if v == 'lime1' else 0, meta_predict=v == 'lime1_predict',
                        meta_inject_layer=C.meta_inject_layer if v == 'lime1_predict' else 0,  # 0: GPTConfig's default
                        **arch_args(C))
    except ValueError as e:
        fail(f"{e}")
    raw = GPT(cfg).to(C.device)
    opt = raw.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cuda' if C.device.startswith('cuda') else 'cpu')
    scaler = torch.amp.GradScaler('cuda', enabled=C.dtype == 'float16' and C.device.startswith('cuda'))
    return dict(raw=raw, model=torch.compile(raw) if C.compile else raw, opt=opt, scaler=scaler, cfg=cfg,
                shift=1 if v == 'lime1' else 0, predict=v == 'lime1_predict',
                tps=[], dt=[], n_params=raw.get_num_params(), n_meta=raw.get_num_meta_params())


def tp_step(r, batch, next_batch, ctx):
    """One training step of variant r; a self-predicting model reads its tags and learns the next
    token's (teacher-forced from next_batch)."""
    x, y, meta = batch
    with ctx:
        _, loss = r['model'](x, meta if r['n_meta'] else None, targets=y,
                             next_meta=next_batch[2] if r['predict'] else None)
    r['scaler'].scale(loss).backward()
    r['scaler'].unscale_(r['opt'])
    torch.nn.utils.clip_grad_norm_(r['raw'].parameters(), 1.0)
    r['scaler'].step(r['opt'])
    r['scaler'].update()
    r['opt'].zero_grad(set_to_none=True)
    return loss


def tp_time(C, runs, data, variants):
    """tp_rounds rounds of tp_warmup untimed and tp_steps timed steps per variant, interleaved, the
    order rotating each round, so slow drifts (thermal, other processes on a shared box) hit every
    variant alike. Appends to each run's tps/dt; returns the first round's warm-up seconds (compile)."""
    ctx = autocast(C.device, C.dtype)
    t_first = {}
    for rnd in range(C.tp_rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            r, bs = runs[v], data[runs[v]['shift']]
            nbs = data[1] if r['predict'] else bs
            t0 = time.perf_counter()
            for i in range(C.tp_warmup):
                tp_step(r, bs[i], nbs[i], ctx)
            sync(C)
            if rnd == 0:
                t_first[v] = time.perf_counter() - t0  # includes compilation
            t0 = time.perf_counter()
            for i in range(C.tp_steps):
                loss = tp_step(r, bs[C.tp_warmup + i], nbs[C.tp_warmup + i], ctx)
            loss.item()
            sync(C)
            dt = time.perf_counter() - t0
            r['dt'].append(dt / C.tp_steps)
            r['tps'].append(C.batch_size * C.block_size * C.tp_steps / dt)
        print(f"round {rnd + 1}/{C.tp_rounds}: " +
              ', '.join(f"{v} {runs[v]['tps'][-1]:,.0f} tok/s" for v in variants), flush=True)
    return t_first


def tp_results(C, runs, variants, t_first):
    """Per variant: median/min/max tokens/s, ms/step, MFU, parameters, and against the baseline
    (when timed) the ratio of medians, per-round ratios and the parameter overhead; printed as a table."""
    base = runs.get('baseline')
    out = {}
    for v in variants:
        r = runs[v]
        med = statistics.median(r['tps'])
        res = dict(tokens_per_sec_median=med, tokens_per_sec_rounds=r['tps'],
                   tokens_per_sec_min=min(r['tps']), tokens_per_sec_max=max(r['tps']),
                   step_ms_median=1000 * statistics.median(r['dt']),
                   mfu=r['raw'].estimate_mfu(C.batch_size, statistics.median(r['dt']), C.peak_flops or None),
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
    print()
    table([dict(variant=v, **res) for v, res in out.items()],
          [('variant', 'variant', ''), ('tokens_per_sec_median', 'tok/s (median)', ',.0f'),
           ('tokens_per_sec_min', 'min', ',.0f'), ('tokens_per_sec_max', 'max', ',.0f'),
           ('ratio_vs_baseline', 'vs baseline', '.3f'), ('step_ms_median', 'ms/step', '.1f'),
           ('n_params', 'params', ',d'), ('param_overhead', '+params', ',d'),
           ('param_overhead_pct', '+params %', '.4f'), ('mfu', 'MFU', '.3f')])
    return out


def run_throughput(C):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = None
    if C.tp_data == 'real' or (C.vocab_size == 0 and os.path.isfile(os.path.join(C.data_dir, 'meta.json'))):
        info = ensure_dataset(C) if C.tp_data == 'real' else json.load(open(os.path.join(C.data_dir, 'meta.json')))
    V = C.vocab_size or (info['vocab_size'] if info else 4096)
    n_tags = tuple(len(info['streams'][s]['tags']) for s in TP_STREAMS) if info else (48, 6)
    variants = [v for v in C.tp_variants.split(',') if v]
    for v in variants:
        if v not in TP_VARIANTS:
            fail(f"unknown throughput variant {v!r} ({', '.join(TP_VARIANTS)})")
    # the same batches for every variant; LIME+1 only differs in which tags it reads
    g = torch.Generator().manual_seed(C.seed)
    data = {0: tp_batches(C, info, V, n_tags, 0, g)}
    if 'lime1' in variants or 'lime1_predict' in variants:  # lime1_predict: its next tags, as inputs
        data[1] = tp_batches(C, info, V, n_tags, 1, g) if C.tp_data == 'real' else data[0]  # random: a shift changes nothing
    runs = {v: tp_variant(C, v, V, n_tags) for v in variants}
    out = tp_results(C, runs, variants, tp_time(C, runs, data, variants))
    cfg = runs[variants[-1]]['cfg']
    return dict(variants=out, vocab_size=V, meta_n_tags=dict(zip(TP_STREAMS, n_tags)), batch_size=C.batch_size,
                block_size=C.block_size, n_layer=C.n_layer, n_head=C.n_head, n_embd=C.n_embd, data=C.tp_data,
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
        texts = [read_text(p) for p in txt_files(C.data_input.split(','))]
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


def txt_files(paths):
    """The .txt files of data_input in prepare.py's order: each directory's files sorted, then its
    subdirectories. (The tagging corpus is plain text: JSONL and parquet are prepare.py's.)"""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for d, subdirs, names in os.walk(path):
                subdirs.sort()
                files += [os.path.join(d, n) for n in sorted(names) if n.endswith('.txt')]
        elif path.endswith('.txt') or not os.path.exists(path):
            files.append(path)  # read_text names a missing file
        else:
            fail(f"{path}: the tagging corpus (data_input) is .txt files and directories of them")
    return files


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


def tag_add(rows, name, text, procs, cache, seconds, words):
    rows.append(dict(name=name, text=text, procs=procs, cache=cache, seconds=seconds, words=words,
                     words_per_sec=words / seconds if seconds > 0 else None))
    print(f"  {name:<22} {text:<5} procs={procs} {cache:<5} {words:>9,} words {seconds:8.2f}s "
          f"{rows[-1]['words_per_sec'] or 0:>12,.0f} words/s", flush=True)


def tag_one_process(C, rows, warm, timed, ref, words_timed, words_ref):
    """One process per measurement (a pool of one, forked fresh): every one starts from cold caches
    unless warmed with the warm-up docs first."""
    import multiprocessing as mp
    ctx = mp.get_context('fork')

    def child(job, docs, reference=False, warm_docs=()):
        with ctx.Pool(1) as p:
            return p.apply(_child, (job, docs, C.tag_ner, reference, list(warm_docs)))

    tag_add(rows, 'tiktoken', 'timed', 1, '-', child(_job_tiktoken, timed), words_timed)
    tag_add(rows, 'full fast', 'timed', 1, 'cold', child(_job_full, timed), words_timed)
    tag_add(rows, 'full fast', 'timed', 1, 'warm', child(_job_full, timed, warm_docs=warm), words_timed)
    tag_add(rows, 'full fast', 'ref', 1, 'cold', child(_job_full, ref), words_ref)
    tag_add(rows, 'full fast', 'ref', 1, 'warm', child(_job_full, ref, warm_docs=warm), words_ref)
    if C.tag_reference:
        tag_add(rows, 'full NLTK', 'ref', 1, '-', child(_job_full, ref, reference=True), words_ref)
    if C.tag_causal:
        tag_add(rows, 'causal fast', 'ref', 1, 'warm', child(_job_causal, ref, warm_docs=warm), words_ref)
        if C.tag_reference:
            tag_add(rows, 'causal NLTK', 'ref', 1, '-', child(_job_causal, ref, reference=True), words_ref)


def tag_all_workers(C, rows, workers, warm, timed, ref, words_timed, words_ref):
    """All workers: warm this process once, then every pool forks from it (warm workers), one job per document."""
    import gc
    import metadata as md
    md.annotate_text("Mr. Smith went to Washington.", ner=C.tag_ner, reference=True)
    for d in warm:
        md.annotate_text(d, ner=C.tag_ner)
    gc.collect()
    each = lambda docs: [[d] for d in docs]
    tag_add(rows, 'tiktoken', 'timed', workers, '-',
            _pool_run(_job_tiktoken, each(timed), C.tag_ner, False, workers), words_timed)
    tag_add(rows, 'full fast', 'timed', workers, 'warm',
            _pool_run(_job_full, each(timed), C.tag_ner, False, workers), words_timed)
    if C.tag_reference:
        tag_add(rows, 'full NLTK', 'ref', workers, '-',
                _pool_run(_job_full, each(ref), C.tag_ner, True, workers), words_ref)
    if C.tag_causal:
        # token ids from this process (untimed): the workers time the causal annotation only
        ref_ids = [md.annotate_text(d, ner=C.tag_ner)[0] for d in ref]
        gc.collect()
        tag_add(rows, 'causal fast', 'ref', workers, 'warm',
                _pool_run(_job_causal_ids, each(ref_ids), C.tag_ner, False, workers), words_ref)


def tag_speedups(rows):
    """(fast/NLTK speed-ups on the same text in one process, fast full annotation / tiktoken)."""
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
    return speedup, (wps('full fast', 'timed', 1, 'warm') / tk if tk else None)


def run_tagging(C):
    import multiprocessing as mp
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
    t0 = time.time()
    with mp.get_context('fork').Pool(1) as p:
        counts = p.apply(_child, (_job_count, timed, C.tag_ner, False, []))
    words_timed, words_ref = sum(counts), sum(counts[:len(ref)])
    print(f"corpus: {len(warm)} warm-up docs, {len(timed)} timed docs ({words_timed:,} words), "
          f"{len(ref)} reference docs ({words_ref:,} words); {workers} workers", flush=True)
    rows = []
    tag_one_process(C, rows, warm, timed, ref, words_timed, words_ref)
    if workers > 1:
        tag_all_workers(C, rows, workers, warm, timed, ref, words_timed, words_ref)
    speedup, fast_over_tiktoken = tag_speedups(rows)
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

def run_startup(C):
    def wall(cmd, stdin=None):
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True)
        if r.returncode:
            fail(f"startup: {' '.join(cmd[:2])[:60]} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return time.perf_counter() - t, r.stdout

    steps = [sys.executable, 'bench.py', '--startup_steps', C.startup_text, C.tag_ner]
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
# gpu_check: the cost part of the GPU check (sized by configs/bench_gpu_check.py): throughput, and
# gc_gemma_variants again on arch='gemma'. Its experiments part is experiments.py's gpu_check mode.

def run_gpu_check(C):
    from types import SimpleNamespace
    t0 = time.time()
    out = dict(throughput=run_throughput(C))
    if C.gc_gemma_variants:
        out['throughput_gemma'] = run_throughput(SimpleNamespace(**{**vars(C), 'arch': 'gemma',
                                                                    'tp_variants': C.gc_gemma_variants}))
    out['wall_s'] = time.time() - t0
    return out


# -----------------------------------------------------------------------------

def main(argv):
    from types import SimpleNamespace
    cfg = configure(argv)
    C = SimpleNamespace(**cfg)
    setup_torch(C)
    t0 = time.time()
    print(f"bench mode={C.mode} arch={C.arch} device={C.device} dtype={C.dtype} compile={C.compile}", flush=True)
    run = {'throughput': run_throughput, 'tagging': run_tagging, 'startup': run_startup,
           'gpu_check': run_gpu_check}[C.mode]
    write_result(C, cfg, run(C), t0)


if __name__ == '__main__':
    sys.exit(run_main('bench.py', main, sys.argv[1:]))
