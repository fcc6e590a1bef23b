"""
Train a GPT, with or without LIME metadata embeddings.

Single process:
$ python train.py configs/cpu_demo.py --max_iters=200
DDP on one node (nccl on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime.py

Every module-level name below is a config key; a config file (python, run with exec)
and --key=value flags override them, in command-line order.
"""

import ast
import glob
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings
import zlib
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from metadata import UNK  # the tag id of missing metadata, in every stream
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# default config values: a small GPT-2 on data/gutenberg
# I/O
out_dir = 'out'
overwrite = False  # a scratch run refuses an out_dir that holds a run (ckpt.pt, log.jsonl) unless True: it then replaces it
eval_interval = 250
log_interval = 10
eval_iters = 20  # the fixed validation set is eval_iters * batch_size windows
eval_only = False
always_save_checkpoint = True  # False: save only when val loss improves (then resume restarts from the best)
keep_checkpoints = 0  # also keep the last N evaluations' snapshots, out_dir/ckpt_{iter:06d}.pt (and ckpt_best.pt)
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
# run tracking (optional: pip install wandb); every log.jsonl field goes to wandb
wandb_log = False
wandb_project = 'lime'
wandb_run_name = ''  # '' = out_dir's name
# data
data_dir = 'data/gutenberg'  # a directory written by prepare.py (the default corpus is built when missing)
gradient_accumulation_steps = 1  # global count, divided across DDP ranks
batch_size = 12  # rows per micro-step per rank
block_size = 256
# LIME metadata
metadata = ''  # comma-separated stream names from meta.json, e.g. 'pos,ner'; empty = baseline
meta_shift = 0  # 0 = LIME (position t sees token t's tags), 1 = LIME+1 (position t sees token t+1's tags)
meta_weight = 1.0  # scale of each metadata embedding: one float, or a list with one per stream
meta_dropout = 0.0  # training only: replace a token's tag by <unk> (id 2) with this probability
meta_shuffle = False  # leakage control: read each stream through a fixed permutation of positions
meta_predict = False  # LIME+1 without an oracle: the model predicts the next token's tags itself (meta_shift 0)
meta_inject_layer = 0  # meta_predict: tag heads read block k's output, the next tags are added after it; 0 = n_layer // 2
meta_loss_weight = 1.0  # meta_predict: loss = token CE + meta_loss_weight * sum over streams of tag CE
# model
arch = 'gpt2'  # 'gpt2' (learned positions, LayerNorm, GELU) or 'gemma' (rotary, RMSNorm, GeGLU, GQA, no biases)
n_layer = 6
n_head = 6
n_kv_head = 0  # key/value heads (gemma's grouped-query attention): 0 = n_head, 1 = multi-query
n_embd = 384
mlp_hidden = 0  # MLP hidden width (gemma: per gate/up projection); 0 = 4 * n_embd
dropout = 0.0
bias = False  # gpt2 only
# adamw optimizer
learning_rate = 6e-4
max_iters = 5000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
# learning rate schedule: linear warmup, then cosine down to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 6e-5
# system
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # float32, bfloat16, float16 (these two need a CUDA device); auto = bfloat16 on a CUDA GPU with bf16, else float32
compile = False
peak_flops = 0.0  # for MFU; 0 = the detected GPU's bf16 peak (H100/H200 989e12, A100 312e12), none on CPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
MODEL_KEYS = ('arch', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'mlp_hidden', 'block_size', 'bias', 'dropout')


class ConfigError(SystemExit):
    """A bad config value: exits with status 1 and one line, no traceback, when not caught.
    .msg is the message without the 'config error: ' prefix (sample.py prints it its own way)."""

    def __init__(self, msg):
        super().__init__(f"config error: {msg}")
        self.msg = msg


def fail(msg):
    # one line on stderr, exit status 1, no traceback
    raise SystemExit(msg)


def coerce(key, value, source, defaults):
    """Check value against the type of the default for key."""
    if key not in defaults:
        raise ConfigError(f"unknown key '{key}' ({source})")
    default = defaults[key]
    bad = f"{key} must be {type(default).__name__}, got {value!r} ({source})"
    if key == 'meta_weight' and isinstance(value, (list, tuple)):
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in value):
            raise ConfigError(bad)
        return [float(w) for w in value]
    if key == 'metadata' and isinstance(value, (list, tuple)):
        value = ','.join(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(bad)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # --max_iters=2e4
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(bad)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(bad)
        value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(bad)
    return value


def configure(argv, defaults=None):
    """The configurator of train.py, sample.py and bench.py: config files (python, run with exec)
    and --key=value flags over defaults (this file's, or the calling script's), in command-line
    order. A flag's value is a python literal (--max_iters=2e4, --compile=True) unless the key's
    default is a string: then it is the raw text (--out_dir=2024 is the directory "2024").
    Returns (config dict, set of keys set explicitly); raises ConfigError on a bad key or value."""
    defaults = DEFAULTS if defaults is None else defaults
    cfg, explicit = dict(defaults), set()
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"no such config file {arg}")
            ns = {'__file__': os.path.abspath(arg)}  # a config can exec a base config beside it
            with open(arg) as f:
                exec(f.read(), ns)
            items = [(k, v) for k, v in ns.items()
                     if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module']
            source = arg
        else:
            if '=' not in arg:
                raise ConfigError(f"expected --key=value, got {arg}")
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


def check_device(device):
    """The device must exist on this machine: a one-line error here, not an AssertionError deep in torch."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if d.type == 'cuda':
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device={device} but no CUDA GPU is available here (use --device=cpu)")
        if d.index is not None and d.index >= n:
            raise ConfigError(f"device={device} but this machine has {n} CUDA GPU(s): cuda:0 to cuda:{n - 1}")
    if d.type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} but MPS is not available here (use --device=cpu)")


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a CUDA GPU that supports it, else float32. Only CUDA runs under autocast;
    elsewhere the model computes in float32, so float16/bfloat16 there are refused, not silently ignored."""
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    cuda = device.startswith('cuda')
    if dtype == 'auto':
        return 'bfloat16' if cuda and torch.cuda.is_bf16_supported() else 'float32'
    if dtype != 'float32' and not cuda:
        raise ConfigError(f"dtype={dtype} needs a CUDA device: on {device} the model computes in float32 only "
                          "(use --dtype=float32 or auto)")
    return dtype


def check_range(c, key, ok, allowed):
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {c[key]!r}")


def check_config(c):
    """Option ranges, checked at parse time (and again once a resume merged the checkpoint's config),
    so a bad value is one line naming the allowed range instead of a traceback or a silent misrun."""
    for k, v in c.items():
        if isinstance(v, float):
            check_range(c, k, math.isfinite(v), 'a finite number')
    for k in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters',
              'log_interval', 'n_layer', 'n_head', 'n_embd'):
        check_range(c, k, c[k] >= 1, 'an integer >= 1')
    for k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'seed'):
        check_range(c, k, c[k] >= 0, 'an integer >= 0')
    check_range(c, 'n_head', c['n_embd'] % c['n_head'] == 0, f"a divisor of n_embd={c['n_embd']}")
    for k in ('dropout', 'meta_dropout', 'beta1', 'beta2'):
        check_range(c, k, 0.0 <= c[k] < 1.0, 'in [0, 1)')
    check_range(c, 'learning_rate', c['learning_rate'] > 0, '> 0')
    check_range(c, 'min_lr', 0.0 <= c['min_lr'] <= c['learning_rate'],
                f"in [0, learning_rate={c['learning_rate']:g}]")
    for k in ('weight_decay', 'grad_clip', 'peak_flops'):
        check_range(c, k, c[k] >= 0, '>= 0' + (' (0 disables clipping)' if k == 'grad_clip' else ''))
    check_range(c, 'init_from', c['init_from'] in ('scratch', 'resume'), "'scratch' or 'resume'")
    check_range(c, 'meta_shift', c['meta_shift'] in (0, 1), '0 (LIME) or 1 (LIME+1)')
    check_range(c, 'meta_loss_weight', c['meta_loss_weight'] >= 0, '>= 0')
    check_range(c, 'keep_checkpoints', c['keep_checkpoints'] >= 0, 'an integer >= 0')
    if c['meta_predict']:
        check_range(c, 'metadata', any(s.strip() for s in c['metadata'].split(',')),
                    'one or more streams with meta_predict=True (e.g. pos_causal,ner_causal)')
        check_range(c, 'meta_shift', c['meta_shift'] == 0, "0 with meta_predict=True (it reads each token's "
                    "own tags and predicts the next token's)")
        check_range(c, 'n_layer', c['n_layer'] >= 2, '>= 2 with meta_predict=True (tag heads after block k < n_layer)')
    check_range(c, 'meta_inject_layer', 0 <= c['meta_inject_layer'] < c['n_layer'],
                f"in [1, n_layer={c['n_layer']}), or 0 for n_layer // 2")
    for k in ('out_dir', 'data_dir'):
        check_range(c, k, c[k].strip() != '', 'a directory name')
    w = c['meta_weight']
    ws = w if isinstance(w, list) else [w]
    check_range(c, 'meta_weight', all(math.isfinite(x) for x in ws), 'finite')
    n = len([s for s in c['metadata'].split(',') if s.strip()])
    check_range(c, 'meta_weight', not isinstance(w, list) or len(w) == n,
                f"one float, or a list of {n} (one per stream of metadata={c['metadata']!r})")
    check_device(c['device'])
    resolve_dtype(c['dtype'], c['device'])


# -----------------------------------------------------------------------------
# data

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
    return info


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
    each call (a long-lived np.memmap leaks memory, as nanoGPT notes)."""

    def __init__(self, data_dir, split, streams, shift, shuffle_seed=None, word_tags=None):
        self.tok_path = os.path.join(data_dir, f'{split}.bin')
        self.n = os.path.getsize(self.tok_path) // 2
        self.streams, self.shift = list(streams), shift
        self.paths = {s: os.path.join(data_dir, f'{split}.{s}.bin') for s in self.streams}
        # each stream gets its own permutation so the streams are not aligned with each other either
        self.perm = {s: affine_perm(self.n, shuffle_seed, s) for s in self.streams} if shuffle_seed is not None else {}
        self.word_path = os.path.join(data_dir, f'{split}.word.bin') if word_tags else None

    def _read(self, path, starts, T, perm=None):
        arr = np.memmap(path, dtype=np.uint16, mode='r')
        if perm is None:
            out = np.stack([arr[i:i + T] for i in starts])
        else:
            # positions p = s + k map to (a*s + b + a*k) % n; python ints avoid int64 overflow in a*s
            a, b = perm
            base = np.array([(a * int(s) + b) % self.n for s in starts], dtype=np.int64)
            step = np.array([(a * k) % self.n for k in range(T)], dtype=np.int64)
            out = arr[(base[:, None] + step[None, :]) % self.n]
        return torch.from_numpy(out.astype(np.int64))

    def windows(self, starts, T):
        """x = tok[i:i+T], y = tok[i+1:i+T+1], meta[s] = stream_s[i+shift:i+shift+T]."""
        x = self._read(self.tok_path, starts, T)
        y = self._read(self.tok_path, [i + 1 for i in starts], T)
        meta = {s: self._read(self.paths[s], [i + self.shift for i in starts], T, self.perm.get(s))
                for s in self.streams}
        return x, y, meta

    def next_tags(self, starts, T):
        """The targets' tags, stream_s[i+1:i+T+1]: what a meta_predict model's heads predict at position t."""
        return {s: self._read(self.paths[s], [i + 1 for i in starts], T, self.perm.get(s)) for s in self.streams}

    def word(self, starts, T):
        """word-position tags of the targets (never shuffled: it is ground truth for evaluation)."""
        return self._read(self.word_path, [i + 1 for i in starts], T)


def mix_seed(*keys):
    # torch's CPU generator keeps only 32 bits of a seed, so hash the keys down to 32 well-mixed bits
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def batch_generator(seed, it):
    # a distinct stream per (seed, iteration), independent of process count and of what ran before
    return torch.Generator().manual_seed(mix_seed(seed, it))


def sample_batch(split, seed, it, rows, T, streams, dropout_p):
    """The global batch of iteration it: start offsets and, if dropout_p > 0, the <unk> masks
    (one independent Bernoulli(dropout_p) mask per stream)."""
    g = batch_generator(seed, it)
    starts = torch.randint(split.n - T, (rows,), generator=g).tolist()  # i + T + 1 <= n
    masks = {s: torch.rand(rows, T, generator=g) < dropout_p for s in streams} if dropout_p > 0 else {}
    return starts, masks


def apply_meta_dropout(meta, masks):
    return {s: (t.masked_fill(masks[s], UNK) if s in masks else t) for s, t in meta.items()}


def eval_starts(n, T, count):
    """The fixed validation windows: count evenly spaced offsets; depends only on the data and eval config."""
    return np.linspace(0, n - T - 1, count).round().astype(np.int64).tolist()


@torch.no_grad()
def evaluate(model, split, starts, T, bs, ctx, device, word_ids=None, ddp=False, first_tag_nll=None,
             token_bytes=None):
    """Summed over the windows: loss, next-token accuracy, and accuracy on targets that start a word
    (word tag B) vs continue one (I); <pad>/<space>/<unk> targets are left out of that split.
    meta_predict models also get each stream's next-tag loss and accuracy (fed the data's next tags,
    as in training), val_tag_loss (their sum) and val_loss_bound = val_loss + val_tag_loss: the loss of
    the model as a generative model of (tags, text), an upper bound on its NLL of the text alone.
    first_tag_nll: {stream: -log p(tag)} per tag id (see first_tag_costs), the price of the tags of
    each window's first position, which no head predicts: added to the bound when given. val_acc of
    a meta_predict model is read with the data's next tags (an oracle); val_acc_own with the heads'
    own argmax tags (from the past alone). token_bytes: UTF-8 bytes per token id (see
    token_byte_lengths); val_bytes_per_token is the mean over the windows' targets."""
    cfg = model.config
    heads = list(cfg.meta_streams) if cfg.meta_predict else []
    model.eval()
    # loss, n, correct, start_ok, start_n, cont_ok, cont_n, first-tag cost, correct with own tags,
    # target bytes, then (tag CE, tag ok) per stream
    s = torch.zeros(10 + 2 * len(heads), dtype=torch.float64, device=device)
    for j in range(0, len(starts), bs):
        chunk = starts[j:j + bs]
        x, y, meta = split.windows(chunk, T)
        x, y = x.to(device), y.to(device)
        meta = {k: v.to(device) for k, v in meta.items()}
        with ctx:
            if heads:
                nxt = {k: v.to(device) for k, v in split.next_tags(chunk, T).items()}
                h = model.lower(x, meta)
                tag_logits = model.tag_logits(h)
                logits, _ = model.upper(model.inject(h, nxt), targets=y)
                own = {k: tl.argmax(-1) for k, tl in zip(heads, tag_logits)}
                s[8] += (model.upper(model.inject(h, own), targets=y)[0].argmax(-1) == y).sum()
            else:
                logits, _ = model(x, meta, targets=y)
        logits = logits.float()
        s[0] += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction='sum').double()
        s[1] += y.numel()
        ok = logits.argmax(-1) == y
        s[2] += ok.sum()
        if word_ids is not None:
            w = split.word(chunk, T).to(device)
            start, cont = w == word_ids[0], w == word_ids[1]
            s[3] += (ok & start).sum(); s[4] += start.sum()
            s[5] += (ok & cont).sum(); s[6] += cont.sum()
        for d, (name, tl) in enumerate(zip(heads, tag_logits if heads else [])):
            tl = tl.float()
            s[10 + 2 * d] += F.cross_entropy(tl.view(-1, tl.size(-1)), nxt[name].view(-1), reduction='sum').double()
            s[11 + 2 * d] += (tl.argmax(-1) == nxt[name]).sum()
        if token_bytes is not None:
            s[9] += token_bytes[y.cpu()].sum()
        if first_tag_nll:
            s[7] += sum(first_tag_nll[k][meta[k][:, 0].cpu()].sum() for k in first_tag_nll)
    if ddp:
        torch.distributed.all_reduce(s)
    model.train()
    s = s.tolist()
    loss = s[0] / s[1]
    out = dict(val_loss=loss, val_ppl=math.exp(min(loss, 700)), val_acc=s[2] / s[1],
               val_acc_word_start=None, val_acc_word_cont=None, val_tag_loss=None, val_loss_bound=None,
               val_acc_own=None, val_bytes_per_token=s[9] / s[1] if token_bytes is not None else None)
    if word_ids is not None:
        out['val_acc_word_start'] = s[3] / s[4] if s[4] else None
        out['val_acc_word_cont'] = s[5] / s[6] if s[6] else None
    if heads:
        out['val_tag_loss'] = sum(s[10 + 2 * d] for d in range(len(heads))) / s[1]
        out['val_loss_bound'] = loss + out['val_tag_loss'] + s[7] / s[1]
        out['val_acc_own'] = s[8] / s[1]
        for d, name in enumerate(heads):
            out[f'val_tag_acc_{name}'] = s[11 + 2 * d] / s[1]
    return out


def token_byte_lengths(info):
    """UTF-8 bytes of each token id of the dataset's tokenizer, <|endoftext|> 0 (a separator, not
    text): a tensor, or None when the tokenizer is unknown here. meta.json's 'token_bytes' (a list)
    wins, so a dataset with its own tokenizer can still report bits per byte."""
    if isinstance(info.get('token_bytes'), list):
        return torch.tensor(info['token_bytes'], dtype=torch.float64)
    import metadata as md
    try:
        md.set_tokenizer(info.get('tokenizer', 'gpt2'))
        enc = md.encoding()
    except md.MetadataError:
        return None
    n = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.float64)
    n[enc.eot_token] = 0
    return torch.from_numpy(n)


def bits_per_byte(nll, bytes_per_token):
    """val_nll (nats per target token) as bits per UTF-8 byte of the targets' text: the one number
    comparable across tokenizations and vocabularies. The separator's NLL is charged, its bytes are 0."""
    if nll is None or not bytes_per_token:
        return None
    return nll / (math.log(2) * bytes_per_token)


def is_causal(stream):
    return stream.endswith('_causal')


def nll_rule(streams, shift, predict, shuffle):
    """How val_nll (the NLL per token of the val text under the model as a generative model of
    text alone, or an upper bound of it) is read off an evaluation row, or None where the model
    reads tags that depend on tokens it has not seen: 'val_loss' (baseline; LIME on causal streams
    only), 'val_loss_bound' (meta_predict: it pays for every next tag it reads), None (full
    streams, LIME+1 fed the data's next tags, shuffled tags)."""
    if shuffle:
        return None
    if not streams or predict:
        return 'val_loss' if not streams else 'val_loss_bound'
    return 'val_loss' if shift == 0 and all(is_causal(s) for s in streams) else None


def first_tag_costs(split, streams, n_tags, sample=1 << 20):
    """-log p(tag) per tag id of each full (non-causal) stream, p = the train split's tag frequencies
    (add-one, from about `sample` evenly spaced positions). A meta_predict model reads each window's
    first tags without predicting them; full tags there depend on the next tokens, so the bound pays
    for them at this rate (causal tags depend on the past only and cost nothing)."""
    out = {}
    for s, n in zip(streams, n_tags):
        if is_causal(s):
            continue
        arr = np.memmap(split.paths[s], dtype=np.uint16, mode='r')
        counts = np.bincount(arr[::max(1, len(arr) // sample)], minlength=n)[:n] + 1.0
        out[s] = torch.from_numpy(-np.log(counts / counts.sum()))
    return out


def get_lr(it, C):
    if not C.decay_lr:
        return C.learning_rate
    if it < C.warmup_iters:
        return C.learning_rate * (it + 1) / (C.warmup_iters + 1)
    if it > C.lr_decay_iters:
        return C.min_lr
    ratio = (it - C.warmup_iters) / max(1, C.lr_decay_iters - C.warmup_iters)
    return C.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (C.learning_rate - C.min_lr)


def check_resume_data(ckpt, info, streams, ckpt_path, meta_path):
    """A checkpoint only makes sense on data with the same tokenizer and tag vocabularies."""
    old = ckpt.get('dataset') or {}
    keys = ['tokenizer', 'tokenization', 'vocab_size', 'eot_token']
    if any(s.startswith('ner') for s in streams):
        keys.append('ner')
    for k in keys:
        if old.get(k) != info.get(k):
            fail(f"{ckpt_path}: checkpoint {k} {old.get(k)!r} differs from {info.get(k)!r} in {meta_path}")
    for s in streams:
        a = old.get('streams', {}).get(s, {}).get('tags')
        if a != info['streams'][s]['tags']:
            fail(f"{ckpt_path}: tag vocabulary of stream '{s}' differs from {meta_path}")


# -----------------------------------------------------------------------------
# checkpoints and the out_dir

class CheckpointError(SystemExit):
    """A checkpoint that cannot be used: exits with status 1 and one line naming the file, when not caught."""

    def __init__(self, path, problem):
        self.msg = f"{path}: {problem}"
        super().__init__(self.msg)


def first_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# what every train.py checkpoint holds (model_args: GPTConfig's fields when this was written)
CKPT_KEYS = ('model', 'model_args', 'config', 'dataset')
RESUME_KEYS = ('iter_num', 'best_val_loss', 'optimizer', 'rng')
MODEL_ARGS = dict(n_layer=int, n_head=int, n_embd=int, block_size=int, bias=bool, dropout=(int, float),
                  vocab_size=int, meta_streams=(tuple, list), meta_n_tags=(tuple, list),
                  meta_weight=(tuple, list), meta_shift=int)


def load_checkpoint(path, resume=False):
    """A train.py checkpoint as a dict, loaded with weights_only=True: only tensors and plain data
    (numbers, strings, lists, tuples, dicts) are unpickled, so a file that would run code is refused,
    never executed. Anything that is not one of our checkpoints (truncated, foreign, another project's)
    raises CheckpointError: one line naming the file. resume: also the optimizer and RNG state."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's notes about pickle protocols are not for the user
            ck = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path, "not found")
    except OSError as e:
        raise CheckpointError(path, f"cannot read ({e.strerror or e})")
    except pickle.UnpicklingError as e:
        detail = [l.strip() for l in str(e).splitlines() if 'GLOBAL' in l or 'Unsupported' in l] + ['']
        if 'GLOBAL' in detail[0]:  # a function or class to call: the way a pickle runs code
            raise CheckpointError(path, f"refused: holds more than tensors and plain data, so loading it could "
                                  f"run code (weights_only: {detail[0]}); train.py never writes such a file")
        raise CheckpointError(path, "not a readable checkpoint, truncated or not written by torch.save "
                              f"({detail[0] or first_line(e)})")
    except Exception as e:  # zip/pickle errors of a truncated file or another format: RuntimeError, EOFError, ...
        raise CheckpointError(path, f"not a readable checkpoint, truncated or not written by torch.save "
                              f"({first_line(e)})")
    need = CKPT_KEYS + (RESUME_KEYS if resume else ())
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        missing = [k for k in need if k not in ck] if isinstance(ck, dict) else list(need)
        raise CheckpointError(path, f"not a LIME checkpoint written by train.py (no {', '.join(missing)})")
    a = ck['model_args'] if isinstance(ck['model_args'], dict) else {}
    bad = [k for k, t in MODEL_ARGS.items() if not isinstance(a.get(k), t)]
    if not bad and not all(isinstance(s, str) for s in a['meta_streams']):
        bad = ['meta_streams']
    if bad or not isinstance(ck['model'], dict):
        raise CheckpointError(path, "not a LIME checkpoint written by train.py (model_args: no or bad "
                              f"{', '.join(bad or ['model'])})")
    if not (isinstance(ck['config'], dict) and isinstance(ck['dataset'], dict)):
        raise CheckpointError(path, "not a LIME checkpoint written by train.py (bad config or dataset)")
    if resume and not (isinstance(ck['iter_num'], int) and isinstance(ck['best_val_loss'], (int, float))
                       and isinstance(ck['optimizer'], dict) and isinstance(ck['rng'], dict)
                       and isinstance(ck['rng'].get('torch'), torch.Tensor)):
        raise CheckpointError(path, "not a LIME checkpoint written by train.py (bad iter_num, best_val_loss, "
                              "optimizer or rng state)")
    return ck


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


def write_atomic(path, write):
    """write(f) into a temporary name unique to this process, fsync, rename over path: a reader sees
    the old file or the new one, never half of one. On failure the temporary file is removed; a full
    disk or a read-only directory is one line naming the file."""
    tmp, w = f"{path}.tmp-{os.getpid()}", None
    try:
        with open(tmp, 'wb') as f:
            w = _KeepWriteError(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or '.')
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            e = (w and w.error) or e
            fail(f"{path}: cannot write ({e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)})")
        raise


def snapshot(src, dst):
    """dst becomes a copy of src, atomically: a hard link (no extra disk; ckpt.pt is later replaced by
    a rename, so the link keeps this version), or a plain copy where links are not possible."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        with open(src, 'rb') as f:
            write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def snapshots(out_dir):
    """The step snapshots ckpt_{iter:06d}.pt of out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), 'ckpt_[0-9]*.pt')))


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


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def unlock_out_dir(fd):
    os.ftruncate(fd, 0)  # an empty lock file: released cleanly (a pid left in it means a killed run)
    os.close(fd)


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
    write_atomic(log_path, lambda f: f.write(''.join(keep).encode()))


def append_log(log_path, row):
    try:
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
    except OSError as e:
        fail(f"{log_path}: cannot write ({e.strerror or e})")


def prepare_out_dir(C, ckpt_path, log_path, iter_num):
    """Before the first write: remove temporary files that a killed run left (the lock says no live run
    owns them), then start the log afresh (scratch; an --overwrite'n run's checkpoint goes too, so
    the directory never mixes two runs) or trim it to the checkpoint (resume)."""
    for p in glob.glob(glob.escape(ckpt_path) + '.tmp*') + glob.glob(glob.escape(log_path) + '.tmp*'):
        os.remove(p)
    if C.init_from == 'scratch':
        for p in [ckpt_path, os.path.join(C.out_dir, 'ckpt_best.pt')] + snapshots(C.out_dir):
            if os.path.exists(p):
                os.remove(p)
        write_atomic(log_path, lambda f: None)
    else:
        trim_log(log_path, iter_num)


def existing_run(out_dir):
    """The files of an earlier run in out_dir, if any (a scratch run would replace them)."""
    found = []
    for name in ('ckpt.pt', 'ckpt_best.pt', 'log.jsonl'):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p) and os.path.getsize(p) > 0:
            found.append(name)
    return found + [os.path.basename(p) for p in snapshots(out_dir)][-1:]


def start_wandb(C, cfg):
    """A wandb run for this training run (wandb_log=True): the config, then every log.jsonl row.
    wandb is optional and imported only here; WANDB_MODE=offline logs without a network."""
    try:
        import wandb
    except ImportError:
        fail("config error: wandb_log=True needs the wandb package: pip install wandb")
    try:
        return wandb.init(project=C.wandb_project, name=C.wandb_run_name or os.path.basename(os.path.abspath(C.out_dir)),
                          config=cfg, dir=C.out_dir)
    except Exception as e:
        fail(f"wandb.init failed ({first_line(e)}); log in with `wandb login`, or set WANDB_MODE=offline")


# the default corpora, built on first use by any run that names them (offline-capable NER mode)
DEFAULT_CORPORA = {'data/gutenberg': ['--ner', 'binary'],
                   'data/gutenberg_4k': ['--ner', 'binary', '--tokenizer', 'gpt2-4096']}


def ensure_data(data_dir):
    """A missing default corpus (NLTK's Gutenberg, see DEFAULT_CORPORA) is built with prepare.py,
    with its progress bar; any other missing data_dir is an error that names the command to run.
    DDP: rank 0 builds, the others wait for its meta.json (written last)."""
    if os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return
    args = DEFAULT_CORPORA.get(os.path.normpath(data_dir))
    if args is None:
        fail(f"{os.path.join(data_dir, 'meta.json')}: not found; build the dataset first: "
             f"python prepare.py --input YOUR_FILES --out_dir {data_dir} --ner binary")
    if int(os.environ.get('RANK', 0)) != 0:
        while not os.path.isfile(os.path.join(data_dir, 'meta.json')):
            time.sleep(1)
        return
    import subprocess
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare.py'),
           '--out_dir', data_dir, *args]
    print(f"{data_dir} not found: building the default corpus first ({' '.join(cmd[1:])})", flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail(f"prepare.py failed building {data_dir} (see its error above)")


def resume_conflicts(ckpt, cfg, explicit):
    """Flags given now that contradict the checkpoint's architecture or metadata: a resume keeps those,
    so a different value would be silently ignored. Equal values are fine."""
    a = ckpt['model_args']
    fixed = {k: a.get(k, DEFAULTS[k]) for k in MODEL_KEYS}
    fixed.update(metadata=list(a['meta_streams']), meta_shift=a['meta_shift'], meta_weight=list(a['meta_weight']),
                 meta_shuffle=ckpt['config'].get('meta_shuffle', False),
                 **{k: a.get(k, DEFAULTS[k]) for k in ('meta_predict', 'meta_inject_layer', 'meta_loss_weight')})
    given = dict(cfg, metadata=[s.strip() for s in cfg['metadata'].split(',') if s.strip()])
    w = cfg['meta_weight']
    given['meta_weight'] = [float(x) for x in w] if isinstance(w, list) else [float(w)] * len(given['metadata'])
    return [f"--{k}={cfg[k]!r} (checkpoint: {fixed[k]!r})" for k in fixed if k in explicit and given[k] != fixed[k]]

# -----------------------------------------------------------------------------

def main(argv):
    cfg, explicit = configure(argv)
    check_config(cfg)
    lock = None
    if int(os.environ.get('RANK', 0)) == 0 and not cfg['eval_only']:
        lock = lock_out_dir(cfg['out_dir'])  # before reading or writing anything in it
    try:
        run(cfg, explicit)
    finally:
        if lock is not None:
            unlock_out_dir(lock)


def run(cfg, explicit):
    C = SimpleNamespace(**cfg)
    master_env = int(os.environ.get('RANK', 0)) == 0
    ckpt_path = os.path.join(C.out_dir, 'ckpt.pt')
    ckpt = None
    if C.init_from == 'resume':
        if not os.path.isfile(ckpt_path):
            fail(f"{ckpt_path}: not found, cannot resume")
        ckpt = load_checkpoint(ckpt_path, resume=True)
        conflicts = resume_conflicts(ckpt, cfg, explicit)
        if conflicts:
            fail(f"{ckpt_path}: a resume keeps the checkpoint's architecture and metadata, but "
                 f"{', '.join(conflicts)}; drop these flags, or train from scratch in another out_dir")
        # continue the checkpoint's run: its config, with only the keys set now on top
        old = {k: coerce(k, v, ckpt_path, DEFAULTS) for k, v in ckpt['config'].items() if k in DEFAULTS}
        cfg = {**DEFAULTS, **old, **{k: cfg[k] for k in explicit}}
        for k in MODEL_KEYS + ('meta_shift',):  # the architecture is the checkpoint's (older ones: gpt2)
            cfg[k] = coerce(k, ckpt['model_args'].get(k, DEFAULTS[k]), ckpt_path, DEFAULTS)
        cfg['metadata'] = ','.join(ckpt['model_args']['meta_streams'])
        for k in ('meta_predict', 'meta_inject_layer', 'meta_loss_weight'):  # absent in older checkpoints
            cfg[k] = ckpt['model_args'].get(k, DEFAULTS[k])
        check_config(cfg)  # the merged config, e.g. the checkpoint's device on this machine
        C = SimpleNamespace(**cfg)
    elif master_env and not C.eval_only and not C.overwrite and existing_run(C.out_dir):
        fail(f"{C.out_dir}: already holds a run ({', '.join(existing_run(C.out_dir))}); continue it with "
             "--init_from=resume, replace it with --overwrite=True, or choose another --out_dir")
    streams = [s.strip() for s in C.metadata.split(',') if s.strip()]
    if C.meta_predict:  # 0 = the middle block (the default: see README's sweep)
        C.meta_inject_layer = cfg['meta_inject_layer'] = C.meta_inject_layer or C.n_layer // 2
    meta_weight = C.meta_weight

    # distributed setup
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend='nccl' if C.device.startswith('cuda') else 'gloo')
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        if C.device.startswith('cuda'):
            C.device = f'cuda:{local_rank}'
            torch.cuda.set_device(C.device)
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    if C.gradient_accumulation_steps % world:
        fail(f"config error: gradient_accumulation_steps={C.gradient_accumulation_steps} "
             f"is not divisible by {world} processes")
    accum = C.gradient_accumulation_steps // world  # micro-steps on this rank
    global_rows = C.batch_size * C.gradient_accumulation_steps
    tokens_per_iter = global_rows * C.block_size
    log = print if master else (lambda *a, **k: None)
    log(f"tokens per iteration: {tokens_per_iter:,} ({global_rows} rows x {C.block_size}, {world} process(es))")

    torch.manual_seed(C.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_type = 'cuda' if 'cuda' in C.device else 'cpu'
    C.dtype = resolve_dtype(C.dtype, C.device)  # the saved config keeps what was asked for ('auto')
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[C.dtype]
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

    # data
    ensure_data(C.data_dir)
    info = load_meta(C.data_dir, streams)
    meta_path = os.path.join(C.data_dir, 'meta.json')
    if ckpt is not None:
        check_resume_data(ckpt, info, streams, ckpt_path, meta_path)
    word_ids = None
    word_tags = info.get('streams', {}).get('word', {}).get('tags')
    if word_tags and 'B' in word_tags and 'I' in word_tags:
        word_ids = (word_tags.index('B'), word_tags.index('I'))
    shuffle_seed = C.seed if C.meta_shuffle else None
    train_split = Split(C.data_dir, 'train', streams, C.meta_shift, shuffle_seed)
    val_split = Split(C.data_dir, 'val', streams, C.meta_shift, shuffle_seed, word_tags=word_ids)
    for sp in (train_split, val_split):
        if sp.n < C.block_size + 2:
            fail(f"{sp.tok_path}: {sp.n} tokens, too few for block_size {C.block_size}")
    val_windows = eval_starts(val_split.n, C.block_size, C.eval_iters * C.batch_size)[rank::world]
    nll_key = nll_rule(streams, C.meta_shift, C.meta_predict, C.meta_shuffle)
    first_tags = (first_tag_costs(train_split, streams, [len(info['streams'][s]['tags']) for s in streams])
                  if C.meta_predict else None)
    token_bytes = token_byte_lengths(info)

    # model
    model_args = dict(arch=C.arch, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head, n_embd=C.n_embd,
                      mlp_hidden=C.mlp_hidden, block_size=C.block_size,
                      bias=C.bias, dropout=C.dropout, vocab_size=info['vocab_size'],
                      meta_streams=tuple(streams),
                      meta_n_tags=tuple(len(info['streams'][s]['tags']) for s in streams),
                      meta_weight=meta_weight, meta_shift=C.meta_shift, meta_predict=C.meta_predict,
                      meta_inject_layer=C.meta_inject_layer if C.meta_predict else 0,
                      meta_loss_weight=C.meta_loss_weight)
    try:
        model_config = GPTConfig(**model_args)
    except ValueError as e:  # e.g. n_head not a multiple of n_kv_head
        fail(f"config error: {e}")
    model = GPT(model_config)
    model_args = dict(vars(model.config))  # normalised (meta_weight as one float per stream)
    iter_num, best_val_loss = 0, 1e9
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{ckpt_path}: weights do not fit the checkpoint's model_args ({first_line(e)})")
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    model.to(C.device)
    raw_model = model
    scaler = torch.amp.GradScaler(device_type, enabled=(C.dtype == 'float16' and device_type == 'cuda'))
    optimizer = model.configure_optimizers(C.weight_decay, C.learning_rate, (C.beta1, C.beta2), device_type)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
            torch.set_rng_state(ckpt['rng']['torch'])
            if device_type == 'cuda' and ckpt['rng'].get('cuda') is not None:
                torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            fail(f"{ckpt_path}: bad optimizer or RNG state ({first_line(e)})")
    ckpt = None  # free memory
    if C.compile:
        log("compiling the model...")
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    def to_dev(x, y, meta):
        if device_type == 'cuda':
            f = lambda t: t.pin_memory().to(C.device, non_blocking=True)
        else:
            f = lambda t: t.to(C.device)
        return f(x), f(y), {k: f(v) for k, v in meta.items()}

    log_path = os.path.join(C.out_dir, 'log.jsonl')
    if master and not C.eval_only:
        prepare_out_dir(C, ckpt_path, log_path, iter_num)
    wb = start_wandb(C, cfg) if master and C.wandb_log and not C.eval_only else None
    start_iter, t_start = iter_num, time.time()
    t_interval, it_interval = time.time(), iter_num
    loss_sum, loss_count = torch.zeros((), device=C.device), 0
    while True:
        lr = get_lr(iter_num, C)
        for group in optimizer.param_groups:
            group['lr'] = lr

        # evaluate, log and checkpoint; a resumed run already did this at its start iteration
        due = iter_num % C.eval_interval == 0 or iter_num == C.max_iters
        if (due and (iter_num != start_iter or C.init_from == 'scratch')) or C.eval_only:
            if device_type == 'cuda':
                torch.cuda.synchronize()
            dt = time.time() - t_interval
            n_it = iter_num - it_interval
            if ddp:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item() / loss_count if loss_count else None
            tps = n_it * tokens_per_iter / dt if n_it else None
            mfu = raw_model.estimate_mfu(C.batch_size * accum, dt / n_it, C.peak_flops) if n_it else None
            # ranks may hold different numbers of windows, so evaluate outside DDP's forward and all-reduce sums
            res = evaluate(model.module if ddp else model, val_split, val_windows, C.block_size, C.batch_size,
                           ctx, C.device, word_ids, ddp, first_tags, token_bytes)
            res['val_nll'] = res[nll_key] if nll_key else None
            res['val_bpb'] = bits_per_byte(res['val_nll'], res['val_bytes_per_token'])
            row = dict(iter=iter_num, tokens=iter_num * tokens_per_iter, lr=lr, train_loss=train_loss, **res,
                       tokens_per_sec=tps, mfu=mfu, elapsed_s=time.time() - t_start)
            fmt = lambda v: 'n/a' if v is None else f"{v:.4f}"
            log(f"step {iter_num}: train loss {fmt(train_loss)}, val loss {res['val_loss']:.4f}, "
                f"val_nll {fmt(res['val_nll'])} (bpb {fmt(res['val_bpb'])})"
                + (f" (bound: tag loss {res['val_tag_loss']:.4f})" if C.meta_predict else "")
                + f", ppl {res['val_ppl']:.2f}, acc {res['val_acc']:.4f} (word start {fmt(res['val_acc_word_start'])}, "
                f"cont {fmt(res['val_acc_word_cont'])})" + (f", {tps:,.0f} tok/s" if tps else ""))
            if C.eval_only:
                log(json.dumps(row))
                break
            if master:
                append_log(log_path, row)
                if wb is not None:
                    wb.log({k: v for k, v in row.items() if v is not None}, step=iter_num)
            # the loss the run minimises: meta_predict models also pay for their tags
            score = res['val_loss_bound'] if C.meta_predict else res['val_loss']
            improved = score < best_val_loss
            best_val_loss = min(best_val_loss, score)
            if master and iter_num > 0 and (improved or C.always_save_checkpoint):
                ck = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                          iter_num=iter_num, best_val_loss=best_val_loss, config=cfg, dataset=info,
                          rng=dict(torch=torch.get_rng_state(),
                                   cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else None))
                write_atomic(ckpt_path, lambda f: torch.save(ck, f))  # never a truncated ckpt.pt
                if C.keep_checkpoints:
                    snapshot(ckpt_path, os.path.join(C.out_dir, f'ckpt_{iter_num:06d}.pt'))
                    for old in snapshots(C.out_dir)[:-C.keep_checkpoints]:
                        os.remove(old)
                if C.keep_checkpoints and improved and C.always_save_checkpoint:
                    snapshot(ckpt_path, os.path.join(C.out_dir, 'ckpt_best.pt'))  # ckpt.pt is the latest
            loss_sum, loss_count = torch.zeros((), device=C.device), 0
            t_interval, it_interval = time.time(), iter_num
        if iter_num >= C.max_iters:
            break

        # one optimizer step on the global batch of this iteration; this rank takes its slice
        t0 = time.time()
        torch.manual_seed(mix_seed(C.seed, iter_num, rank, 1))  # model dropout: a function of (seed, iter, rank)
        starts, masks = sample_batch(train_split, C.seed, iter_num, global_rows, C.block_size, streams, C.meta_dropout)
        lo = rank * C.batch_size * accum
        mine = starts[lo:lo + C.batch_size * accum]
        x_all, y_all, meta_all = train_split.windows(mine, C.block_size)
        meta_all = apply_meta_dropout(meta_all, {s: m[lo:lo + C.batch_size * accum] for s, m in masks.items()})
        x_all, y_all, meta_all = to_dev(x_all, y_all, meta_all)
        # meta_predict: the next token's tags, teacher-forced (never dropped: they are also the tag targets)
        next_all = to_dev(x_all, y_all, train_split.next_tags(mine, C.block_size))[2] if C.meta_predict else None
        it_loss = torch.zeros((), device=C.device)
        for micro in range(accum):
            sl = slice(micro * C.batch_size, (micro + 1) * C.batch_size)
            if ddp:
                # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = (micro == accum - 1)
            with ctx:
                nm = {k: v[sl] for k, v in next_all.items()} if next_all is not None else None
                _, loss = model(x_all[sl], {k: v[sl] for k, v in meta_all.items()}, targets=y_all[sl], next_meta=nm)
                loss = loss / accum
            it_loss += loss.detach()
            scaler.scale(loss).backward()
        if C.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), C.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += it_loss
        loss_count += 1
        if iter_num % C.log_interval == 0 and master:
            lossf = it_loss.item()  # syncs with the device
            log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {(time.time() - t0) * 1000:.1f}ms")
        iter_num += 1

    if wb is not None:
        wb.finish()
    if ddp:
        # wait for rank 0 to finish its checkpoint: a rank that tears gloo down while its peer is
        # still busy can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        del model
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
