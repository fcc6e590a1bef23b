"""
Build a LIME training set: GPT-2 tokens plus aligned metadata streams, as uint16 files.

    python prepare.py                                   # NLTK's Gutenberg corpus -> data/gutenberg
    python prepare.py --ner binary                      # ... without the typed NE chunker (offline)
    python prepare.py --input docs/ more.jsonl --out_dir data/mine

Inputs: .txt files (one document each), .jsonl files (one document per line, field "text"),
or directories of them. Each document is followed by <|endoftext|> (metadata <pad>).
Output directory (nanoGPT's layout plus one file per metadata stream):
    train.bin, val.bin                      uint16 token ids
    train.<stream>.bin, val.<stream>.bin    uint16 tag ids, one per token
    meta.json                               vocab, tokenizer, streams and their tag names, counts
Streams: pos, ner (unless --ner none), word (B/I word boundaries, for the cohesion metrics),
and with --tags ...causal: pos_causal, ner_causal (tags of token t computed from tokens <= t).
Combine shards (--num_shards/--shard_index) with: python prepare.py --merge DIR [DIR ...] --out_dir DIR
"""
import os
import sys
import json
import time
import shutil
import argparse
import platform
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
p.add_argument('--val_fraction', type=float, default=0.1, help='fraction of documents for val')
p.add_argument('--seed', type=int, default=1337, help='seed of the train/val document split')
p.add_argument('--workers', type=int, default=os.cpu_count(), help='tagging processes')
p.add_argument('--num_shards', type=int, default=1, help='split the corpus across machines')
p.add_argument('--shard_index', type=int, default=0, help='which shard this run writes')
p.add_argument('--reference', action='store_true', help='tag with plain NLTK (slow, the reference)')
p.add_argument('--merge', nargs='+', default=None, metavar='DIR',
               help='concatenate finished shard directories into --out_dir')
p.add_argument('--no_progress', action='store_true', help='no tqdm progress bar')

class PrepareError(Exception):
    pass

def fail(msg):
    print(f'prepare.py: error: {msg}', file=sys.stderr)
    sys.exit(1)

def check_choice(name, value, allowed):
    if value not in allowed:
        fail(f"--{name}={value!r} is not one of: {', '.join(allowed)}")

# -----------------------------------------------------------------------------
# documents: (source, index) references are enumerated first, texts are read lazily

def list_files(paths):
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise PrepareError(f'{path}: no such file or directory')
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(('.txt', '.jsonl'))]
        elif path.endswith(('.txt', '.jsonl')):
            files.append(path)
        else:
            raise PrepareError(f'{path}: unsupported file type (expected .txt, .jsonl or a directory)')
    return files

def read_jsonl(path):
    """Yield (line_number, text) of a JSONL file, with a clear error for a bad line."""
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
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
            yield n, obj['text']

def read_txt(path):
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')  # bytes -> str as is: CRLF and all whitespace are kept
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path}: not valid UTF-8 (byte {e.start})')

def enumerate_documents(inputs):
    """List of (kind, path, line) document references, in a fixed order."""
    if inputs is None:
        from nltk.corpus import gutenberg
        return [('gutenberg', fid, 0) for fid in gutenberg.fileids()]
    refs = []
    for path in list_files(inputs):
        if path.endswith('.jsonl'):
            refs += [('jsonl', path, n) for n, _ in read_jsonl(path)]
        else:
            refs.append(('txt', path, 0))
    return refs

def iter_texts(refs):
    """Texts of the referenced documents, in order (a JSONL file is read once, sequentially)."""
    open_jsonl = None
    for kind, path, line in refs:
        if kind == 'gutenberg':
            from nltk.corpus import gutenberg
            yield gutenberg.raw(path)
        elif kind == 'txt':
            yield read_txt(path)
        else:
            if open_jsonl is None or open_jsonl[0] != path:
                open_jsonl = (path, read_jsonl(path))
            for n, text in open_jsonl[1]:
                if n == line:
                    yield text
                    break

# -----------------------------------------------------------------------------
# work: one document -> token ids and streams (runs in the workers)

_job = {}

def init_worker(job):
    _job.update(job)

def process(item):
    split, text = item
    try:
        ids, streams = md.annotate_text(text, _job['tokenization'], _job['ner'], _job['reference'])
        nwords = int(np.count_nonzero(streams['word'] == md.WORD_B))  # first token of each word
        if 'full' not in _job['tags']:
            streams = {}
        if 'causal' in _job['tags']:
            causal = md.annotate_ids(ids, _job['ner'], 'causal', _job['reference'])
            streams.update(causal)
    except md.MetadataError as e:
        return split, None, str(e)
    # append <|endoftext|> (metadata <pad>) so documents and shards concatenate cleanly
    ids = np.append(ids, md.encoding().eot_token).astype(np.uint16)
    streams = {k: np.append(v, md.PAD).astype(np.uint16) for k, v in streams.items()}
    return split, (ids, streams, nwords), None

# -----------------------------------------------------------------------------

def write_meta(out, meta):
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)

def replace_dir(tmp, out_dir):
    """Swap the finished temporary directory in; an old dataset is removed only after."""
    old = None
    if os.path.exists(out_dir):
        old = out_dir + f'.old-{os.getpid()}'
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old)

def merge(dirs, out_dir):
    metas = []
    for d in dirs:
        try:
            with open(os.path.join(d, 'meta.json')) as f:
                metas.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            fail(f'{d}/meta.json: cannot read ({e})')
    keys = ('vocab_size', 'tokenizer', 'tokenization', 'ner', 'streams')
    for d, m in zip(dirs, metas):
        if any(m.get(k) != metas[0].get(k) for k in keys):
            fail(f'{d}: shard does not match {dirs[0]} in one of {keys}')
    tmp = out_dir.rstrip('/') + f'.tmp-{os.getpid()}'
    os.makedirs(tmp)
    names = [''] + ['.' + s for s in metas[0]['streams']]
    for split in ('train', 'val'):
        for s in names:
            with open(os.path.join(tmp, f'{split}{s}.bin'), 'wb') as fo:
                for d in dirs:
                    with open(os.path.join(d, f'{split}{s}.bin'), 'rb') as fi:
                        shutil.copyfileobj(fi, fo, 1 << 24)
    meta = dict(metas[0])
    for k in ('train_tokens', 'val_tokens', 'train_docs', 'val_docs', 'words'):
        meta[k] = sum(m.get(k, 0) for m in metas)
    meta['merged_from'] = [os.path.abspath(d) for d in dirs]
    write_meta(tmp, meta)
    replace_dir(tmp, out_dir)
    print(f'merged {len(dirs)} shards into {out_dir}: {meta["train_tokens"]:,} train tokens')

def main(argv=None):
    args = p.parse_args(argv)
    out_dir = args.out_dir or ('data/gutenberg' if args.input is None else None)
    if out_dir is None:
        fail('--out_dir is required with --input')
    if args.merge:
        return merge(args.merge, out_dir)
    check_choice('tokenization', args.tokenization, md.TOKENIZATIONS)
    check_choice('ner', args.ner, md.NER_MODES)
    tags = tuple(t for t in args.tags.split(',') if t)
    for t in tags:
        check_choice('tags', t, md.TAG_KINDS)
    if not tags:
        fail('--tags needs at least one of: full, causal')
    try:
        md.set_tokenizer(args.tokenizer)  # before the workers fork: they inherit it
    except md.MetadataError as e:
        fail(str(e))
    if not 0 <= args.val_fraction < 1:
        fail(f'--val_fraction={args.val_fraction} must be in [0, 1)')
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        fail(f'--shard_index={args.shard_index} must be in [0, --num_shards={args.num_shards})')
    t0 = time.time()
    try:
        # downloads happen here, in the main process, before the workers start
        md.ensure_resources(args.ner, extra=('gutenberg',) if args.input is None else ())
        refs = enumerate_documents(args.input)
    except (PrepareError, md.MetadataError) as e:
        fail(str(e))
    if not refs:
        fail(f"{' '.join(args.input)}: no documents found (empty input)")
    # deterministic, seeded split by document over the whole corpus; shards take every Nth
    n = len(refs)
    n_val = min(n - 1, max(1, round(n * args.val_fraction))) if args.val_fraction > 0 and n > 1 else 0
    val = set(np.random.default_rng(args.seed).permutation(n)[:n_val].tolist())
    mine = [i for i in range(n) if i % args.num_shards == args.shard_index]
    splits = ['val' if i in val else 'train' for i in mine]
    streams = md.stream_names(args.ner, tags)

    tmp = out_dir.rstrip('/') + f'.tmp-{os.getpid()}'
    os.makedirs(tmp)
    files = {(s, k): open(os.path.join(tmp, f'{s}{"." + k if k else ""}.bin'), 'wb')
             for s in ('train', 'val') for k in [''] + streams}
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0, 'words': 0}
    job = dict(tokenization=args.tokenization, ner=args.ner, tags=tags, reference=args.reference)
    items = zip(splits, iter_texts([refs[i] for i in mine]))
    pool = None
    try:
        if args.workers > 1:
            pool = mp.get_context('fork').Pool(args.workers, initializer=init_worker, initargs=(job,))
            results = pool.imap(process, items, chunksize=1)
        else:
            init_worker(job)
            results = map(process, items)
        if not args.no_progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(mine), unit='doc', desc=f'prepare {out_dir}')
        for split, res, err in results:
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
    except (PrepareError, md.MetadataError, OSError) as e:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        fail(str(e))
    except BaseException:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if pool:
        pool.close()
        pool.join()
    for f in files.values():
        f.close()
    if counts['train_docs'] + counts['val_docs'] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"{' '.join(args.input or ['gutenberg'])}: no non-empty documents (empty input)")
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
        'inputs': args.input or ['nltk.corpus.gutenberg'], 'reference_tagger': args.reference,
        'elapsed_s': round(elapsed, 2), 'words_per_sec': round(counts['words'] / elapsed, 1),
        'versions': {'python': platform.python_version(), 'numpy': np.__version__,
                     'nltk': nltk.__version__, 'tiktoken': tiktoken.__version__},
    }
    write_meta(tmp, meta)
    replace_dir(tmp, out_dir)
    total = counts['train_tokens'] + counts['val_tokens']
    print(f"wrote {out_dir}: {counts['train_tokens']:,} train + {counts['val_tokens']:,} val tokens "
          f"({counts['train_docs']} + {counts['val_docs']} docs), {counts['words']:,} words "
          f"in {elapsed:.1f}s ({counts['words'] / elapsed:,.0f} words/s, {total / elapsed:,.0f} tokens/s)")

if __name__ == '__main__':
    main()
