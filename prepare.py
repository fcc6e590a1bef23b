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
exactly what one unsharded run writes. An existing dataset is replaced only with --overwrite; a
directory holding anything else is never touched. Only regular files are read, and a document
larger than --max_doc_bytes (64 MiB) is an error.
"""
import os
import re
import sys
import json
import stat
import time
import queue
import shutil
import signal
import socket
import argparse
import platform
import traceback
import importlib
import multiprocessing as mp
from functools import lru_cache

import numpy as np

import metadata as md
from common import (MAX_DOC_BYTES, SURROGATE, LimeError, decode_text, fail, pid_alive,  # MAX_DOC_BYTES: see --max_doc_bytes
                    record_in_val)

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
p.add_argument('--overwrite', action='store_true',
               help='replace the dataset in --out_dir (a complete shard is otherwise skipped)')
p.add_argument('--max_doc_bytes', type=int, default=MAX_DOC_BYTES,
               help='refuse a document (a .txt file, a JSONL line, a parquet/HF text) of more bytes '
                    'than this (default 64 MiB): a decompression bomb or runaway line fails at once')
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
META_KEYS = ('vocab_size', 'streams', 'train_tokens', 'val_tokens')  # in every meta.json we wrote
# in each OUT.tmp-HOST-PID / OUT.old-HOST-PID directory prepare.py makes, holding that name: a
# later run removes a leftover directory only when it holds this marker
MARK = '.prepare.py-leftover'
JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.jsonl.zstd')
FORMATS = ('.txt', '.parquet') + JSONL

class Stopped(LimeError):
    """SIGTERM or Ctrl-C: handled like an error (clean up, one line), exit code 128 + signal."""
    def __init__(self, signum):
        super().__init__(f'stopped by {signal.Signals(signum).name}; nothing written')
        self.code = 128 + signum   # SystemExit's exit status

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
        raise LimeError(f'{user}: needs the {package} package (pip install {package})')

# -----------------------------------------------------------------------------
# inputs. A corpus is a list of units, read in order: files, the Gutenberg books, or a Hugging
# Face dataset's shards (its files). Shard i of N reads units i, i+N, ... and nothing else.
# A unit is (kind, path, key): kind txt | jsonl | parquet | gutenberg | hf, key its name in
# the train/val split (the path relative to the input root, without the format extension).

def regular_file(path):
    """Refuse anything but a regular file (symlinks followed): a FIFO would block the run
    forever, /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise LimeError(f'{path}: cannot read ({e.strerror})')
    if not stat.S_ISREG(mode):
        raise LimeError(f'{path}: not a regular file (a FIFO, device or socket); only regular files are read')

def walk(top):
    """(path, key) of the input files under directory top: sorted, depth first, subdirectories
    after their directory's files (os.walk's order), with an explicit stack, so any depth works.
    Symlinked subdirectories are followed; a directory reached twice (a symlink loop, or two
    links to one directory) is read once."""
    files, seen, stack = [], {os.stat(top)[1:3]}, [top]  # (st_ino, st_dev): a directory's identity
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise LimeError(f'{d}: cannot read ({e.strerror})')
        subdirs = []
        for e in entries:
            try:
                st = e.stat() if e.is_dir() else None
            except OSError:
                st = None  # a broken link, a loop of links: not a directory (as os.walk)
            if st is not None:
                if st[1:3] not in seen:
                    seen.add(st[1:3])
                    subdirs.append(e.path)
            elif e.name.endswith(FORMATS):
                regular_file(e.path)
                files.append((e.path, os.path.relpath(e.path, top)))
        stack += reversed(subdirs)
    return files

def list_files(paths):
    """Input files (path, key) in a fixed order: directories walked (see walk), regular files only."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise LimeError(f'{path}: no such file or directory')
        if os.path.isdir(path):
            files += walk(path)
        elif path.endswith(FORMATS):
            regular_file(path)
            files.append((path, os.path.basename(path)))
        else:
            raise LimeError(f'{path}: unsupported file type (expected {", ".join(FORMATS)} '
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
            raise LimeError(f'--hf_dataset {args.hf_dataset}: cannot load ({type(e).__name__}: {msg})')
        name = f'{args.hf_dataset}:{args.hf_config or ""}:{args.hf_split}'
        return [('hf', name, f'{args.hf_split}/{k}') for k in range(ds.num_shards)], ds
    if args.input is None:
        from nltk.corpus import gutenberg
        return [('gutenberg', fid, fid) for fid in gutenberg.fileids()], None
    return [file_unit(path, rel) for path, rel in list_files(args.input)], None

def open_input(path):
    regular_file(path)  # checked when listed too: a run can be long
    try:
        return open(path, 'rb')
    except OSError as e:
        raise LimeError(f'{path}: cannot read ({e.strerror})')

def too_big(name, limit):
    return LimeError(f'{name}: longer than --max_doc_bytes={limit:,} bytes (corrupt, or a '
                     f'decompression bomb? if it is a real document, raise --max_doc_bytes)')

def read_txt(path, limit):
    with open_input(path) as f:
        raw = f.read(limit + 1)  # never more than the limit: the file may be huge or growing
    if len(raw) > limit:
        raise too_big(path, limit)
    return decode_text(path, raw)  # as sample.py reads a prompt file

ZSTD_STEP = 256  # zstd input bytes per call: they decompress to at most 8 MiB (128 KiB per 4 bytes)

def zstd_blocks(f, path):
    """Decompressed blocks of a zstd file, frame after frame, each at most 8 MiB however well it
    compresses (the decompressor has no output limit, so it gets ZSTD_STEP bytes at a time); a
    truncated last frame is an error (zstandard's stream reader would end quietly)."""
    zstd = need('zstandard', 'zstandard', path)
    d, obj = zstd.ZstdDecompressor(), None
    while True:
        block = f.read(1 << 20)
        if not block:
            break
        for i in range(0, len(block), ZSTD_STEP):
            data = block[i:i + ZSTD_STEP]
            while data:
                obj = obj or d.decompressobj()
                out = obj.decompress(data)
                if out:
                    yield out
                data, obj = (obj.unused_data, None) if obj.eof else (b'', obj)
    if obj is not None:
        raise EOFError('the last zstd frame is incomplete')

def split_lines(blocks, path, limit):
    """The lines of a stream of blocks. A line longer than `limit` bytes is refused once that
    much of it is read (an endless line, a decompression bomb): memory stays below the limit
    plus one block."""
    rest, size, n = [], 0, 0  # the unfinished line: its pieces, their size; lines done
    for b in blocks:
        lines = b.split(b'\n')
        if len(lines) > 1:
            lines[0] = b''.join(rest) + lines[0]
            rest, size = [], 0
            for line in lines[:-1]:
                n += 1
                if len(line) > limit:
                    raise too_big(f'{path}:{n}', limit)
                yield line
        rest.append(lines[-1])
        size += len(lines[-1])
        if size > limit:
            raise too_big(f'{path}:{n + 1}', limit)
    tail = b''.join(rest)
    if tail:
        yield tail

def raw_lines(path, limit):
    """The lines (bytes) of a .jsonl file, plain, gzip or zstd, read a block at a time (see
    split_lines). Corrupt or truncated compressed data is a LimeError naming the last good line."""
    import zlib
    errors = (OSError, EOFError, zlib.error)
    if path.endswith(('.zst', '.zstd')):
        errors += (need('zstandard', 'zstandard', path).ZstdError,)
    n = 0
    with open_input(path) as f:
        try:
            if path.endswith('.gz'):
                import gzip
                g = gzip.GzipFile(fileobj=f)
                blocks = iter(lambda: g.read(1 << 20), b'')  # at most 1 MiB decompressed per read
            elif path.endswith(('.zst', '.zstd')):
                blocks = zstd_blocks(f, path)
            else:
                blocks = iter(lambda: f.read(1 << 20), b'')
            for raw in split_lines(blocks, path, limit):
                n += 1
                yield raw
        except errors as e:
            raise LimeError(f'{path}: corrupt or truncated data after line {n} ({e})')

def read_jsonl(path, field, limit):
    """(index, name, text) of the documents of a JSONL file; index = line number - 1."""
    for n, raw in enumerate(raw_lines(path, limit), 1):
        if n == 1 and raw.startswith(b'\xef\xbb\xbf'):
            raw = raw[3:]  # a UTF-8 BOM at the start of the file
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode('utf-8'))
        except UnicodeDecodeError as e:
            raise LimeError(f'{path}:{n}: not valid UTF-8 (byte {e.start})')
        except json.JSONDecodeError as e:
            raise LimeError(f'{path}:{n}: not valid JSON ({e.msg})')
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise LimeError(f'{path}:{n}: no string field "{field}" (see --text_field)')
        text = obj[field]
        m = SURROGATE.search(text)
        if m:  # JSON can escape one ("\ud800"); it is not text and has no UTF-8 form
            raise LimeError(f'{path}:{n}: "{field}" holds a lone surrogate (U+{ord(m.group()):04X})')
        yield n - 1, f'{path}:{n}', text

def parquet_file(path, field):
    """The opened parquet file (its footer read), refused unless it has a text column `field`."""
    pq = need('pyarrow.parquet', 'pyarrow', path)
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LimeError(f'{path}: not a readable parquet file ({e})')
    schema = pf.schema_arrow
    if field not in schema.names:
        raise LimeError(f'{path}: no column "{field}" (columns: {", ".join(schema.names)}; see --text_field)')
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or
            getattr(pa.types, 'is_string_view', lambda t: False)(t)):
        raise LimeError(f'{path}: column "{field}" holds {t}, not text')
    return pf

def read_parquet(path, field, limit):
    """(index, name, text) of the rows of a parquet file, read a batch at a time."""
    import pyarrow as pa
    pf, row = parquet_file(path, field), 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise LimeError(f'{path}: row {row}: "{field}" is null')
                if len(text.encode('utf-8', 'surrogatepass')) > limit:
                    raise too_big(f'{path}: row {row}', limit)
                yield row, f'{path}: row {row}', text
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise LimeError(f'{path}: corrupt parquet data after row {row} ({e})')

def read_hf(ds, name, key, field, limit):
    k = int(key.rsplit('/', 1)[1])
    row = 0
    try:
        for ex in ds.shard(num_shards=ds.num_shards, index=k):
            text = ex.get(field)
            if not isinstance(text, str):
                raise LimeError(f'{name} shard {k} row {row}: no string field "{field}" (see --text_field)')
            if len(text.encode('utf-8', 'surrogatepass')) > limit:
                raise too_big(f'{name} shard {k} row {row}', limit)
            yield row, f'{name} shard {k} row {row}', text
            row += 1
    except LimeError:
        raise
    except Exception as e:
        raise LimeError(f'{name} shard {k}: cannot read after row {row} ({type(e).__name__}: {e})')

def read_unit(unit, field, hf=None, limit=MAX_DOC_BYTES):
    """(index, name, text) of each document of a unit, in order; a document of more than
    `limit` bytes (UTF-8) is an error."""
    kind, path, key = unit
    if kind == 'gutenberg':
        from nltk.corpus import gutenberg
        yield 0, path, gutenberg.raw(path)
    elif kind == 'txt':
        yield 0, path, read_txt(path, limit)
    elif kind == 'jsonl':
        yield from read_jsonl(path, field, limit)
    elif kind == 'parquet':
        yield from read_parquet(path, field, limit)
    else:
        yield from read_hf(hf, path, key, field, limit)

def check_unit(unit, field, limit):
    """Before any tagging: a .txt is decoded in full, a JSONL file up to its first document,
    a parquet file's schema read. (Gutenberg and Hugging Face shards are streamed as they are.)"""
    kind, path, _ = unit
    if kind == 'txt':
        read_txt(path, limit)
    elif kind == 'jsonl':
        docs = read_jsonl(path, field, limit)
        next(docs, None)
        docs.close()
    elif kind == 'parquet':
        parquet_file(path, field)

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

def documents(units, mine, args, hf):
    """(unit number, name, split, text) of this shard's documents, read lazily in order."""
    val_files = file_val_set(units, args.val_fraction, args.seed)
    for j in mine:
        kind, _, key = units[j]
        for index, name, text in read_unit(units[j], args.text_field, hf, args.max_doc_bytes):
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
    watches them: a worker that dies (OOM killer, kill -9) ends the run with LimeError
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
                        raise LimeError(f'a tagging worker died ({exit_reason(dead[0].exitcode)})')
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
# with a meta.json is always complete. prepare.py deletes only what it provably wrote: its own
# temporary directory, a dataset of its own (with --overwrite), and leftover OUT.tmp-/OUT.old-
# directories of dead runs that hold its marker (MARK).

def holds_dataset(out, path):
    """Whether directory `out` holds a dataset that prepare.py wrote (False: it is empty).
    Anything else is refused: other files, train.bin/val.bin without our meta.json."""
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise LimeError(f'--out_dir {path}: cannot read ({e.strerror})')
    foreign = [n for n in names if not OUR_FILE.fullmatch(n)]
    if foreign:
        raise LimeError(f'--out_dir {path}: holds {foreign[0]!r}, which prepare.py did not '
                        f'write; not replacing it (choose another directory)')
    if not names:
        return False
    try:
        with open(os.path.join(out, 'meta.json')) as f:
            meta = json.load(f)
        missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
        why = f'its meta.json has no {missing[0]!r}' if missing else ''
    except (OSError, ValueError):
        why = 'no readable meta.json'
    if why:
        raise LimeError(f'--out_dir {path}: holds {names[0]} but {why}: not a dataset of prepare.py\'s '
                        f'(nanoGPT\'s layout?); not replacing it (choose another directory)')
    return True

def resolve_out_dir(path, overwrite):
    """Where the dataset goes: trailing slashes dropped, a symlink followed (its target is
    replaced, the link kept). Refuses a file, a directory holding anything but a dataset of
    prepare.py's (so a typo like --out_dir . can never delete a directory), and a dataset unless
    overwrite."""
    out = os.path.normpath(path)
    if os.path.islink(out):
        out = os.path.realpath(out)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise LimeError(f'--out_dir {path}: exists and is not a directory')
        if holds_dataset(out, path) and not overwrite:
            raise LimeError(f'--out_dir {path}: holds a dataset already; --overwrite to replace it')
    return out

def mark(d):
    """Mark directory d as prepare.py's own leftover-to-be: MARK holding its name."""
    with open(os.path.join(d, MARK), 'w') as f:
        f.write(os.path.basename(d))

def marked(d):
    """Whether d is a real directory holding prepare.py's MARK with d's name (a user's
    directory with a look-alike name never is)."""
    m = os.path.join(d, MARK)
    try:
        if os.path.islink(d) or not stat.S_ISREG(os.lstat(m).st_mode):
            return False
        with open(m) as f:
            return f.read(1000) == os.path.basename(d)
    except (OSError, ValueError):
        return False

def remove_stale(out):
    """Remove OUT.tmp-HOST-PID / OUT.old-HOST-PID left by earlier runs on this machine that
    died (kill -9, power loss): their pid is no longer alive and they hold our MARK. Marked ones
    from other machines are only reported; unmarked ones are not ours and never touched."""
    parent, name = os.path.split(os.path.abspath(out))
    pat = re.compile(re.escape(name) + r'\.(?:tmp|old)-(.+)-(\d+)')
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for n in sorted(entries):
        m = pat.fullmatch(n)
        path = os.path.join(parent, n)
        if not m or not marked(path):
            continue
        host, pid = m.group(1), int(m.group(2))
        if host != HOST:
            print(f'note: {path} is from a run on {host}; remove it if that run has ended', file=sys.stderr)
        elif pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            print(f'removed {path}, left by an earlier run that did not finish', file=sys.stderr)

def make_tmp(out):
    remove_stale(out)
    tmp = f'{out}.tmp-{HOST}-{os.getpid()}'
    try:
        os.makedirs(tmp)
        mark(tmp)
    except OSError as e:
        raise LimeError(f'--out_dir {out}: cannot create {tmp} ({e.strerror})')
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
    """Swap the finished temporary directory in; an old dataset is removed only after, and only
    if it still is one of ours (checked again: the run may have been long)."""
    old = None
    os.remove(os.path.join(tmp, MARK))
    if os.path.isdir(out):
        holds_dataset(out, out)
        old = f'{out}.old-{HOST}-{os.getpid()}'
        os.rename(out, old)
        try:
            mark(old)  # a crash from here on leaves it to the next run's remove_stale
        except OSError:
            os.rename(old, out)
            raise
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
            raise LimeError(f'{d}: no such shard directory')
        if not os.path.exists(path):
            raise LimeError(f'{d}: incomplete shard (no meta.json: still running or killed; rerun it)')
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise LimeError(f'{path}: cannot read ({e})')
        missing = [k for k in IDENTITY + ('shard_index', 'units') if k not in m]
        if missing:
            raise LimeError(f'{path}: no {missing[0]!r} (made by an older prepare.py? rebuild it)')
        metas.append(m)
    first = dirs[0]
    for d, m in zip(dirs, metas):
        for k in IDENTITY:
            if m[k] != metas[0][k]:
                raise LimeError(f'{d}: {k} {m[k]!r} differs from {metas[0][k]!r} in {first}: '
                                f'not shards of one run')
    n = metas[0]['num_shards']
    owner = {}
    for d, m in zip(dirs, metas):
        i = m['shard_index']
        if i in owner:
            raise LimeError(f'{d}: shard {i} of {n} given twice (also {owner[i]})')
        owner[i] = d
    gaps = [i for i in range(n) if i not in owner]
    if gaps:
        raise LimeError(f'shard {gaps[0]} of {n} is missing ({len(gaps)} of {n} missing; got '
                        f'{", ".join(dirs)})')
    for d, m in zip(dirs, metas):
        for split in ('train', 'val'):
            if sum(u[1 if split == 'train' else 2] for u in m['units']) != m[f'{split}_tokens']:
                raise LimeError(f'{d}/meta.json: its units do not add up to {split}_tokens')
        for name in bin_names(m['streams']):
            path = os.path.join(d, name)
            want = 2 * m[f'{name.split(".")[0]}_tokens']
            if not os.path.isfile(path):
                raise LimeError(f'{path}: missing (meta.json lists it)')
            if os.path.getsize(path) != want:
                raise LimeError(f'{path}: {os.path.getsize(path):,} bytes, meta.json says {want:,}')
    return dirs, metas

def merge(dirs, out_dir, overwrite=False):
    out = resolve_out_dir(out_dir, overwrite)  # before the work: a bad --out_dir fails at once
    dirs, metas = read_shards(dirs)
    # (unit, shard dir, {split: (token offset in the shard's file, tokens)}) in unit order
    segments, seen = [], {}
    for d, m in zip(dirs, metas):
        off = {'train': 0, 'val': 0}
        for j, n_train, n_val in m['units']:
            if j in seen:
                raise LimeError(f'{d}: input unit {j} is also in {seen[j]}: not shards of one run')
            seen[j] = d
            segments.append((j, d, {'train': (off['train'], n_train), 'val': (off['val'], n_val)}))
            off['train'] += n_train
            off['val'] += n_val
    segments.sort(key=lambda s: s[0])
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
                                raise LimeError(f'{d}/{name}: shorter than meta.json says')
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
        raise LimeError(f'{out_dir}: cannot write the merged dataset ({e.strerror or e})')
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
    if args.max_doc_bytes < 1:
        fail(f'--max_doc_bytes={args.max_doc_bytes} must be >= 1')
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
        if tags.count(t) > 1:
            fail(f"--tags={args.tags}: {t!r} given twice (each of {', '.join(md.TAG_KINDS)} at most once)")
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
            return merge(args.merge, args.out_dir, args.overwrite)
        return prepare(args)
    except LimeError as e:   # one line; exit status 1, or 128 + signal when Stopped
        print(f'prepare.py: error: {e.msg}', file=sys.stderr)
        sys.exit(e.code if isinstance(e.code, int) else 1)

def prepare(args):
    """One run (or one shard) of prepare.py: check the options and inputs, tag every document in
    worker processes, write the dataset into a temporary directory and swap it in when complete."""
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
    # before the work: a bad --out_dir fails at once (a shard's dataset is checked below)
    out = resolve_out_dir(out_dir, args.overwrite or args.num_shards > 1)
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
    identity = dataset_identity(args, units, tags, streams, enc)
    if shard_complete(args, out, out_dir, identity):
        return
    mine = list(range(args.shard_index, len(units), args.num_shards))  # units i, i+N, ...
    for j in mine:
        check_unit(units[j], args.text_field, args.max_doc_bytes)  # a bad file fails now, not hours in

    tmp = make_tmp(out)
    files, results, bar = {}, None, None
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0, 'words': 0}
    per_unit = {}  # unit -> [train tokens, val tokens] of this shard's units
    job = dict(tokenization=args.tokenization, ner=args.ner, tags=tags, reference=args.reference)
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
        write_results(results, files, streams, enc, counts, per_unit, bar)
        close_all(files.values())
        if args.num_shards == 1 and counts['train_docs'] + counts['val_docs'] == 0:
            raise LimeError(f'{what}: no non-empty documents (empty input)')
        elapsed = time.time() - t0
        # last: a directory with a meta.json is complete
        write_meta(tmp, dataset_meta(args, identity, enc, counts, per_unit, mine, shard_source, elapsed))
        replace_dir(tmp, out)
    except OSError as e:
        discard(tmp, files.values())
        raise LimeError(f'{out_dir}: cannot write the dataset ({e.strerror or e})')
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

def dataset_identity(args, units, tags, streams, enc):
    """What makes two datasets (or two shards of one) the same: in meta.json, compared by --merge
    and by a shard run that finds its shard already written."""
    return {
        'inputs': ([os.path.abspath(i) for i in args.input] if args.input else
                   [f'hf:{args.hf_dataset}:{args.hf_config or ""}:{args.hf_split}'] if args.hf_dataset
                   else ['nltk.corpus.gutenberg']),
        'text_field': args.text_field, 'num_units': len(units), 'num_shards': args.num_shards,
        'seed': args.seed, 'val_fraction': args.val_fraction, 'vocab_size': enc.n_vocab,
        'tokenizer': md.TOKENIZER, 'tokenization': args.tokenization, 'ner': args.ner,
        'tags': list(tags), 'streams': {k: {'tags': md.stream_tags(k, args.ner)} for k in streams},
        'reference_tagger': args.reference,
    }

def shard_complete(args, out, out_dir, identity):
    """True when this shard was already written with the same identity (skip it); a shard of
    another dataset there is an error, unless --overwrite."""
    if not (args.num_shards > 1 and os.path.isfile(os.path.join(out, 'meta.json')) and not args.overwrite):
        return False
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
        return True
    fail(f'{out_dir}: holds a dataset made with another {diff[0]} ({old.get(diff[0])!r}); '
         f'--overwrite to replace it')

def write_results(results, files, streams, enc, counts, per_unit, bar):
    """Append the workers' pieces, in document order, to the split's token and stream files;
    counts and per_unit (unit -> [train tokens, val tokens]) are updated as they are written."""
    eot = {k: np.array([enc.eot_token if k == '' else md.PAD], dtype=np.uint16).tobytes() for k in [''] + streams}
    for out_pieces, err in results:
        if err:
            raise LimeError(err)
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

def dataset_meta(args, identity, enc, counts, per_unit, mine, shard_source, elapsed):
    """meta.json: the identity, the special ids, the counts, this shard's units, the versions."""
    import nltk, tiktoken
    return {
        **identity, 'eot_token': enc.eot_token, 'dtype': 'uint16',
        'special': {'pad': md.PAD, 'space': md.SPACE, 'unk': md.UNK},
        **counts, 'shard_index': args.shard_index, 'shard_from': shard_source,
        'hf_config': args.hf_config, 'hf_split': args.hf_split,
        'units': [[j, *per_unit.get(j, [0, 0])] for j in mine],
        'elapsed_s': round(elapsed, 2), 'words_per_sec': round(counts['words'] / elapsed, 1),
        'versions': {'python': platform.python_version(), 'numpy': np.__version__,
                     'nltk': nltk.__version__, 'tiktoken': tiktoken.__version__},
    }

if __name__ == '__main__':
    main()
