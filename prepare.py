"""
Build a LIME training set: GPT-2 tokens plus aligned metadata streams, as uint16 files.

    python prepare.py                                   # NLTK's Gutenberg corpus -> data/gutenberg
    python prepare.py --ner binary                      # ... without the typed NE chunker (offline)
    python prepare.py --input docs/ more.jsonl --out_dir data/mine

Inputs: .txt files (one document each; a leading UTF-8 BOM is dropped), .jsonl files (one
document per line, field "text"), or directories of them (symlinked subdirectories followed).
Each document is followed by <|endoftext|> (metadata <pad>); a literal "<|endoftext|>" inside a
document is ordinary text. Output directory (nanoGPT's layout plus one file per metadata stream):
    train.bin, val.bin                      uint16 token ids
    train.<stream>.bin, val.<stream>.bin    uint16 tag ids, one per token
    meta.json                               vocab, tokenizer, streams and their tag names, counts
Streams: pos, ner (unless --ner none), word (B/I word boundaries, for the cohesion metrics),
and with --tags ...causal: pos_causal, ner_causal (tags of token t computed from tokens <= t).
Combine shards (--num_shards/--shard_index) with: python prepare.py --merge DIR [DIR ...] --out_dir DIR
"""
import os
import re
import sys
import json
import time
import queue
import shutil
import signal
import socket
import argparse
import platform
import traceback
import multiprocessing as mp

import numpy as np

import metadata as md

# -----------------------------------------------------------------------------
# config

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--input', nargs='+', default=None,
               help='.txt/.jsonl files or directories (default: nltk.corpus.gutenberg)')
p.add_argument('--out_dir', default=None, help='output dataset directory (default: data/gutenberg)')
p.add_argument('--tokenizer', default='gpt2', help="gpt2 | gpt2-N: GPT-2's first N ranks (small vocab)")
p.add_argument('--tokenization', default='lime', help="lime (each word encoded on its own) | plain")
p.add_argument('--ner', default='typed', help='typed (NLTK default chunker) | binary | none')
p.add_argument('--tags', default='full,causal', help='comma-separated: full, causal')
p.add_argument('--val_fraction', type=float, default=0.1, help='fraction of documents for val, in [0, 1)')
p.add_argument('--seed', type=int, default=1337, help='seed of the train/val document split (>= 0)')
p.add_argument('--workers', type=int, default=os.cpu_count(), help=f'tagging processes, 1 to {1024}')
p.add_argument('--num_shards', type=int, default=1, help='split the corpus across machines')
p.add_argument('--shard_index', type=int, default=0, help='which shard this run writes, in [0, num_shards)')
p.add_argument('--reference', action='store_true', help='tag with plain NLTK (slow, the reference)')
p.add_argument('--merge', nargs='+', default=None, metavar='DIR',
               help='concatenate finished shard directories into --out_dir')
p.add_argument('--no_progress', action='store_true', help='no tqdm progress bar')

MAX_WORKERS = 1024
HOST = socket.gethostname()
# what prepare.py writes into a dataset directory: only such a directory is ever replaced
OUR_FILE = re.compile(r'(train|val)(\.\w+)?\.bin|meta\.json')
SURROGATE = re.compile('[\ud800-\udfff]')

class PrepareError(Exception):
    pass

class Stopped(PrepareError):
    """SIGTERM or Ctrl-C: handled like an error (clean up, one line), exit code 128 + signal."""
    def __init__(self, signum):
        super().__init__(f'stopped by {signal.Signals(signum).name}; nothing written')
        self.code = 128 + signum

def fail(msg, code=1):
    print(f'prepare.py: error: {msg}', file=sys.stderr)
    sys.exit(code)

def check_choice(name, value, allowed):
    if value not in allowed:
        fail(f"--{name}={value!r} is not one of: {', '.join(allowed)}")

def on_signal(signum, frame):
    # ignore repeats while cleaning up, then unwind like an error
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(signum)

# -----------------------------------------------------------------------------
# documents: (source, index) references are enumerated first, texts are read lazily

def list_files(paths):
    """Input files in a fixed order. Directories are walked in sorted order, following
    symlinked subdirectories; a directory reached twice (a symlink loop, or two links to one
    directory) is read once."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise PrepareError(f'{path}: no such file or directory')
        if os.path.isdir(path):
            seen = {os.path.realpath(path)}
            for root, dirs, names in os.walk(path, followlinks=True):
                keep = []
                for d in sorted(dirs):
                    real = os.path.realpath(os.path.join(root, d))
                    if real not in seen:
                        seen.add(real)
                        keep.append(d)
                dirs[:] = keep
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(('.txt', '.jsonl'))]
        elif path.endswith(('.txt', '.jsonl')):
            files.append(path)
        else:
            raise PrepareError(f'{path}: unsupported file type (expected .txt, .jsonl or a directory)')
    return files

def open_input(path):
    try:
        return open(path, 'rb')
    except OSError as e:
        raise PrepareError(f'{path}: cannot read ({e.strerror})')

def read_jsonl(path):
    """Yield (line_number, text) of a JSONL file, with a clear error for a bad line."""
    with open_input(path) as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b'\xef\xbb\xbf'):
                raw = raw[3:]  # a UTF-8 BOM at the start of the file
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode('utf-8'))
            except UnicodeDecodeError as e:
                raise PrepareError(f'{path}:{n}: not valid UTF-8 (byte {e.start})')
            except json.JSONDecodeError as e:
                raise PrepareError(f'{path}:{n}: not valid JSON ({e.msg})')
            if not isinstance(obj, dict) or not isinstance(obj.get('text'), str):
                raise PrepareError(f'{path}:{n}: no string field "text"')
            m = SURROGATE.search(obj['text'])
            if m:  # JSON can escape one ("\ud800"); it is not text and has no UTF-8 form
                raise PrepareError(f'{path}:{n}: "text" holds a lone surrogate (U+{ord(m.group()):04X})')
            yield n, obj['text']

def read_txt(path):
    with open_input(path) as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')  # bytes -> str as is: CRLF and all whitespace are kept
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path}: not valid UTF-8 (byte {e.start})')
    return text[1:] if text.startswith('\ufeff') else text  # a BOM is not text

def enumerate_documents(inputs):
    """List of (kind, path, line) document references, in a fixed order. Every input file is
    read and decoded here, before any tagging: a bad file fails the run at once."""
    if inputs is None:
        from nltk.corpus import gutenberg
        return [('gutenberg', fid, 0) for fid in gutenberg.fileids()]
    refs = []
    for path in list_files(inputs):
        if path.endswith('.jsonl'):
            refs += [('jsonl', path, n) for n, _ in read_jsonl(path)]
        else:
            read_txt(path)
            refs.append(('txt', path, 0))
    return refs

def iter_named_texts(refs):
    """(name, text) of the referenced documents, in order (a JSONL file is read once)."""
    open_jsonl = None
    for kind, path, line in refs:
        if kind == 'gutenberg':
            from nltk.corpus import gutenberg
            yield path, gutenberg.raw(path)
        elif kind == 'txt':
            yield path, read_txt(path)
        else:
            if open_jsonl is None or open_jsonl[0] != path:
                open_jsonl = (path, read_jsonl(path))
            for n, text in open_jsonl[1]:
                if n == line:
                    yield f'{path}:{n}', text
                    break

def iter_texts(refs):
    """Texts of the referenced documents, in order (bench.py reads corpora this way)."""
    return (text for _, text in iter_named_texts(refs))

# -----------------------------------------------------------------------------
# work: one document -> token ids and streams (runs in the workers)

_job = {}

def init_worker(job):
    _job.update(job)

def process(item):
    """(split, name, text) -> (split, (ids, streams, nwords) or None, error or None)."""
    split, name, text = item
    try:
        ids, streams = md.annotate_text(text, _job['tokenization'], _job['ner'], _job['reference'])
        nwords = int(np.count_nonzero(streams['word'] == md.WORD_B))  # first token of each word
        if 'full' not in _job['tags']:
            streams = {}
        if 'causal' in _job['tags']:
            causal = md.annotate_ids(ids, _job['ner'], 'causal', _job['reference'])
            streams.update(causal)
    except md.MetadataError as e:
        return split, None, f'{name}: {e}'
    # append <|endoftext|> (metadata <pad>) so documents and shards concatenate cleanly
    ids = np.append(ids, md.encoding().eot_token).astype(np.uint16)
    streams = {k: np.append(v, md.PAD).astype(np.uint16) for k, v in streams.items()}
    return split, (ids, streams, nwords), None

def worker_loop(job, tasks, results, parent):
    # the main process handles Ctrl-C and SIGTERM, and kills the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init_worker(job)
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone: do not linger
                return
            continue
        if item is None:
            return
        seq, task = item
        try:
            results.put((seq, process(task), None))
        except BaseException:
            results.put((seq, None, traceback.format_exc()))

def exit_reason(code):
    if code < 0:
        name = signal.Signals(-code).name
        return f'killed by {name}' + (', out of memory?' if -code == signal.SIGKILL else '')
    return f'exit code {code}'

def results_in_order(items, workers, job):
    """process(item) for each item, in order. With workers > 1 the items go to worker
    processes, at most 4 per worker in flight (so memory stays bounded); the main process
    watches them: a worker that dies (OOM killer, kill -9) ends the run with PrepareError
    instead of waiting forever for its result. Close the generator to stop the workers."""
    if workers == 1:
        init_worker(job)
        yield from map(process, items)
        return
    ctx = mp.get_context('fork')  # workers inherit the tokenizer and the loaded modules
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker_loop, args=(job, tasks, results, os.getpid()), daemon=True)
             for _ in range(workers)]
    for w in procs:
        w.start()
    try:
        items, sent, done, ready, more = iter(items), 0, 0, {}, True
        while True:
            while more and sent - done < 4 * workers:
                item = next(items, None)
                if item is None:
                    more = False
                else:
                    tasks.put((sent, item))
                    sent += 1
            if done == sent:
                return
            while done not in ready:
                try:
                    seq, res, tb = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [w for w in procs if w.exitcode is not None]
                    if dead:
                        raise PrepareError(f'a tagging worker died ({exit_reason(dead[0].exitcode)})')
                    continue
                if tb:
                    raise RuntimeError(f'a tagging worker failed:\n{tb}')
                ready[seq] = res
            yield ready.pop(done)
            done += 1
    finally:
        for w in procs:
            w.kill()
        for w in procs:
            w.join()
        for q in (tasks, results):
            q.cancel_join_thread()  # never wait at exit to flush a queue nobody reads
            q.close()

# -----------------------------------------------------------------------------
# the output directory: written as DIR.tmp-HOST-PID, swapped in when complete

def resolve_out_dir(path):
    """Where the dataset goes: trailing slashes dropped, a symlink followed (its target is
    replaced, the link kept). Refuses a file, and a directory holding anything prepare.py does
    not write (so a typo like --out_dir . can never delete a directory)."""
    out = os.path.normpath(path)
    if os.path.islink(out):
        out = os.path.realpath(out)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise PrepareError(f'--out_dir {path}: exists and is not a directory')
        try:
            foreign = sorted(n for n in os.listdir(out) if not OUR_FILE.fullmatch(n))
        except OSError as e:
            raise PrepareError(f'--out_dir {path}: cannot read ({e.strerror})')
        if foreign:
            raise PrepareError(f'--out_dir {path}: holds {foreign[0]!r}, which prepare.py did not '
                               f'write; not replacing it (choose another directory)')
    return out

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def remove_stale(out):
    """Remove OUT.tmp-HOST-PID / OUT.old-HOST-PID left by earlier runs on this machine that
    died (kill -9, power loss): their pid is no longer alive. Others are only reported."""
    parent, name = os.path.split(os.path.abspath(out))
    pat = re.compile(re.escape(name) + r'\.(?:tmp|old)-(?:(.+)-)?(\d+)')
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for n in sorted(entries):
        m = pat.fullmatch(n)
        if not m:
            continue
        host, pid, path = m.group(1), int(m.group(2)), os.path.join(parent, n)
        if host not in (None, HOST):
            print(f'note: {path} is from a run on {host}; remove it if that run has ended', file=sys.stderr)
        elif pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            print(f'removed {path}, left by an earlier run that did not finish', file=sys.stderr)

def make_tmp(out):
    remove_stale(out)
    tmp = f'{out}.tmp-{HOST}-{os.getpid()}'
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise PrepareError(f'--out_dir {out}: cannot create {tmp} ({e.strerror})')
    return tmp

def write_meta(tmp, meta):
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())

def close_all(files):
    """Flush (where a full disk shows), fsync and close every output file."""
    for f in files:
        if not f.closed:
            f.flush()
            os.fsync(f.fileno())
            f.close()

def replace_dir(tmp, out):
    """Swap the finished temporary directory in; an old dataset is removed only after."""
    old = None
    if os.path.isdir(out):
        old = f'{out}.old-{HOST}-{os.getpid()}'
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)

def discard(tmp, files=()):
    for f in files:
        try:
            f.close()
        except OSError:
            pass
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)

# -----------------------------------------------------------------------------

# a shard's identity: all shards of one corpus agree on these (shard_index aside)
SHARD_KEYS = ('inputs', 'num_shards', 'seed', 'val_fraction', 'vocab_size', 'tokenizer',
              'tokenization', 'ner', 'tags', 'streams', 'reference_tagger')

def read_shards(dirs):
    """meta.json of each shard, checked: readable, complete, one corpus, each shard once."""
    metas = []
    for d in dirs:
        path = os.path.join(d, 'meta.json')
        if not os.path.isdir(d):
            raise PrepareError(f'{d}: no such shard directory')
        if not os.path.exists(path):
            raise PrepareError(f'{d}: incomplete shard (no meta.json: still running or killed; rerun it)')
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise PrepareError(f'{path}: cannot read ({e})')
        missing = [k for k in SHARD_KEYS + ('shard_index',) if k not in m]
        if missing:
            raise PrepareError(f'{path}: no {missing[0]!r} (made by an older prepare.py? rebuild it)')
        metas.append(m)
    first = dirs[0]
    for d, m in zip(dirs, metas):
        for k in SHARD_KEYS:
            if m[k] != metas[0][k]:
                raise PrepareError(f'{d}: {k} {m[k]!r} differs from {metas[0][k]!r} in {first}: '
                                   f'not shards of one run')
    n = metas[0]['num_shards']
    owner = {}
    for d, m in zip(dirs, metas):
        i = m['shard_index']
        if i in owner:
            raise PrepareError(f'{d}: shard {i} of {n} given twice (also {owner[i]})')
        owner[i] = d
    gaps = [i for i in range(n) if i not in owner]
    if gaps:
        raise PrepareError(f'shard {gaps[0]} of {n} is missing ({len(gaps)} of {n} missing; got '
                           f'{", ".join(dirs)})')
    for d, m in zip(dirs, metas):  # every stream file there, of the size meta.json says
        for split in ('train', 'val'):
            for s in [''] + ['.' + k for k in m['streams']]:
                path = os.path.join(d, f'{split}{s}.bin')
                want = 2 * m[f'{split}_tokens']
                if not os.path.isfile(path):
                    raise PrepareError(f'{path}: missing (meta.json lists it)')
                if os.path.getsize(path) != want:
                    raise PrepareError(f'{path}: {os.path.getsize(path):,} bytes, meta.json says {want:,}')
    order = sorted(range(len(dirs)), key=lambda j: metas[j]['shard_index'])
    return [dirs[j] for j in order], [metas[j] for j in order]

def merge(dirs, out_dir):
    dirs, metas = read_shards(dirs)
    out = resolve_out_dir(out_dir)
    tmp = make_tmp(out)
    files = []
    try:
        for split in ('train', 'val'):
            for s in [''] + ['.' + k for k in metas[0]['streams']]:
                fo = open(os.path.join(tmp, f'{split}{s}.bin'), 'wb')
                files.append(fo)
                for d in dirs:
                    with open(os.path.join(d, f'{split}{s}.bin'), 'rb') as fi:
                        shutil.copyfileobj(fi, fo, 1 << 24)
        close_all(files)
        meta = dict(metas[0])
        for k in ('train_tokens', 'val_tokens', 'train_docs', 'val_docs', 'words'):
            meta[k] = sum(m.get(k, 0) for m in metas)
        meta.update(num_shards=1, shard_index=0, merged_from=[os.path.abspath(d) for d in dirs])
        write_meta(tmp, meta)
        replace_dir(tmp, out)
    except OSError as e:
        discard(tmp, files)
        raise PrepareError(f'{out_dir}: cannot write the merged dataset ({e.strerror or e})')
    except BaseException:
        discard(tmp, files)
        raise
    print(f'merged {len(dirs)} shards into {out_dir}: {meta["train_tokens"]:,} train tokens')

def check_args(args):
    if not 1 <= args.workers <= MAX_WORKERS:
        fail(f'--workers={args.workers} must be in [1, {MAX_WORKERS}]')
    if not 0 <= args.val_fraction < 1:
        fail(f'--val_fraction={args.val_fraction} must be in [0, 1)')
    if args.seed < 0:
        fail(f'--seed={args.seed} must be >= 0')
    if args.num_shards < 1:
        fail(f'--num_shards={args.num_shards} must be >= 1')
    if not 0 <= args.shard_index < args.num_shards:
        fail(f'--shard_index={args.shard_index} must be in [0, --num_shards={args.num_shards})')
    check_choice('tokenization', args.tokenization, md.TOKENIZATIONS)
    check_choice('ner', args.ner, md.NER_MODES)
    tags = tuple(t for t in args.tags.split(',') if t)
    for t in tags:
        check_choice('tags', t, md.TAG_KINDS)
    if not tags:
        fail('--tags needs at least one of: full, causal')
    return tags

def main(argv=None):
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.merge:
            if args.out_dir is None:
                fail('--merge needs --out_dir')
            if args.input is not None:
                fail('--merge takes no --input (it combines finished shard directories)')
            return merge(args.merge, args.out_dir)
        return prepare(args)
    except PrepareError as e:
        fail(str(e), getattr(e, 'code', 1))

def prepare(args):
    out_dir = args.out_dir or ('data/gutenberg' if args.input is None else None)
    if out_dir is None:
        fail('--out_dir is required with --input')
    tags = check_args(args)
    try:
        md.set_tokenizer(args.tokenizer)  # before the workers fork: they inherit it
    except md.MetadataError as e:
        fail(str(e))
    t0 = time.time()
    out = resolve_out_dir(out_dir)  # before the work: a bad --out_dir fails at once
    try:
        # downloads happen here, in the main process, before the workers start
        md.ensure_resources(args.ner, extra=('gutenberg',) if args.input is None else ())
    except md.MetadataError as e:
        fail(str(e))
    refs = enumerate_documents(args.input)
    if not refs:
        fail(f"{' '.join(args.input)}: no documents found (empty input)")
    # deterministic, seeded split by document over the whole corpus; shards take every Nth
    n = len(refs)
    n_val = min(n - 1, max(1, round(n * args.val_fraction))) if args.val_fraction > 0 and n > 1 else 0
    val = set(np.random.default_rng(args.seed).permutation(n)[:n_val].tolist())
    mine = [i for i in range(n) if i % args.num_shards == args.shard_index]
    splits = ['val' if i in val else 'train' for i in mine]
    streams = md.stream_names(args.ner, tags)

    tmp = make_tmp(out)
    files, results = {}, None
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0, 'words': 0}
    job = dict(tokenization=args.tokenization, ner=args.ner, tags=tags, reference=args.reference)
    try:
        for s in ('train', 'val'):
            for k in [''] + streams:
                files[(s, k)] = open(os.path.join(tmp, f'{s}{"." + k if k else ""}.bin'), 'wb')
        items = ((split, name, text) for split, (name, text) in zip(splits, iter_named_texts([refs[i] for i in mine])))
        results = results_in_order(items, args.workers, job)
        progress = results
        if not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(results, total=len(mine), unit='doc', desc=f'prepare {out_dir}')
        for split, res, err in progress:
            if err:
                raise PrepareError(err)
            ids, st, nwords = res
            if len(ids) == 1:  # empty document: nothing but the separator
                continue
            files[(split, '')].write(ids.tobytes())
            for k in streams:
                files[(split, k)].write(st[k].tobytes())
            counts[f'{split}_tokens'] += len(ids)
            counts[f'{split}_docs'] += 1
            counts['words'] += nwords
        close_all(files.values())
        if counts['train_docs'] + counts['val_docs'] == 0:
            raise PrepareError(f"{' '.join(args.input or ['gutenberg'])}: no non-empty documents (empty input)")
        elapsed = time.time() - t0
        import nltk, tiktoken
        enc = md.encoding()
        meta = {
            'vocab_size': enc.n_vocab, 'tokenizer': md.TOKENIZER, 'eot_token': enc.eot_token,
            'dtype': 'uint16', 'tokenization': args.tokenization, 'ner': args.ner, 'tags': list(tags),
            'special': {'pad': md.PAD, 'space': md.SPACE, 'unk': md.UNK},
            'streams': {k: {'tags': md.stream_tags(k, args.ner)} for k in streams},
            **counts,
            'val_fraction': args.val_fraction, 'seed': args.seed,
            'num_shards': args.num_shards, 'shard_index': args.shard_index,
            'inputs': [os.path.abspath(i) for i in args.input] if args.input else ['nltk.corpus.gutenberg'],
            'reference_tagger': args.reference,
            'elapsed_s': round(elapsed, 2), 'words_per_sec': round(counts['words'] / elapsed, 1),
            'versions': {'python': platform.python_version(), 'numpy': np.__version__,
                         'nltk': nltk.__version__, 'tiktoken': tiktoken.__version__},
        }
        write_meta(tmp, meta)
        replace_dir(tmp, out)
    except OSError as e:
        discard(tmp, files.values())
        raise PrepareError(f'{out_dir}: cannot write the dataset ({e.strerror or e})')
    except BaseException:
        discard(tmp, files.values())
        raise
    finally:
        if results is not None:
            results.close()  # stops the workers
    total = counts['train_tokens'] + counts['val_tokens']
    print(f"wrote {out_dir}: {counts['train_tokens']:,} train + {counts['val_tokens']:,} val tokens "
          f"({counts['train_docs']} + {counts['val_docs']} docs), {counts['words']:,} words "
          f"in {elapsed:.1f}s ({counts['words'] / elapsed:,.0f} words/s, {total / elapsed:,.0f} tokens/s)")

if __name__ == '__main__':
    main()
