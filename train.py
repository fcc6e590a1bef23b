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
import json
import math
import os
import sys
import time
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
eval_interval = 250
log_interval = 10
eval_iters = 20  # the fixed validation set is eval_iters * batch_size windows
eval_only = False
always_save_checkpoint = True  # False: save only when val loss improves (then resume restarts from the best)
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
# data
data_dir = 'data/gutenberg'  # a directory written by prepare.py
gradient_accumulation_steps = 1  # global count, divided across DDP ranks
batch_size = 12  # rows per micro-step per rank
block_size = 256
# LIME metadata
metadata = ''  # comma-separated stream names from meta.json, e.g. 'pos,ner'; empty = baseline
meta_shift = 0  # 0 = LIME (position t sees token t's tags), 1 = LIME+1 (position t sees token t+1's tags)
meta_weight = 1.0  # scale of each metadata embedding: one float, or a list with one per stream
meta_dropout = 0.0  # training only: replace a token's tag by <unk> (id 2) with this probability
meta_shuffle = False  # leakage control: read each stream through a fixed permutation of positions
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
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False
peak_flops = 0.0  # for MFU; 0 = the detected GPU's bf16 peak (H100/H200 989e12, A100 312e12), none on CPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
MODEL_KEYS = ('arch', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'mlp_hidden', 'block_size', 'bias', 'dropout')


def fail(msg):
    # one line on stderr, exit status 1, no traceback
    raise SystemExit(msg)


def coerce(key, value, source, defaults=None):
    """Check value against the type of the default for key."""
    defaults = DEFAULTS if defaults is None else defaults
    if key not in defaults:
        fail(f"config error: unknown key '{key}' ({source})")
    default = defaults[key]
    bad = f"config error: {key} must be {type(default).__name__}, got {value!r} ({source})"
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


def configure(argv, defaults=None):
    """argv: config files and --key=value flags over defaults (this file's, or another script's,
    e.g. bench.py's). Returns (config dict, set of keys set explicitly)."""
    defaults = DEFAULTS if defaults is None else defaults
    cfg, explicit = dict(defaults), set()
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                fail(f"config error: no such config file {arg}")
            ns = {'__file__': os.path.abspath(arg)}  # a config can exec a base config beside it
            with open(arg) as f:
                exec(f.read(), ns)
            items = [(k, v) for k, v in ns.items()
                     if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module']
            source = arg
        else:
            if '=' not in arg:
                fail(f"config error: expected --key=value, got {arg}")
            key, val = arg[2:].split('=', 1)
            try:
                val = ast.literal_eval(val)
            except (SyntaxError, ValueError):
                pass  # a bare string, e.g. --device=cpu
            items, source = [(key, val)], arg
        for k, v in items:
            cfg[k] = coerce(k, v, source, defaults)
            explicit.add(k)
    return cfg, explicit


# -----------------------------------------------------------------------------
# data

def load_meta(data_dir, streams):
    """Read meta.json and check that every requested stream exists and matches the token files."""
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        fail(f"{meta_path}: not found (build the dataset with prepare.py)")
    with open(meta_path) as f:
        info = json.load(f)
    known = info.get('streams', {})
    for s in streams:
        if s not in known:
            fail(f"{meta_path}: unknown metadata stream '{s}' (available: {', '.join(known) or 'none'})")
    for split in ('train', 'val'):
        tok_path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(tok_path):
            fail(f"{tok_path}: not found")
        n = os.path.getsize(tok_path) // 2
        for s in streams:
            p = os.path.join(data_dir, f'{split}.{s}.bin')
            if not os.path.isfile(p):
                fail(f"{p}: not found (stream '{s}' is listed in {meta_path})")
            m = os.path.getsize(p) // 2
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
def evaluate(model, split, starts, T, bs, ctx, device, word_ids=None, ddp=False):
    """Summed over the windows: loss, next-token accuracy, and accuracy on targets that start a word
    (word tag B) vs continue one (I); <pad>/<space>/<unk> targets are left out of that split."""
    model.eval()
    s = torch.zeros(7, dtype=torch.float64, device=device)  # loss, n, correct, start_ok, start_n, cont_ok, cont_n
    for j in range(0, len(starts), bs):
        chunk = starts[j:j + bs]
        x, y, meta = split.windows(chunk, T)
        x, y = x.to(device), y.to(device)
        meta = {k: v.to(device) for k, v in meta.items()}
        with ctx:
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
    if ddp:
        torch.distributed.all_reduce(s)
    model.train()
    s = s.tolist()
    loss = s[0] / s[1]
    out = dict(val_loss=loss, val_ppl=math.exp(min(loss, 700)), val_acc=s[2] / s[1],
               val_acc_word_start=None, val_acc_word_cont=None)
    if word_ids is not None:
        out['val_acc_word_start'] = s[3] / s[4] if s[4] else None
        out['val_acc_word_cont'] = s[5] / s[6] if s[6] else None
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

def main(argv):
    cfg, explicit = configure(argv)
    C = SimpleNamespace(**cfg)
    ckpt_path = os.path.join(C.out_dir, 'ckpt.pt')
    ckpt = None
    if C.init_from == 'resume':
        if not os.path.isfile(ckpt_path):
            fail(f"{ckpt_path}: not found, cannot resume")
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        # continue the checkpoint's run: its config, with only the keys set now on top
        cfg = {**DEFAULTS, **{k: v for k, v in ckpt['config'].items() if k in DEFAULTS},
               **{k: cfg[k] for k in explicit}}
        for k in MODEL_KEYS:  # the architecture is the checkpoint's (older ones: gpt2, no arch keys)
            cfg[k] = ckpt['model_args'].get(k, DEFAULTS[k])
        cfg['metadata'] = ','.join(ckpt['model_args']['meta_streams'])
        cfg['meta_shift'] = ckpt['model_args']['meta_shift']
        C = SimpleNamespace(**cfg)
    elif C.init_from != 'scratch':
        fail(f"config error: init_from must be 'scratch' or 'resume', got {C.init_from!r}")
    if C.meta_shift not in (0, 1):
        fail(f"config error: meta_shift must be 0 or 1, got {C.meta_shift}")
    streams = [s.strip() for s in C.metadata.split(',') if s.strip()]
    meta_weight = C.meta_weight
    if isinstance(meta_weight, list) and len(meta_weight) != len(streams):
        fail(f"config error: meta_weight has {len(meta_weight)} values for {len(streams)} streams")

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
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(C.dtype)
    if ptdtype is None:
        fail(f"config error: dtype must be float32, bfloat16 or float16, got {C.dtype!r}")
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

    # data
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

    # model
    model_args = dict(arch=C.arch, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head, n_embd=C.n_embd,
                      mlp_hidden=C.mlp_hidden, block_size=C.block_size,
                      bias=C.bias, dropout=C.dropout, vocab_size=info['vocab_size'],
                      meta_streams=tuple(streams),
                      meta_n_tags=tuple(len(info['streams'][s]['tags']) for s in streams),
                      meta_weight=meta_weight, meta_shift=C.meta_shift)
    try:
        model_config = GPTConfig(**model_args)
    except ValueError as e:  # e.g. n_head not a multiple of n_kv_head
        fail(f"config error: {e}")
    model = GPT(model_config)
    model_args = dict(vars(model.config))  # normalised (meta_weight as one float per stream)
    iter_num, best_val_loss = 0, 1e9
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    model.to(C.device)
    raw_model = model
    scaler = torch.amp.GradScaler(device_type, enabled=(C.dtype == 'float16' and device_type == 'cuda'))
    optimizer = model.configure_optimizers(C.weight_decay, C.learning_rate, (C.beta1, C.beta2), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        torch.set_rng_state(ckpt['rng']['torch'])
        if device_type == 'cuda' and ckpt['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
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

    os.makedirs(C.out_dir, exist_ok=True)
    log_path = os.path.join(C.out_dir, 'log.jsonl')
    if master and C.init_from == 'scratch' and not C.eval_only:
        open(log_path, 'w').close()
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
                           ctx, C.device, word_ids, ddp)
            row = dict(iter=iter_num, tokens=iter_num * tokens_per_iter, lr=lr, train_loss=train_loss, **res,
                       tokens_per_sec=tps, mfu=mfu, elapsed_s=time.time() - t_start)
            fmt = lambda v: 'n/a' if v is None else f"{v:.4f}"
            log(f"step {iter_num}: train loss {fmt(train_loss)}, val loss {res['val_loss']:.4f}, "
                f"ppl {res['val_ppl']:.2f}, acc {res['val_acc']:.4f} (word start {fmt(res['val_acc_word_start'])}, "
                f"cont {fmt(res['val_acc_word_cont'])})" + (f", {tps:,.0f} tok/s" if tps else ""))
            if C.eval_only:
                log(json.dumps(row))
                break
            if master:
                with open(log_path, 'a') as f:
                    f.write(json.dumps(row) + '\n')
            improved = res['val_loss'] < best_val_loss
            best_val_loss = min(best_val_loss, res['val_loss'])
            if master and iter_num > 0 and (improved or C.always_save_checkpoint):
                ck = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                          iter_num=iter_num, best_val_loss=best_val_loss, config=cfg, dataset=info,
                          rng=dict(torch=torch.get_rng_state(),
                                   cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else None))
                # write then rename, so a crash mid-save never leaves a truncated ckpt.pt
                torch.save(ck, ckpt_path + '.tmp')
                os.replace(ckpt_path + '.tmp', ckpt_path)
            loss_sum, loss_count = torch.zeros((), device=C.device), 0
            t_interval, it_interval = time.time(), iter_num
        if iter_num >= C.max_iters:
            break

        # one optimizer step on the global batch of this iteration; this rank takes its slice
        t0 = time.time()
        torch.manual_seed(mix_seed(C.seed, iter_num, rank, 1))  # model dropout: a function of (seed, iter, rank)
        starts, masks = sample_batch(train_split, C.seed, iter_num, global_rows, C.block_size, streams, C.meta_dropout)
        lo = rank * C.batch_size * accum
        x_all, y_all, meta_all = train_split.windows(starts[lo:lo + C.batch_size * accum], C.block_size)
        meta_all = apply_meta_dropout(meta_all, {s: m[lo:lo + C.batch_size * accum] for s, m in masks.items()})
        x_all, y_all, meta_all = to_dev(x_all, y_all, meta_all)
        it_loss = torch.zeros((), device=C.device)
        for micro in range(accum):
            sl = slice(micro * C.batch_size, (micro + 1) * C.batch_size)
            if ddp:
                # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = (micro == accum - 1)
            with ctx:
                _, loss = model(x_all[sl], {k: v[sl] for k, v in meta_all.items()}, targets=y_all[sl])
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

    if ddp:
        # wait for rank 0 to finish its checkpoint: a rank that tears gloo down while its peer is
        # still busy can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        del model
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
