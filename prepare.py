"""
Build a LIME training set: GPT-2 tokens plus aligned metadata streams, as uint16 files.

    python prepare.py                                   # NLTK's Gutenberg corpus -> data/gutenberg
    python prepare.py --ner binary                      # ... without the typed NE chunker (offline)
    python prepare.py --input docs/ more.jsonl --out_dir data/mine
    python prepare.py --input dclm/ --out_dir data/dclm.3 --num_shards 64 --shard_index 3
    python prepare.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT --out_dir data/fwe

Inputs: .txt files (one document each; a leading UTF-8 BOM is dropped); .jsonl, .jsonl.gz,
.jsonl.zst files (one document per line, field --text_field, default "text"); .parquet files
(one document per row, column --text_field); directories of them (symlinked subdirectories
followed); or a Hugging Face dataset, streamed (--hf_dataset). zstandard, pyarrow and datasets
are optional, needed only for their formats. Each document is followed by <|endoftext|>
(metadata <pad>); a literal "<|endoftext|>" inside a document is ordinary text.
Output directory (nanoGPT's layout plus one file per metadata stream):
    train.bin, val.bin                      uint16 token ids
    train.<stream>.bin, val.<stream>.bin    uint16 tag ids, one per token
    meta.json                               vocab, tokenizer, streams and their tag names, counts
Streams: pos, ner (unless --ner none), word (B/I word boundaries, for the cohesion metrics),
and with --tags ...causal: pos_causal, ner_causal (tags of token t computed from tokens <= t).
Shards: shard i of N reads input files i, i+N, ... only (--shard_index/--num_shards, by default
SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT); a complete shard is skipped when run again
(--overwrite to redo). python prepare.py --merge DIR [DIR ...] --out_dir DIR combines them into
exactly what one unsharded run writes.
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
import hashlib
import argparse
import platform
import traceback
import importlib
import multiprocessing as mp
from functools import lru_cache

import numpy as np

import metadata as md

# -----------------------------------------------------------------------------
# config

def default_workers():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (Slurm, taskset)
    except AttributeError:
        return os.cpu_count() or 1

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--input', nargs='+', default=None,
               help='.txt/.jsonl[.gz|.zst]/.parquet files or directories (default: nltk.corpus.gutenberg)')
p.add_argument('--text_field', default='text', help='JSONL field / parquet column holding the text')
p.add_argument('--hf_dataset', default=None, metavar='NAME',
               help='a Hugging Face dataset (name or local path), streamed, instead of --input')
p.add_argument('--hf_config', default=None, help='its configuration (subset)')
p.add_argument('--hf_split', default='train', help='its split')
p.add_argument('--out_dir', default=None, help='output dataset directory (default: data/gutenberg)')
p.add_argument('--tokenizer', default='gpt2', help="gpt2 | gpt2-N: GPT-2's first N ranks (small vocab)")
p.add_argument('--tokenization', default='lime', help="lime (each word encoded on its own) | plain")
p.add_argument('--ner', default='typed', help='typed (NLTK default chunker) | binary | none')
p.add_argument('--tags', default='full,causal', help='comma-separated: full, causal')
p.add_argument('--val_fraction', type=float, default=0.1, help='fraction of documents for val, in [0, 1)')
p.add_argument('--seed', type=int, default=1337, help='seed of the train/val document split (>= 0)')
p.add_argument('--workers', type=int, default=default_workers(), help='tagging processes, 1 to 1024')
p.add_argument('--num_shards', type=int, default=None,
               help='split the corpus across machines (default: SLURM_ARRAY_TASK_COUNT, else 1)')
p.add_argument('--shard_index', type=int, default=None,
               help='which shard this run writes, in [0, num_shards) (default: SLURM_ARRAY_TASK_ID)')
p.add_argument('--overwrite', action='store_true', help='redo a shard that is already complete')
p.add_argument('--chunk_chars', type=int, default=1 << 17,
               help='work unit size in characters: long documents are tagged in pieces (same output)')
p.add_argument('--reference', action='store_true', help='tag with plain NLTK (slow, the reference)')
p.add_argument('--merge', nargs='+', default=None, metavar='DIR',
               help='combine the finished shard directories of one run into --out_dir')
p.add_argument('--no_progress', action='store_true', help='no tqdm progress bar')

MAX_WORKERS = 1024
HOST = socket.gethostname()
# what prepare.py writes into a dataset directory: only such a directory is ever replaced
OUR_FILE = re.compile(r'(train|val)(\.\w+)?\.bin|meta\.json')
SURROGATE = re.compile('[\ud800-\udfff]')
JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.jsonl.zstd')
FORMATS = ('.txt', '.parquet') + JSONL

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

def on_signal(signum, frame):
    # ignore repeats while cleaning up, then unwind like an error
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(signum)

def need(module, package, user):
    """Import an optional extra, or a one-line error naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PrepareError(f'{user}: needs the {package} package (pip install {package})')

# -----------------------------------------------------------------------------
# inputs. A corpus is a list of units, read in order: files, the Gutenberg books, or a Hugging
# Face dataset's shards (its files). Shard i of N reads units i, i+N, ... and nothing else.
# A unit is (kind, path, key): kind txt | jsonl | parquet | gutenberg | hf, key its name in
# the train/val split (the path relative to the input root, without the format extension).

def list_files(paths):
    """Input files (path, key) in a fixed order. Directories are walked in sorted order,
    following symlinked subdirectories; a directory reached twice (a symlink loop, or two
    links to one directory) is read once."""
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
                files += [(os.path.join(root, n), os.path.relpath(os.path.join(root, n), path))
                          for n in sorted(names) if n.endswith(FORMATS)]
        elif path.endswith(FORMATS):
            files.append((path, os.path.basename(path)))
        else:
            raise PrepareError(f'{path}: unsupported file type (expected {", ".join(FORMATS)} '
                               f'or a directory)')
    return files

def file_unit(path, rel):
    ext = next(e for e in sorted(FORMATS, key=len, reverse=True) if path.endswith(e))
    kind = 'jsonl' if ext in JSONL else ext[1:]
    return kind, path, rel[:-len(ext)].replace(os.sep, '/')

def list_units(args):
    """The corpus' units, and the Hugging Face dataset object when there is one."""
    if args.hf_dataset:
        datasets = need('datasets', 'datasets', f'--hf_dataset {args.hf_dataset}')
        try:
            ds = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split, streaming=True)
        except Exception as e:  # the library's errors are many and its own; one line for all
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise PrepareError(f'--hf_dataset {args.hf_dataset}: cannot load ({type(e).__name__}: {msg})')
        name = f'{args.hf_dataset}:{args.hf_config or ""}:{args.hf_split}'
        return [('hf', name, f'{args.hf_split}/{k}') for k in range(ds.num_shards)], ds
    if args.input is None:
        from nltk.corpus import gutenberg
        return [('gutenberg', fid, fid) for fid in gutenberg.fileids()], None
    return [file_unit(path, rel) for path, rel in list_files(args.input)], None

def open_input(path):
    try:
        return open(path, 'rb')
    except OSError as e:
        raise PrepareError(f'{path}: cannot read ({e.strerror})')

def read_txt(path):
    with open_input(path) as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')  # bytes -> str as is: CRLF and all whitespace are kept
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path}: not valid UTF-8 (byte {e.start})')
    return text[1:] if text.startswith('\ufeff') else text  # a BOM is not text

def zstd_blocks(f, path):
    """Decompressed blocks of a zstd file, frame after frame; a truncated last frame is an
    error (zstandard's stream reader would end quietly)."""
    zstd = need('zstandard', 'zstandard', path)
    d, obj = zstd.ZstdDecompressor(), None
    while True:
        data = f.read(1 << 20)
        if not data:
            break
        while data:
            obj = obj or d.decompressobj()
            out = obj.decompress(data)
            if out:
                yield out
            data, obj = (obj.unused_data, None) if obj.eof else (b'', obj)
    if obj is not None:
        raise EOFError('the last zstd frame is incomplete')

def split_lines(blocks):
    rest = []
    for b in blocks:
        lines = b.split(b'\n')
        if len(lines) == 1:
            rest.append(b)
            continue
        lines[0] = b''.join(rest) + lines[0]
        rest = [lines.pop()]
        yield from lines
    tail = b''.join(rest)
    if tail:
        yield tail

def raw_lines(path):
    """The lines (bytes) of a .jsonl file, plain, gzip or zstd. Corrupt or truncated compressed
    data is a PrepareError naming the last good line."""
    import zlib
    errors = (OSError, EOFError, zlib.error)
    if path.endswith(('.zst', '.zstd')):
        errors += (need('zstandard', 'zstandard', path).ZstdError,)
    n = 0
    with open_input(path) as f:
        try:
            if path.endswith('.gz'):
                import gzip
                lines = gzip.GzipFile(fileobj=f)
            elif path.endswith(('.zst', '.zstd')):
                lines = split_lines(zstd_blocks(f, path))
            else:
                lines = f
            for raw in lines:
                n += 1
                yield raw
        except errors as e:
            raise PrepareError(f'{path}: corrupt or truncated data after line {n} ({e})')

def read_jsonl(path, field):
    """(index, name, text) of the documents of a JSONL file; index = line number - 1."""
    for n, raw in enumerate(raw_lines(path), 1):
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
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise PrepareError(f'{path}:{n}: no string field "{field}" (see --text_field)')
        text = obj[field]
        m = SURROGATE.search(text)
        if m:  # JSON can escape one ("\ud800"); it is not text and has no UTF-8 form
            raise PrepareError(f'{path}:{n}: "{field}" holds a lone surrogate (U+{ord(m.group()):04X})')
        yield n - 1, f'{path}:{n}', text

def parquet_file(path, field):
    """The opened parquet file (its footer read), refused unless it has a text column `field`."""
    pq = need('pyarrow.parquet', 'pyarrow', path)
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f'{path}: not a readable parquet file ({e})')
    schema = pf.schema_arrow
    if field not in schema.names:
        raise PrepareError(f'{path}: no column "{field}" (columns: {", ".join(schema.names)}; see --text_field)')
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or
            getattr(pa.types, 'is_string_view', lambda t: False)(t)):
        raise PrepareError(f'{path}: column "{field}" holds {t}, not text')
    return pf

def read_parquet(path, field):
    """(index, name, text) of the rows of a parquet file, read a batch at a time."""
    import pyarrow as pa
    pf, row = parquet_file(path, field), 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise PrepareError(f'{path}: row {row}: "{field}" is null')
                yield row, f'{path}: row {row}', text
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f'{path}: corrupt parquet data after row {row} ({e})')

def read_hf(ds, name, key, field):
    k = int(key.rsplit('/', 1)[1])
    row = 0
    try:
        for ex in ds.shard(num_shards=ds.num_shards, index=k):
            text = ex.get(field)
            if not isinstance(text, str):
                raise PrepareError(f'{name} shard {k} row {row}: no string field "{field}" (see --text_field)')
            yield row, f'{name} shard {k} row {row}', text
            row += 1
    except PrepareError:
        raise
    except Exception as e:
        raise PrepareError(f'{name} shard {k}: cannot read after row {row} ({type(e).__name__}: {e})')

def read_unit(unit, field, hf=None):
    """(index, name, text) of each document of a unit, in order."""
    kind, path, key = unit
    if kind == 'gutenberg':
        from nltk.corpus import gutenberg
        yield 0, path, gutenberg.raw(path)
    elif kind == 'txt':
        yield 0, path, read_txt(path)
    elif kind == 'jsonl':
        yield from read_jsonl(path, field)
    elif kind == 'parquet':
        yield from read_parquet(path, field)
    else:
        yield from read_hf(hf, path, key, field)

def check_unit(unit, field):
    """Before any tagging: a .txt is decoded in full, a JSONL file up to its first document,
    a parquet file's schema read. (Gutenberg and Hugging Face shards are streamed as they are.)"""
    kind, path, _ = unit
    if kind == 'txt':
        read_txt(path)
    elif kind == 'jsonl':
        docs = read_jsonl(path, field)
        next(docs, None)
        docs.close()
    elif kind == 'parquet':
        parquet_file(path, field)

# bench.py reads small corpora as plain texts through these two
def enumerate_documents(inputs):
    """The units of --input paths (None: Gutenberg)."""
    return list_units(argparse.Namespace(hf_dataset=None, input=inputs))[0]

def iter_texts(units):
    """The texts of all documents of the units, in order."""
    for u in units:
        for _, _, text in read_unit(u, 'text'):
            yield text

# -----------------------------------------------------------------------------
# the train/val split, decided per document without any global count:
# - a whole-file document (.txt, a Gutenberg book): a seeded permutation of the corpus' files,
#   --val_fraction of them (at least one, never all) in val: the file count is known from the
#   listing alone. (This is the split prepare.py always made, so those datasets do not change.)
# - a record (a JSONL line, a parquet or Hugging Face row): in val when
#   blake2b-64(f"{seed}\0{key}\0{index}") < val_fraction * 2**64, key = the file's path relative
#   to the input root without its format extension, index = the 0-based line or row. The same
#   records split the same way in every format, every shard and every run.

def file_val_set(units, val_fraction, seed):
    whole = [j for j, u in enumerate(units) if u[0] in ('txt', 'gutenberg')]
    n = len(whole)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    return {whole[i] for i in np.random.default_rng(seed).permutation(n)[:n_val].tolist()}

def record_in_val(key, index, seed, val_fraction):
    h = hashlib.blake2b(f'{seed}\0{key}\0{index}'.encode('utf-8', 'surrogateescape'), digest_size=8)
    return int.from_bytes(h.digest(), 'big') < val_fraction * 2 ** 64

def documents(units, mine, args, hf):
    """(unit number, name, split, text) of this shard's documents, read lazily in order."""
    val_files = file_val_set(units, args.val_fraction, args.seed)
    for j in mine:
        kind, _, key = units[j]
        for index, name, text in read_unit(units[j], args.text_field, hf):
            if kind in ('txt', 'gutenberg'):
                val = j in val_files
            else:
                val = args.val_fraction > 0 and record_in_val(key, index, args.seed, args.val_fraction)
            yield j, name, 'val' if val else 'train', text

# -----------------------------------------------------------------------------
# work units. Small documents are batched, long ones cut into pieces of about chunk_chars, so
# every worker stays busy (the Bible is 40% of Gutenberg's words). A cut must not change any
# output, full or causal, so it is made only where the annotation of the whole text provably
# equals the annotations of the two pieces side by side, at c with text[:c] ending in
#   <whitespace> W P     W: 2+ ASCII letters, P one of . ? !, and when P is '.', W (lowercased)
#                        is not one of punkt's abbreviations nor the first word of a collocation
# and text[c:] starting with [ \t\r\n]+ then an ASCII letter or digit. Why that suffices:
# - punkt (NLTK's sentence splitter, which metadata.py uses) decides each candidate break from
#   a context string of the word before, the mark and the next token alone. Here the context
#   is 'W. N...' for any next token N: its first pass marks 'W.' (or '?', '!') a break and its
#   second pass only undoes that for abbreviations, collocations, initials and numbers, none of
#   which W is. So a sentence ends at c in the whole text, and in every prefix of it that goes
#   past the whitespace (the causal tags of the second piece are those prefixes); a prefix that
#   ends in the whitespace has no candidate at c and also ends its last sentence at c. The
#   whitespace before W keeps the candidate from merging with an earlier one, the letter or
#   digit after c keeps punkt from moving closing punctuation across c; sentence breaks before
#   c see the same text in the first piece, those after c the same text in the second (a
#   leading whitespace changes no context's tokens).
# - words, POS and NER tags are computed sentence by sentence (the Treebank word tokenizer
#   splits the final mark off as a word ending at c, and ignores leading whitespace before a
#   letter or digit), so they are those of the two pieces.
# - 'lime' tokenization encodes each word chunk (the text after the previous word up to the
#   end of this word) on its own, and a word ends at c; 'plain' BPE never merges across a
#   change from a non-space to a space. So no token crosses c.
# tests/test_prepare.py checks pieces against whole documents on Gutenberg books and on texts
# made to tempt the rule (abbreviations, initials, quotes, numbers).
CUT = re.compile(r'(?<=\s)([A-Za-z]{2,})([.?!])(?=[ \t\r\n]+[A-Za-z0-9])')

@lru_cache(maxsize=None)
def punkt_exceptions():
    """Words whose '.' punkt may not read as a sentence end: abbreviations, collocation starts."""
    from nltk.tokenize import PunktTokenizer
    params = PunktTokenizer('english')._params
    return frozenset(params.abbrev_types) | {a for a, _ in params.collocations}

def cut_document(text, size):
    """The pieces of a document: about `size` characters each, cut where the rule above holds."""
    if len(text) < 2 * size:
        return [text]
    pieces, start = [], 0
    while len(text) - start >= 2 * size:
        cut = None
        for m in CUT.finditer(text, start + size):
            if m.group(2) != '.' or m.group(1).lower() not in punkt_exceptions():
                cut = m.end()
                break
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces

def make_tasks(docs, size):
    """Lists of (unit, name, split, last piece of its document?, text) of about `size` chars."""
    task, n = [], 0
    for j, name, split, text in docs:
        if not text:
            continue  # an empty document is left out
        pieces = cut_document(text, size)
        for k, piece in enumerate(pieces):
            task.append((j, name, split, k == len(pieces) - 1, piece))
            n += len(piece)
            if n >= size:
                yield task
                task, n = [], 0
    if task:
        yield task

# -----------------------------------------------------------------------------
# tagging (runs in the workers)

_job = {}

def init_worker(job):
    _job.update(job)

def process(task):
    """A task's pieces -> ([(unit, split, last, ids, streams, words)], None) or (None, error)."""
    out = []
    for j, name, split, last, text in task:
        try:
            ids, streams = md.annotate_text(text, _job['tokenization'], _job['ner'], _job['reference'])
            nwords = int(np.count_nonzero(streams['word'] == md.WORD_B))  # first token of each word
            if 'full' not in _job['tags']:
                streams = {}
            if 'causal' in _job['tags']:
                streams.update(md.annotate_ids(ids, _job['ner'], 'causal', _job['reference']))
        except md.MetadataError as e:
            return None, f'{name}: {e}'
        out.append((j, split, last, ids.astype(np.uint16),
                    {k: v.astype(np.uint16) for k, v in streams.items()}, nwords))
    return out, None

def die_with_parent():
    """Linux: the kernel kills this worker when the main process dies, even by SIGKILL
    (elsewhere the worker notices at its next idle second: see worker_loop)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

def worker_loop(job, tasks, results, parent):
    # the main process handles Ctrl-C and SIGTERM, and kills the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    if os.getppid() != parent:  # it died before that
        return
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
# the output directory: written as DIR.tmp-HOST-PID, swapped in when complete, so a directory
# with a meta.json is always complete

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

def bin_names(streams):
    return [f'{split}{"." + k if k else ""}.bin' for split in ('train', 'val') for k in [''] + list(streams)]

# -----------------------------------------------------------------------------
# merge: the shards' per-unit pieces put back in unit order = the unsharded run, byte for byte

# a run's identity: all shards of one run agree on these, and a complete shard is skipped only
# when a new run agrees too (shard_index aside, checked separately)
IDENTITY = ('inputs', 'text_field', 'num_units', 'num_shards', 'seed', 'val_fraction', 'vocab_size',
            'tokenizer', 'tokenization', 'ner', 'tags', 'streams', 'reference_tagger')

def read_shards(dirs):
    """meta.json of each shard, checked: readable, complete, one run, each shard once, every
    file there with its size."""
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
        missing = [k for k in IDENTITY + ('shard_index', 'units') if k not in m]
        if missing:
            raise PrepareError(f'{path}: no {missing[0]!r} (made by an older prepare.py? rebuild it)')
        metas.append(m)
    first = dirs[0]
    for d, m in zip(dirs, metas):
        for k in IDENTITY:
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
    for d, m in zip(dirs, metas):
        for split in ('train', 'val'):
            if sum(u[1 if split == 'train' else 2] for u in m['units']) != m[f'{split}_tokens']:
                raise PrepareError(f'{d}/meta.json: its units do not add up to {split}_tokens')
        for name in bin_names(m['streams']):
            path = os.path.join(d, name)
            want = 2 * m[f'{name.split(".")[0]}_tokens']
            if not os.path.isfile(path):
                raise PrepareError(f'{path}: missing (meta.json lists it)')
            if os.path.getsize(path) != want:
                raise PrepareError(f'{path}: {os.path.getsize(path):,} bytes, meta.json says {want:,}')
    return dirs, metas

def merge(dirs, out_dir):
    dirs, metas = read_shards(dirs)
    # (unit, shard dir, {split: (token offset in the shard's file, tokens)}) in unit order
    segments, seen = [], {}
    for d, m in zip(dirs, metas):
        off = {'train': 0, 'val': 0}
        for j, n_train, n_val in m['units']:
            if j in seen:
                raise PrepareError(f'{d}: input unit {j} is also in {seen[j]}: not shards of one run')
            seen[j] = d
            segments.append((j, d, {'train': (off['train'], n_train), 'val': (off['val'], n_val)}))
            off['train'] += n_train
            off['val'] += n_val
    segments.sort(key=lambda s: s[0])
    out = resolve_out_dir(out_dir)
    tmp = make_tmp(out)
    files = []
    try:
        for name in bin_names(metas[0]['streams']):
            split = name.split('.')[0]
            fo = open(os.path.join(tmp, name), 'wb')
            files.append(fo)
            for _, d, seg in segments:
                start, count = seg[split]
                if count:
                    with open(os.path.join(d, name), 'rb') as fi:
                        fi.seek(2 * start)
                        left = 2 * count
                        while left:
                            block = fi.read(min(left, 1 << 24))
                            if not block:
                                raise PrepareError(f'{d}/{name}: shorter than meta.json says')
                            fo.write(block)
                            left -= len(block)
        close_all(files)
        meta = dict(metas[0])
        for k in ('train_tokens', 'val_tokens', 'train_docs', 'val_docs', 'words'):
            meta[k] = sum(m[k] for m in metas)
        meta['units'] = [[j, seg['train'][1], seg['val'][1]] for j, _, seg in segments]
        meta.update(num_shards=1, shard_index=0, shard_from='merged',
                    elapsed_s=round(sum(m['elapsed_s'] for m in metas), 2),
                    merged_from=[os.path.abspath(d) for d in dirs])
        meta['words_per_sec'] = round(meta['words'] / max(meta['elapsed_s'], 1e-9), 1)
        write_meta(tmp, meta)
        replace_dir(tmp, out)
    except OSError as e:
        discard(tmp, files)
        raise PrepareError(f'{out_dir}: cannot write the merged dataset ({e.strerror or e})')
    except BaseException:
        discard(tmp, files)
        raise
    print(f'merged {len(dirs)} shards into {out_dir}: {meta["train_tokens"]:,} train + '
          f'{meta["val_tokens"]:,} val tokens ({meta["train_docs"]} + {meta["val_docs"]} docs)')

# -----------------------------------------------------------------------------

def shard_args(args):
    """--num_shards/--shard_index, by default from a Slurm job array."""
    env = os.environ
    source = 'options'
    if args.num_shards is None and 'SLURM_ARRAY_TASK_COUNT' in env:
        try:
            args.num_shards = int(env['SLURM_ARRAY_TASK_COUNT'])
            if args.shard_index is None:
                args.shard_index = int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', 0))
        except (KeyError, ValueError):
            fail('SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_MIN: not integers')
        source = 'SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT (use --array=0-N)'
    args.num_shards = 1 if args.num_shards is None else args.num_shards
    args.shard_index = 0 if args.shard_index is None else args.shard_index
    if args.num_shards < 1:
        fail(f'--num_shards={args.num_shards} must be >= 1')
    if not 0 <= args.shard_index < args.num_shards:
        fail(f'--shard_index={args.shard_index} must be in [0, --num_shards={args.num_shards}) ({source})')
    return source

def check_args(args):
    if not 1 <= args.workers <= MAX_WORKERS:
        fail(f'--workers={args.workers} must be in [1, {MAX_WORKERS}]')
    if not 0 <= args.val_fraction < 1:
        fail(f'--val_fraction={args.val_fraction} must be in [0, 1)')
    if args.seed < 0:
        fail(f'--seed={args.seed} must be >= 0')
    if args.chunk_chars < 1:
        fail(f'--chunk_chars={args.chunk_chars} must be >= 1')
    if not args.text_field:
        fail('--text_field must not be empty')
    if args.input is not None and args.hf_dataset is not None:
        fail('--input and --hf_dataset: give one of them')
    for name, value, allowed in (('tokenization', args.tokenization, md.TOKENIZATIONS),
                                 ('ner', args.ner, md.NER_MODES)):
        if value not in allowed:
            fail(f"--{name}={value!r} is not one of: {', '.join(allowed)}")
    tags = tuple(t for t in args.tags.split(',') if t)
    for t in tags:
        if t not in md.TAG_KINDS:
            fail(f"--tags={t!r} is not one of: {', '.join(md.TAG_KINDS)}")
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
            if args.input is not None or args.hf_dataset is not None:
                fail('--merge takes no --input or --hf_dataset (it combines finished shard directories)')
            return merge(args.merge, args.out_dir)
        return prepare(args)
    except PrepareError as e:
        fail(str(e), getattr(e, 'code', 1))

def prepare(args):
    default = args.input is None and args.hf_dataset is None
    out_dir = args.out_dir or ('data/gutenberg' if default else None)
    if out_dir is None:
        fail('--out_dir is required with --input or --hf_dataset')
    tags = check_args(args)
    shard_source = shard_args(args)
    try:
        md.set_tokenizer(args.tokenizer)  # before the workers fork: they inherit it
    except md.MetadataError as e:
        fail(str(e))
    t0 = time.time()
    out = resolve_out_dir(out_dir)  # before the work: a bad --out_dir fails at once
    try:
        # downloads happen here, in the main process, before the workers start
        md.ensure_resources(args.ner, extra=('gutenberg',) if default else ())
    except md.MetadataError as e:
        fail(str(e))
    units, hf = list_units(args)
    what = f'--hf_dataset {args.hf_dataset}' if args.hf_dataset else ' '.join(args.input or ['gutenberg'])
    if not units:
        fail(f'{what}: no documents found (empty input)')
    if len(units) < args.num_shards:
        fail(f'--num_shards={args.num_shards}: the input has only {len(units)} files; shards split '
             f'the corpus by file, so use at most {len(units)}')
    streams = md.stream_names(args.ner, tags)
    enc = md.encoding()
    identity = {
        'inputs': ([os.path.abspath(i) for i in args.input] if args.input else
                   [f'hf:{args.hf_dataset}:{args.hf_config or ""}:{args.hf_split}'] if args.hf_dataset
                   else ['nltk.corpus.gutenberg']),
        'text_field': args.text_field, 'num_units': len(units), 'num_shards': args.num_shards,
        'seed': args.seed, 'val_fraction': args.val_fraction, 'vocab_size': enc.n_vocab,
        'tokenizer': md.TOKENIZER, 'tokenization': args.tokenization, 'ner': args.ner,
        'tags': list(tags), 'streams': {k: {'tags': md.stream_tags(k, args.ner)} for k in streams},
        'reference_tagger': args.reference,
    }
    if args.num_shards > 1 and os.path.isfile(os.path.join(out, 'meta.json')) and not args.overwrite:
        try:
            with open(os.path.join(out, 'meta.json')) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        want = {**identity, 'shard_index': args.shard_index}
        diff = [k for k in want if old.get(k) != want[k]]
        if not diff:
            print(f'{out_dir}: shard {args.shard_index} of {args.num_shards} is already complete '
                  f'(meta.json); skipped (--overwrite to redo it)')
            return
        fail(f'{out_dir}: holds a dataset made with another {diff[0]} ({old.get(diff[0])!r}); '
             f'--overwrite to replace it')
    mine = list(range(args.shard_index, len(units), args.num_shards))  # units i, i+N, ...
    for j in mine:
        check_unit(units[j], args.text_field)  # a bad file fails now, not hours into the run

    tmp = make_tmp(out)
    files, results, bar = {}, None, None
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0, 'words': 0}
    per_unit = {}  # unit -> [train tokens, val tokens] of this shard's units
    job = dict(tokenization=args.tokenization, ner=args.ner, tags=tags, reference=args.reference)
    eot = {k: np.array([enc.eot_token if k == '' else md.PAD], dtype=np.uint16).tobytes() for k in [''] + streams}
    try:
        for s in ('train', 'val'):
            for k in [''] + streams:
                files[(s, k)] = open(os.path.join(tmp, f'{s}{"." + k if k else ""}.bin'), 'wb')
        tasks = make_tasks(documents(units, mine, args, hf), args.chunk_chars)
        results = results_in_order(tasks, args.workers, job)
        if not args.no_progress:
            from tqdm import tqdm
            shard = f' shard {args.shard_index}/{args.num_shards}' if args.num_shards > 1 else ''
            bar = tqdm(unit='word', unit_scale=True, desc=f'prepare {out_dir}{shard} ({len(mine)} files)')
        for out_pieces, err in results:
            if err:
                raise PrepareError(err)
            words = 0
            for j, split, last, ids, st, nwords in out_pieces:
                files[(split, '')].write(ids.tobytes())
                for k in streams:
                    files[(split, k)].write(st[k].tobytes())
                n = len(ids)
                if last:  # <|endoftext|> (metadata <pad>) after each document
                    for k in [''] + streams:
                        files[(split, k)].write(eot[k])
                    n += 1
                    counts[f'{split}_docs'] += 1
                counts[f'{split}_tokens'] += n
                per_unit.setdefault(j, [0, 0])[split == 'val'] += n
                words += nwords
            counts['words'] += words
            if bar is not None:
                bar.update(words)
        close_all(files.values())
        if args.num_shards == 1 and counts['train_docs'] + counts['val_docs'] == 0:
            raise PrepareError(f'{what}: no non-empty documents (empty input)')
        elapsed = time.time() - t0
        import nltk, tiktoken
        meta = {
            **identity, 'eot_token': enc.eot_token, 'dtype': 'uint16',
            'special': {'pad': md.PAD, 'space': md.SPACE, 'unk': md.UNK},
            **counts, 'shard_index': args.shard_index, 'shard_from': shard_source,
            'hf_config': args.hf_config, 'hf_split': args.hf_split,
            'units': [[j, *per_unit.get(j, [0, 0])] for j in mine],
            'elapsed_s': round(elapsed, 2), 'words_per_sec': round(counts['words'] / elapsed, 1),
            'versions': {'python': platform.python_version(), 'numpy': np.__version__,
                         'nltk': nltk.__version__, 'tiktoken': tiktoken.__version__},
        }
        write_meta(tmp, meta)  # last: a directory with a meta.json is complete
        replace_dir(tmp, out)
    except OSError as e:
        discard(tmp, files.values())
        raise PrepareError(f'{out_dir}: cannot write the dataset ({e.strerror or e})')
    except BaseException:
        discard(tmp, files.values())
        raise
    finally:
        if bar is not None:
            bar.close()
        if results is not None:
            results.close()  # stops the workers
    total = counts['train_tokens'] + counts['val_tokens']
    print(f"wrote {out_dir}: {counts['train_tokens']:,} train + {counts['val_tokens']:,} val tokens "
          f"({counts['train_docs']} + {counts['val_docs']} docs), {counts['words']:,} words "
          f"in {elapsed:.1f}s ({counts['words'] / elapsed:,.0f} words/s, {total / elapsed:,.0f} tokens/s)")

if __name__ == '__main__':
    main()
