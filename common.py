"""
The small core that the scripts share: the one error type, configuration (defaults, config files,
--key=value), device/dtype/autocast, atomic file writes, checkpoint read/write and validation, the
out_dir lock and log, reading a user's text file, and the data reader (the token and tag files
prepare.py writes: meta.json's checks, the windows training and evaluation read), and the plumbing
bench.py and experiments.py share (mode configs, tables, the dataset build, the result file).

Imported by every script and by metadata.py. It imports nothing of this project at module level,
and no torch (metadata.py's tagging CLI starts without it): torch, model and metadata are imported
inside the functions that need them.
"""

import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import time
import warnings
import zlib
from contextlib import nullcontext

import numpy as np


class LimeError(SystemExit):
    """The one error of every script: a user mistake or a bad file, as one line naming the file (or
    key) and the problem. A script's main prints it as '<script>.py: error: <msg>' and exits 1;
    uncaught (library use), it exits with status 1 and prints the message alone, no traceback."""

    def __init__(self, msg):
        super().__init__(msg)
        self.msg = msg


def fail(msg):
    raise LimeError(msg)


def run_main(script, fn, *args):
    """A script's main: fn(*args), then exit status 0; a LimeError is '<script>: error: <msg>' on stderr
    and exit status 1 (any other SystemExit, e.g. a stopped run's, passes through)."""
    try:
        fn(*args)
    except LimeError as e:
        print(f"{script}: error: {e.msg}", file=sys.stderr, flush=True)
        return 1
    return 0


def first_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# -----------------------------------------------------------------------------
# configuration

def coerce(key, value, source, defaults):
    """Check value against the type of the default for key."""
    if key not in defaults:
        fail(f"unknown key '{key}' ({source})")
    default = defaults[key]
    bad = f"{key} must be {type(default).__name__}, got {value!r} ({source})"
    if key == 'meta_weight' and isinstance(value, (list, tuple)):
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in value):
            fail(bad)
        return [float(w) for w in value]
    if key == 'metadata' and isinstance(value, (list, tuple)):
        value = ','.join(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail(bad)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # --max_iters=2e4
        if isinstance(value, bool) or not isinstance(value, int):
            fail(bad)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(bad)
        value = float(value)
    elif not isinstance(value, str):
        fail(bad)
    return value


def exec_config(path, ns=None, seen=()):
    """Run the config file path (python) in ns and return ns. The one include mechanism: a config
    calls include('base.py'), a path relative to the including file's directory; the included
    file's settings come first, the including file's after it override them."""
    ns = {} if ns is None else ns
    path = os.path.abspath(path)
    if path in seen:
        fail(f"{path}: included twice in a chain of include() calls (a loop)")
    if not os.path.isfile(path):
        fail(f"no such config file {path}")
    outer = ns.get('include'), ns.get('__file__')
    ns['include'] = lambda name: exec_config(os.path.join(os.path.dirname(path), name), ns, seen + (path,))
    ns['__file__'] = path
    with open(path, encoding='utf-8') as f:
        exec(compile(f.read(), path, 'exec'), ns)
    ns['include'], ns['__file__'] = outer  # back to the including file's
    if outer[0] is None:
        del ns['include']
    return ns


def configure(argv, defaults):
    """The configurator of every script: config files (python, run with exec; include('other.py')
    runs another one beside it) and --key=value flags over the script's defaults, in command-line
    order. A flag's value is a python literal (--max_iters=2e4, --compile=True) unless the key's
    default is a string: then it is the raw text (--out_dir=2024 is the directory "2024").
    Returns (config dict, set of keys set explicitly); raises LimeError on a bad key or value."""
    import ast
    cfg, explicit = dict(defaults), set()
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                fail(f"no such config file {arg}")
            ns = exec_config(arg)
            items = [(k, v) for k, v in ns.items()
                     if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module']
            source = arg
        else:
            if '=' not in arg:
                fail(f"expected --key=value, got {arg}")
            key, val = arg[2:].split('=', 1)
            if not isinstance(defaults.get(key), str):
                try:
                    val = ast.literal_eval(val)
                except (SyntaxError, ValueError):
                    pass  # not a literal: coerce() names the expected type
            items, source = [(key, val)], arg
        for k, v in items:
            cfg[k] = coerce(k, v, source, defaults)
            explicit.add(k)
    return cfg, explicit


def check_range(c, key, ok, allowed):
    if not ok:
        fail(f"{key} must be {allowed}, got {c[key]!r}")


# -----------------------------------------------------------------------------
# device and dtype

def check_device(device):
    """The device must exist on this machine: a one-line error here, not an AssertionError deep in torch."""
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ('cpu', 'cuda', 'mps'):
        fail(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if d.type == 'cuda':
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            fail(f"device={device} but no CUDA GPU is available here (use --device=cpu)")
        if d.index is not None and d.index >= n:
            fail(f"device={device} but this machine has {n} CUDA GPU(s): cuda:0 to cuda:{n - 1}")
    if d.type == 'mps' and not torch.backends.mps.is_available():
        fail(f"device={device} but MPS is not available here (use --device=cpu)")


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a CUDA GPU that supports it, else float32. Only CUDA runs under autocast;
    elsewhere the model computes in float32, so float16/bfloat16 there are refused, not silently ignored."""
    import torch
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        fail(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    cuda = device.startswith('cuda')
    if dtype == 'auto':
        return 'bfloat16' if cuda and torch.cuda.is_bf16_supported() else 'float32'
    if dtype != 'float32' and not cuda:
        fail(f"dtype={dtype} needs a CUDA device: on {device} the model computes in float32 only "
             "(use --dtype=float32 or auto)")
    return dtype


def torch_dtype(dtype):
    import torch
    return {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]


def autocast(device, dtype):
    """The context the forward passes run in: autocast to dtype (a resolved one) on CUDA; on any other
    device, or in float32, nothing (the model computes in float32)."""
    if not device.startswith('cuda') or dtype == 'float32':
        return nullcontext()
    import torch
    return torch.amp.autocast(device_type='cuda', dtype=torch_dtype(dtype))


# -----------------------------------------------------------------------------
# files

def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


class _KeepWriteError:
    """A file that remembers why a write failed: torch.save reports it only as an unhelpful RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def temp_pattern(base=None):
    """write_atomic's temporary names for a file named base (None: any name): .BASE.PID.XXXXXXXX.tmp
    (mkstemp's 8 characters)."""
    return re.compile((r'\..+\.' if base is None else re.escape(f'.{base}.')) + r'([0-9]+)\.[a-z0-9_]{8}\.tmp')


def remove_temps(d, base=None, only_dead=True):
    """Remove write_atomic's temporary files in d for the file named base (None: for any file), and
    nothing else: those of processes that are gone (killed mid-write), or with only_dead=False all of
    them (the caller holds a lock that says no live writer owns them)."""
    pat = temp_pattern(base)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        m = pat.fullmatch(name)
        if m is None or (only_dead and pid_alive(int(m.group(1)))):
            continue
        try:
            if stat.S_ISREG(os.lstat(os.path.join(d, name)).st_mode):
                os.unlink(os.path.join(d, name))
        except OSError:  # gone already (another process cleaned it)
            pass


UMASK = os.umask(0o022)  # read once, at import (the only way to read it), and put back at once
os.umask(UMASK)


def write_atomic(path, data):
    """Write data (bytes, str as UTF-8, or a callable write(f)) to path atomically: into a temporary
    file beside it, unique to this process (.NAME.PID.XXXXXXXX.tmp), fsync, rename over path, fsync
    the directory. A reader sees the old file or the new one, never half of one. The file gets the
    mode of the one it replaces, else what open() would give it (0o666 less the umask; mkstemp's own
    0o600 would hide results from the group). On failure the temporary file is removed and an OSError
    (a full disk, a read-only directory) is a LimeError naming path. Temporary files that killed
    writers left for this name are removed first."""
    import tempfile
    d, base = os.path.dirname(path) or '.', os.path.basename(path)
    write = data if callable(data) else (lambda f: f.write(data.encode() if isinstance(data, str) else data))
    tmp, w = None, None
    try:
        os.makedirs(d, exist_ok=True)
        remove_temps(d, base)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o666 & ~UMASK
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f'.{base}.{os.getpid()}.', suffix='.tmp')
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as f:
            w = _KeepWriteError(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(d)
    except BaseException as e:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(e, (OSError, RuntimeError)):
            e = (w and w.error) or e
            fail(f"{path}: cannot write ({e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)})")
        raise


def finite(obj):
    """JSON-safe copy: NaN/inf -> None (json.dump would write invalid JSON), numpy -> python."""
    import math
    import numpy as np
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
    """obj as JSON (NaN/inf as null), written atomically."""
    write_atomic(path, json.dumps(finite(obj), indent=1, allow_nan=False))


SURROGATE = re.compile('[\ud800-\udfff]')  # a non-UTF-8 byte of an argument (surrogateescape), or a lone surrogate
MAX_DOC_BYTES = 64 << 20  # a document larger than this (64 MiB) is refused (prepare.py: see --max_doc_bytes)


def read_regular(path, limit=None):
    """The bytes of path, a regular file (or a link to one) of at most limit bytes; anything else
    raises ValueError (or OSError): a FIFO or a device is never read (opened non-blocking: a FIFO
    cannot hang us)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError('is a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file')
        if limit is not None and st.st_size > limit:
            raise ValueError(f'larger than {limit} bytes')
    except BaseException:
        os.close(fd)
        raise
    with open(fd, 'rb') as f:
        if limit is None:
            data = f.read()
        else:  # read(limit + 1) would allocate the whole limit first (30 ms for 1 GiB): ask for the size
            data = f.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grew meanwhile
                data += f.read(limit + 1 - len(data))
    if limit is not None and len(data) > limit:
        raise ValueError(f'larger than {limit} bytes')
    return data


def read_text(path, limit=MAX_DOC_BYTES):
    """A user's text file as prepare.py reads a .txt document: a regular file of at most limit bytes,
    UTF-8 kept as is (CRLF and all whitespace), a BOM dropped. Anything else is a LimeError naming it."""
    try:
        raw = read_regular(path, limit)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror or e})")
    except ValueError as e:
        fail(f"{path}: {e}")
    return decode_text(path, raw)


def decode_text(path, raw):
    """The text of a document's bytes, as prepare.py trains on it: UTF-8 as is (CRLF and all
    whitespace kept), a BOM dropped; invalid UTF-8 is a LimeError naming path."""
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        fail(f"{path}: not valid UTF-8 (byte {e.start})")
    return text[1:] if text.startswith('\ufeff') else text  # a BOM is not text


def check_utf8(what, text):
    """text as given on the command line (or in a config file). A non-UTF-8 byte in an argument arrives
    as a lone surrogate (surrogateescape), which has no UTF-8 form: one line naming it here."""
    m = SURROGATE.search(text)
    if m:
        c = ord(m.group())
        bad = f"byte 0x{c - 0xdc00:02x}" if 0xdc80 <= c <= 0xdcff else f"lone surrogate U+{c:04X}"
        fail(f"{what}: not valid UTF-8 ({bad} at character {m.start()})")
    return text


# -----------------------------------------------------------------------------
# ---- data: the token and tag files prepare.py writes
# (train.py's reader; bench.py and experiments.py read the very windows training and its evaluation read)

def load_meta(data_dir, streams):
    """Read meta.json and check that every requested stream exists and matches the token files."""
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        fail(f"{meta_path}: not found (build the dataset with prepare.py)")
    try:
        with open(meta_path, encoding='utf-8') as f:
            info = json.load(f)
    except OSError as e:
        fail(f"{meta_path}: cannot read ({e.strerror or e})")
    except ValueError as e:  # not JSON, or not UTF-8
        fail(f"{meta_path}: not valid JSON ({e})")
    known = info.get('streams') if isinstance(info, dict) else None
    if not isinstance(known, dict) or not all(isinstance(v, dict) and isinstance(v.get('tags'), list)
                                              for v in known.values()):
        fail(f"{meta_path}: not a prepare.py meta.json (needs 'streams': {{name: {{'tags': [...]}}}})")
    if not isinstance(info.get('vocab_size'), int) or not 0 < info['vocab_size'] <= 65536:
        fail(f"{meta_path}: not a prepare.py meta.json (needs 'vocab_size': an integer in [1, 65536])")
    for s in streams:
        if s not in known:
            fail(f"{meta_path}: unknown metadata stream '{s}' (available: {', '.join(known) or 'none'})")

    def n_ids(path):  # uint16 ids: an odd size is a truncated or foreign file
        size = os.path.getsize(path)
        if size % 2:
            fail(f"{path}: {size} bytes, not a whole number of uint16 ids (truncated, or not written by prepare.py)")
        return size // 2

    for split in ('train', 'val'):
        tok_path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(tok_path):
            fail(f"{tok_path}: not found")
        n = n_ids(tok_path)
        for s in streams:
            p = os.path.join(data_dir, f'{split}.{s}.bin')
            if not os.path.isfile(p):
                fail(f"{p}: not found (stream '{s}' is listed in {meta_path})")
            m = n_ids(p)
            if m != n:
                fail(f"{p}: {m} tags but {tok_path} has {n} tokens")
        limits = id_limits(data_dir, split, info, streams)
        for p in limits:  # the head of each file now (all of a small one); training checks every batch it reads
            if os.path.getsize(p):
                check_ids(p, np.memmap(p, dtype=np.uint16, mode='r')[:ID_CHECK], limits)
    return info


ID_CHECK = 1 << 22  # ids per file checked when the data is opened: 8 MB, a bounded read of any dataset


def id_limits(data_dir, split, info, streams):
    """{file: (bound, what)}: the ids of each file a run reads index an embedding table, so they must be
    below its size in meta.json (vocab_size, or the stream's number of tags)."""
    meta_path = os.path.join(data_dir, 'meta.json')
    v = info['vocab_size']
    out = {os.path.join(data_dir, f'{split}.bin'): (v, f"vocab_size {v} of {meta_path}")}
    for s in streams:
        n = len(info['streams'][s]['tags'])
        out[os.path.join(data_dir, f'{split}.{s}.bin')] = (n, f"stream '{s}' ({n} tags in {meta_path})")
    return out


def check_ids(path, ids, limits):
    """An id at or above its table's size would fail deep in training (an IndexError in the embedding on
    CPU, a device-side assert on CUDA): one line naming the file instead. A max over what was read: cheap."""
    if path in limits and ids.size and int(ids.max()) >= limits[path][0]:
        bound, what = limits[path]
        fail(f"{path}: id {int(ids.max())} out of range for {what} (ids must be < {bound})")

def affine_perm(n, seed, name):
    """A seeded permutation of range(n), p -> (a*p + b) % n with gcd(a, n) == 1, kept as (a, b):
    O(1) memory, same tag frequencies, no alignment with the tokens."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    while True:
        a = int(rng.integers(1, max(n, 2)))
        if math.gcd(a, n) == 1:
            break
    return a, int(rng.integers(0, n))


class Split:
    """One split (train or val) of a dataset directory. Windows are read through fresh memmaps
    each call (a long-lived np.memmap leaks memory, as nanoGPT notes). classes {stream: (vocab,)
    tag ids}: the stream is read as a function of the token itself (classes[s][token]; the control
    arms of train.py's meta_classes) instead of from its file."""

    def __init__(self, data_dir, split, streams, shift, shuffle_seed=None, word_tags=None, limits=None,
                 classes=None):
        self.tok_path = os.path.join(data_dir, f'{split}.bin')
        self.limits = limits or {}  # id_limits(): every read is checked against them
        self.n = os.path.getsize(self.tok_path) // 2
        self.streams, self.shift = list(streams), shift
        self.paths = {s: os.path.join(data_dir, f'{split}.{s}.bin') for s in self.streams}
        # each stream gets its own permutation so the streams are not aligned with each other either
        self.perm = {s: affine_perm(self.n, shuffle_seed, s) for s in self.streams} if shuffle_seed is not None else {}
        self.word_path = os.path.join(data_dir, f'{split}.word.bin') if word_tags else None
        self.classes = classes or {}

    def _read(self, path, starts, T, perm=None):
        arr = np.memmap(path, dtype=np.uint16, mode='r')
        if len(arr) != self.n and path != self.word_path:  # e.g. prepare.py rewrote data_dir meanwhile
            fail(f"{path}: {len(arr)} ids, {self.n} when the run opened it: the dataset changed during the run")
        if perm is None:
            out = np.stack([arr[i:i + T] for i in starts])
        else:
            # positions p = s + k map to (a*s + b + a*k) % n; python ints avoid int64 overflow in a*s
            a, b = perm
            base = np.array([(a * int(s) + b) % self.n for s in starts], dtype=np.int64)
            step = np.array([(a * k) % self.n for k in range(T)], dtype=np.int64)
            out = arr[(base[:, None] + step[None, :]) % self.n]
        check_ids(path, out, self.limits)
        import torch  # here: the tagging CLI imports common without torch
        return torch.from_numpy(out.astype(np.int64))

    def _stream(self, s, starts, T):
        if s in self.classes:  # a function of the token at the same position
            return torch_from(self.classes[s][self._read(self.tok_path, starts, T).numpy()])
        return self._read(self.paths[s], starts, T, self.perm.get(s))

    def windows(self, starts, T):
        """x = tok[i:i+T], y = tok[i+1:i+T+1], meta[s] = stream_s[i+shift:i+shift+T]."""
        x = self._read(self.tok_path, starts, T)
        y = self._read(self.tok_path, [i + 1 for i in starts], T)
        meta = {s: self._stream(s, [i + self.shift for i in starts], T) for s in self.streams}
        return x, y, meta

    def next_tags(self, starts, T):
        """The targets' tags, stream_s[i+1:i+T+1]: what a meta_predict model's heads predict at position t."""
        return {s: self._stream(s, [i + 1 for i in starts], T) for s in self.streams}

    def word(self, starts, T):
        """word-position tags of the targets (never shuffled: it is ground truth for evaluation)."""
        return self._read(self.word_path, [i + 1 for i in starts], T)

    def doc_ends(self, eot):
        """Positions of the <|endoftext|> that ends each document (prepare.py writes one after each)."""
        if eot is None:
            return None
        return np.flatnonzero(np.memmap(self.tok_path, dtype=np.uint16, mode='r') == eot)


def data_fingerprint(data_dir, streams):
    """The dataset's identity: a hash of meta.json (prepare.py writes a new one, with its counts and
    timings, on every run) and the sizes of the files a run reads. Kept in the checkpoint; compared on
    resume and at every evaluation, so re-prepared data is noticed instead of silently trained on."""
    h = hashlib.sha256()
    path = os.path.join(data_dir, 'meta.json')
    try:
        with open(path, 'rb') as f:
            h.update(f.read())
        for split in ('train', 'val'):
            for name in [''] + [f'.{s}' for s in streams]:
                path = os.path.join(data_dir, f'{split}{name}.bin')
                h.update(f"{split}{name}:{os.path.getsize(path)};".encode())
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror or e})")
    return h.hexdigest()[:16]


def token_classes(split, streams, n_tags, vocab_size, mode, seed, sample=1 << 24):
    """The control arms' streams (meta_classes): {stream: (vocab_size,) tag ids}, each token's
    majority tag combination over the streams in the train split ('token': a lookup table, no
    tagger at test time; from about `sample` evenly spaced positions; a token never seen gets the
    commonest combination), or those classes moved to other tokens by a seeded permutation of the
    token ids ('random': the same class sizes, no linguistic meaning)."""
    n = len(np.memmap(split.tok_path, dtype=np.uint16, mode='r'))
    pick = slice(None, None, max(1, n // sample))
    tok = np.memmap(split.tok_path, dtype=np.uint16, mode='r')[pick].astype(np.int64)
    combo = np.zeros_like(tok)
    for s, m in zip(streams, n_tags):
        combo = combo * m + np.memmap(split.paths[s], dtype=np.uint16, mode='r')[pick]
    G = math.prod(n_tags)
    keys, counts = np.unique(tok * G + combo, return_counts=True)
    # per token, its most frequent combination (ties: the smallest id): sort by token, then count
    order = np.lexsort((-counts, keys // G))
    keys = keys[order]
    first = np.r_[True, keys[1:] // G != keys[:-1] // G]
    table = np.full(vocab_size, np.bincount(combo, minlength=G).argmax(), dtype=np.int64)
    table[keys[first] // G] = keys[first] % G
    if mode == 'random':
        table = table[np.random.default_rng(seed).permutation(vocab_size)]
    out = {}
    for s, m in reversed(list(zip(streams, n_tags))):
        out[s], table = table % m, table // m
    return out


def torch_from(a):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))


def record_in_val(key, index, seed, val_fraction):
    """prepare.py's split of a record (a JSONL line, a parquet or Hugging Face row): in val when
    blake2b-64(f"{seed}\0{key}\0{index}") < val_fraction * 2**64 (see prepare.py)."""
    h = hashlib.blake2b(f'{seed}\0{key}\0{index}'.encode('utf-8', 'surrogateescape'), digest_size=8)
    return int.from_bytes(h.digest(), 'big') < val_fraction * 2 ** 64


def eval_starts(n, T, count, ends=None):
    """The fixed validation windows (start offsets, sorted); they depend only on the data and the eval
    config. Without document ends: count evenly spaced offsets. With them (Split.doc_ends), the
    windows are shared out between the documents as evenly as they fit: each document gets the same
    number, at most as many as it holds without overlap (at least one), the rest going to the longer
    ones (evenly spaced among them); within a document, evenly spaced. So a long book does not outweigh
    the short documents of the split, and every comparison can count documents (window_docs)."""
    last = n - T - 1
    if ends is None or len(ends) < 2:
        return np.linspace(0, last, count).round().astype(np.int64).tolist()
    begins = np.concatenate([[0], np.asarray(ends[:-1]) + 1])
    room = np.maximum(1, (np.asarray(ends) + 1 - begins) // T)
    if room.sum() < count:  # more windows than fit: the documents share them as if each had room
        room = np.full(len(room), count)
    level = 0  # the largest equal share that fits: sum(min(room, level)) <= count
    while np.minimum(room, level + 1).sum() <= count:
        level += 1
    alloc = np.minimum(room, level)
    extra = np.flatnonzero(room > level)
    left = count - int(alloc.sum())
    if left:
        alloc[extra[np.linspace(0, len(extra) - 1, left).round().astype(np.int64)]] += 1
    starts = []
    for b, e, a in zip(begins, ends, alloc):
        if a:
            hi = max(min(int(e) + 1 - T, last), min(int(b), last))
            starts += np.linspace(min(int(b), last), hi, a).round().astype(np.int64).tolist()
    return sorted(starts)


def window_docs(starts, ends):
    """The document of each window (the one its first token belongs to), numbered from 0 in the split."""
    if ends is None or not len(ends):
        return [0] * len(starts)
    return np.searchsorted(np.asarray(ends), np.asarray(starts), side='left').tolist()


# -----------------------------------------------------------------------------
# checkpoints

# what every train.py checkpoint holds (model_args: GPTConfig's fields when this was written)
CKPT_KEYS = ('model', 'model_args', 'config', 'dataset')
RESUME_KEYS = ('iter_num', 'best_val_loss', 'optimizer', 'rng')
MODEL_ARGS = dict(n_layer=int, n_head=int, n_embd=int, block_size=int, bias=bool, dropout=(int, float),
                  vocab_size=int, meta_streams=(tuple, list), meta_n_tags=(tuple, list),
                  meta_weight=(tuple, list), meta_shift=int)
# GPTConfig's fields added later: absent from older checkpoints, of these types where present
MODEL_ARGS_LATER = dict(arch=str, n_kv_head=int, mlp_hidden=int, meta_predict=bool, meta_inject_layer=int,
                        meta_loss_weight=(int, float), meta_cooled=bool)
GPT2_VOCAB = 50257  # tokenizer 'gpt2'; 'gpt2-N' has N + 1 tokens (<|endoftext|> = N)
# a dataset's (meta.json's) text settings, as prepare.py and metadata.py take them
NER_MODES = ('typed', 'binary', 'none')
TOKENIZATIONS = ('lime', 'plain')


def tokenizer_size(name):
    """The number of tokens of tokenizer name: gpt2 (GPT2_VOCAB), gpt2-N (the first N GPT-2 ranks and
    <|endoftext|>, 256 <= N < GPT2_VOCAB); None for any other name. metadata.parse_tokenizer's rule."""
    if name == 'gpt2':
        return GPT2_VOCAB
    head, _, n = name.partition('-')
    if head != 'gpt2' or not n.isdigit() or not 256 <= int(n) < GPT2_VOCAB:
        return None
    return int(n) + 1


def load_checkpoint(path, resume=False):
    """A train.py checkpoint as a dict, loaded with weights_only=True: only tensors and plain data
    (numbers, strings, lists, tuples, dicts) are unpickled, so a file that would run code is refused,
    never executed. Anything that is not one of our checkpoints (truncated, foreign, another project's)
    raises LimeError: one line naming the file. resume: also the optimizer and RNG state."""
    import pickle
    import torch
    from model import meta_model, unwrapped

    def bad(problem):
        fail(f"{path}: {problem}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's notes about pickle protocols are not for the user
            ck = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        bad("not found")
    except OSError as e:
        bad(f"cannot read ({e.strerror or e})")
    except pickle.UnpicklingError as e:
        detail = [l.strip() for l in str(e).splitlines() if 'GLOBAL' in l or 'Unsupported' in l] + ['']
        if 'GLOBAL' in detail[0]:  # a function or class to call: the way a pickle runs code
            bad(f"refused: holds more than tensors and plain data, so loading it could "
                f"run code (weights_only: {detail[0]}); train.py never writes such a file")
        bad("not a readable checkpoint, truncated or not written by torch.save "
            f"({detail[0] or first_line(e)})")
    except Exception as e:  # zip/pickle errors of a truncated file or another format: RuntimeError, EOFError, ...
        bad(f"not a readable checkpoint, truncated or not written by torch.save ({first_line(e)})")
    need = CKPT_KEYS + (RESUME_KEYS if resume else ())
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        missing = [k for k in need if k not in ck] if isinstance(ck, dict) else list(need)
        bad(f"not a LIME checkpoint written by train.py (no {', '.join(missing)})")
    a = ck['model_args'] if isinstance(ck['model_args'], dict) else {}
    wrong = [k for k, t in MODEL_ARGS.items() if not isinstance(a.get(k), t)]
    wrong += [k for k, t in MODEL_ARGS_LATER.items() if k in a and not isinstance(a[k], t)]
    if not wrong and not all(isinstance(s, str) for s in a['meta_streams']):
        wrong = ['meta_streams']
    if not wrong and not all(isinstance(n, int) for n in a['meta_n_tags']):
        wrong = ['meta_n_tags']
    if wrong or not isinstance(ck['model'], dict):
        bad(f"not a LIME checkpoint written by train.py (model_args: no or bad {', '.join(wrong or ['model'])})")
    if not (isinstance(ck['config'], dict) and isinstance(ck['dataset'], dict)):
        bad("not a LIME checkpoint written by train.py (bad config or dataset)")
    if resume and not (isinstance(ck['iter_num'], int) and isinstance(ck['best_val_loss'], (int, float))
                       and isinstance(ck['optimizer'], dict) and isinstance(ck['rng'], dict)
                       and isinstance(ck['rng'].get('torch'), torch.Tensor)):
        bad("not a LIME checkpoint written by train.py (bad iter_num, best_val_loss, optimizer or rng state)")
    try:  # the file's tensors against model_args, before anything of model_args' size is built
        meta_model(a, unwrapped(ck['model']))
    except ValueError as e:
        bad(str(e))
    check_checkpoint_dataset(ck['dataset'], a, path)
    cl = ck.get('classes')  # meta_classes control arms: each token's tags, a lookup (a table per stream)
    if cl is not None:
        ok = isinstance(cl, dict) and set(cl) == set(a['meta_streams'])
        for s, n in zip(a['meta_streams'], a['meta_n_tags']):
            v = cl.get(s) if ok else None
            ok = ok and isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) == a['vocab_size'] \
                and not v.is_floating_point() and bool(((v >= 0) & (v < n)).all())
        if not ok:
            bad("not a LIME checkpoint written by train.py (classes: not one table of tag ids per stream, vocab_size long)")
    return ck


def check_checkpoint_dataset(d, a, path):
    """What sample.py and harness.py read from a checkpoint's dataset info (prepare.py's meta.json) fits
    its model_args a: token ids below vocab_size, tag ids below each stream's table size."""
    def bad(problem):
        fail(f"{path}: dataset {problem}")

    tok, v = d.get('tokenizer', 'gpt2'), a['vocab_size']
    if not isinstance(tok, str):
        bad(f"tokenizer {tok!r} is not a name")
    # not a text tokenizer (a synthetic dataset, tests'): 0, and sample.py refuses it when it makes text
    n_vocab = tokenizer_size(tok) or 0
    if n_vocab > v:
        bad(f"tokenizer {tok!r} has {n_vocab} tokens, more than model_args vocab_size={v}")
    if 'vocab_size' in d and not (isinstance(d['vocab_size'], int) and 0 < d['vocab_size'] <= v):
        bad(f"vocab_size {d['vocab_size']!r} is not an integer in [1, model_args vocab_size={v}]")
    for k, known, default in (('tokenization', TOKENIZATIONS, 'lime'), ('ner', NER_MODES, 'binary')):
        if d.get(k, default) not in known:
            bad(f"{k} {d[k]!r} is unknown (expected {', '.join(known)})")
    streams = d.get('streams', {})
    if not isinstance(streams, dict):
        bad(f"streams is a {type(streams).__name__}, not a dict {{stream: {{'tags': [...]}}}}")
    for s, n_tags in zip(a['meta_streams'], a['meta_n_tags']):
        tags = streams.get(s).get('tags') if isinstance(streams.get(s), dict) else None
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            bad(f"streams[{s!r}] has no tag list (a list of strings) for the model's stream {s!r}")
        if len(tags) > n_tags:
            bad(f"streams[{s!r}] has {len(tags)} tags, more than model_args meta_n_tags gives it ({n_tags})")


def checkpoint_path(out_dir):
    """A run directory means its ckpt.pt; a file is the checkpoint itself (a step snapshot, ckpt_best.pt)."""
    return out_dir if os.path.isfile(out_dir) else os.path.join(out_dir, 'ckpt.pt')


def load_model(out_dir, device='cpu'):
    """(model in eval mode, checkpoint dict) of out_dir/ckpt.pt, or of the checkpoint file out_dir:
    what every reader of a checkpoint uses (load_checkpoint's checks, then GPT.from_checkpoint)."""
    from model import GPT
    path = checkpoint_path(out_dir)
    if not os.path.isfile(path):
        fail(f"{path}: not found (train a model with train.py first)")
    ckpt = load_checkpoint(path)
    try:
        model = GPT.from_checkpoint(ckpt, device)
    except Exception as e:
        fail(f"{path}: cannot load checkpoint ({first_line(e)})")
    model.eval()
    return model, ckpt


def save_checkpoint(path, ckpt):
    """torch.save through write_atomic: never a truncated checkpoint."""
    import torch
    write_atomic(path, lambda f: torch.save(ckpt, f))


# -----------------------------------------------------------------------------
# the out_dir: its lock and its log

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lock_out_dir(out_dir):
    """One run per out_dir: an exclusive flock on out_dir/train.lock, which holds the owner's pid.
    The kernel drops a flock when its process dies, so the lock of a killed run is stale: it is
    detected (the file names a pid but nobody holds it) and taken over. Where the file system has
    no flock, the pid alone decides (taken over when that process is gone). Returns the fd."""
    import fcntl
    path = os.path.join(out_dir, 'train.lock')
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        fail(f"{out_dir}: cannot write to out_dir ({e.strerror or e})")
    owner = os.pread(fd, 64, 0).decode('ascii', 'replace').strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False
    except BlockingIOError:
        held = True
    except OSError:  # no flock here (some network file systems): is the named process alive?
        held = owner.isdigit() and int(owner) != os.getpid() and pid_alive(int(owner))
    if held:
        os.close(fd)
        fail(f"{out_dir}: in use by another run (pid {owner or '?'}, {path}); one run per out_dir")
    if owner:
        print(f"note: {path}: stale lock of pid {owner} (not running), taken over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_out_dir(fd):
    os.ftruncate(fd, 0)  # an empty lock file: released cleanly (a pid left in it means a killed run)
    os.close(fd)


def append_log(log_path, row):
    try:
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
    except OSError as e:
        fail(f"{log_path}: cannot write ({e.strerror or e})")


def trim_log(log_path, last_iter):
    """On resume: keep the rows up to the checkpoint's iteration. Later rows are from iterations the
    resumed run redoes (a run killed during a save, or before saving: the row is written first) and
    would be duplicated; a row cut short by a kill is dropped too. Rewritten atomically."""
    if not os.path.isfile(log_path):
        return
    keep = []
    with open(log_path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get('iter'), int) and row['iter'] <= last_iter:
                keep.append(json.dumps(row) + '\n')
    write_atomic(log_path, ''.join(keep))


LOG_KEYS = ('iter', 'tokens', 'val_loss', 'val_ppl', 'val_acc')  # in every row train.py logs


def read_log(path):
    """The rows of a train.py log.jsonl. A cut-off last line (a run still writing it, or killed in
    the middle of it) is skipped with a note: a live run's log is normal input. Any other line that
    is not one of train.py's rows is an error naming the file and line."""
    path = str(path)
    try:
        with open(path, 'rb') as f:
            lines = [(n, line) for n, line in enumerate(f.read().split(b'\n'), 1) if line.strip()]
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line.decode('utf-8'))
        except (ValueError, RecursionError):  # not JSON (or not UTF-8)
            if k == len(lines) - 1:
                print(f"note: {path}:{n}: the last line is cut off (a run still writing, or killed): skipped",
                      file=sys.stderr)
                break
            row = None
        if not (isinstance(row, dict) and all(isinstance(row.get(key), (int, float)) for key in LOG_KEYS)):
            fail(f"{path}:{n}: not a row of train.py's log (a JSON object with {', '.join(LOG_KEYS)})")
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# ---- experiment and benchmark plumbing: what bench.py and experiments.py both need

ROOT = os.path.dirname(os.path.abspath(__file__))  # the scripts' directory


def configure_mode(argv, defaults, modes):
    """configure() with the mode and dtype checked: bench.py's and experiments.py's configuration."""
    cfg, _ = configure(argv, defaults)
    if cfg['mode'] not in modes:
        fail(f"mode must be one of {', '.join(modes)}, got {cfg['mode']!r}")
    if cfg['dtype'] not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype must be float32, bfloat16 or float16, got {cfg['dtype']!r}")
    return cfg


def setup_torch(C):
    """The device must exist; torch's CPU threads as configured."""
    import torch
    check_device(C.device)
    if C.threads:
        torch.set_num_threads(C.threads)


def cooldown_start(max_iters, fraction):
    """The first iteration of a metadata cooldown (train.py's meta_cooldown): the last fraction of
    max_iters, rounded up (- 1e-9: a fraction given as c / max_iters gives c iterations, not c + 1)."""
    return max_iters - math.ceil(fraction * max_iters - 1e-9)


def arch_args(C):
    """The architecture keys of a bench or experiments config, as train.py and GPTConfig take them."""
    return dict(arch=C.arch, n_kv_head=C.n_kv_head if C.arch == 'gemma' else 0, mlp_hidden=C.mlp_hidden)


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
    """Run prepare.py with args into out_dir (a subprocess: its workers and signals stay its own)."""
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), *args, '--out_dir', out_dir]
    print('building the dataset:', ' '.join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        fail(f"prepare.py failed (exit {r.returncode}) building {out_dir}")
    print(f"built {out_dir} in {time.time() - t0:.0f}s", flush=True)
    return json.load(open(os.path.join(out_dir, 'meta.json')))


def write_result(C, cfg, result, t0):
    """out_json (default out-bench/bench_<mode>.json): the mode, config, environment and result."""
    import numpy as np
    import torch
    env = dict(python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__,
               device=C.device, dtype=C.dtype, compile=C.compile, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    if C.device.startswith('cuda') and torch.cuda.is_available():
        env['gpu'] = torch.cuda.get_device_name()
    path = C.out_json or os.path.join("out-bench", f"bench_{C.mode}.json")
    write_json(path, dict(mode=C.mode, config=cfg, env=env, result=result,
                          wall_s=time.time() - t0, time=time.strftime('%Y-%m-%d %H:%M:%S')))
    print(f"\nwrote {path} ({time.time() - t0:.0f}s)")
