"""
Train a GPT, with or without LIME metadata embeddings.

Single process:
$ python train.py configs/cpu_demo.py --max_iters=200
DDP on one node (nccl on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_lime.py

Every module-level name below is a config key; a config file (python, run with exec; it may
include('base.py') a config beside it) and --key=value flags override them, in command-line order
(common.configure).
"""

import glob
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common import (Split, append_log, data_fingerprint, token_classes, autocast, check_device, check_range, coerce, configure, cooldown_start, eval_starts, fail,
                    window_docs,
                    first_line, id_limits, load_checkpoint, load_meta, lock_out_dir, remove_temps, resolve_dtype,
                    run_main, save_checkpoint, trim_log, unlock_out_dir, write_atomic, write_json)
from metadata import UNK, is_causal  # UNK: the tag id of missing metadata, in every stream
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
branch_from = ''  # a checkpoint file (e.g. a kept snapshot): a new run in out_dir continues from its weights, optimizer and iteration, its config with the keys set now on top (a cooldown branched from a snapshot: a smaller max_iters, a meta_cooldown)
allow_data_change = False  # resume on a data_dir re-prepared since the checkpoint (logged; this resume only)
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
meta_classes = 'data'  # what the streams hold: 'data' (the tags); the controls 'token' (each token's majority tags in the train split, a lookup) or 'random' (those classes moved to other tokens at random, same class sizes)
marginal_k = 8  # meta_predict on causal streams: val_nll before the last evaluation is the top-k (plus the data's tags) bound of the marginal; 0 = exact every time (the last evaluation always is); see docs/training.md
meta_cooldown = 0.0  # the last fraction of max_iters trains without metadata (the tables add nothing), same lr schedule; 0 = off
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
    check_range(c, 'branch_from', not (c['branch_from'] and c['init_from'] == 'resume'),
                "'' with --init_from=resume (a branch is a new run in its own out_dir)")
    check_range(c, 'meta_shift', c['meta_shift'] in (0, 1), '0 (LIME) or 1 (LIME+1)')
    check_range(c, 'meta_loss_weight', c['meta_loss_weight'] >= 0, '>= 0')
    check_range(c, 'keep_checkpoints', c['keep_checkpoints'] >= 0, 'an integer >= 0')
    check_range(c, 'meta_classes', c['meta_classes'] in ('data', 'token', 'random'), "'data', 'token' or 'random'")
    check_range(c, 'meta_classes', c['meta_classes'] == 'data' or (c['metadata'].strip() and not c['meta_shuffle']),
                "'data' without metadata streams or with meta_shuffle (the classes replace the streams' tags)")
    check_range(c, 'marginal_k', c['marginal_k'] >= 0, 'an integer >= 0 (0: the exact marginal at every evaluation)')
    check_range(c, 'meta_cooldown', 0.0 <= c['meta_cooldown'] < 1.0, 'in [0, 1) (a fraction of max_iters; 0 = off)')
    # a meta_predict model already runs on the tags it predicts itself; without them it would lose its heads' point
    check_range(c, 'meta_cooldown', not (c['meta_cooldown'] and c['meta_predict']),
                "0 with meta_predict=True (such a model reads only the tags it predicts: it needs no given tags)")
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
    names = [s.strip() for s in c['metadata'].split(',') if s.strip()]
    n = len(names)
    # a stream twice would get two embedding tables fed the same tags: twice the weight, under two names
    check_range(c, 'metadata', n == len(set(names)), 'a list of distinct streams (each at most once)')
    check_range(c, 'meta_weight', not isinstance(w, list) or len(w) == n,
                f"one float, or a list of {n} (one per stream of metadata={c['metadata']!r})")
    check_device(c['device'])
    resolve_dtype(c['dtype'], c['device'])


# -----------------------------------------------------------------------------
# data (the reader, load_meta and Split, is common.py's: other scripts read the same windows)

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


@torch.no_grad()
def evaluate(model, split, starts, T, bs, ctx, device, word_ids=None, ddp=False, first_tag_nll=None,
             token_bytes=None, no_tags=False, nll_rule=None, marginal_k=0, docs=None, n_docs=1):
    """One pass over the val windows (starts); the row's numbers (eval_summary says what each is).
    first_tag_nll: {stream: -log p(tag)} per tag id (first_tag_costs), the bound's price of each
    window's first tags. token_bytes: UTF-8 bytes per token id (token_byte_lengths). nll_rule (see
    nll_rule): how val_nll is computed; 'marginal': GPT.marginal, exact with marginal_k=0, else the
    top-k bound. docs: each window's document (window_docs), of n_docs: doc_nll, doc_loss and
    doc_tokens are the per-document sums behind val_nll and val_loss, for statistics over documents."""
    cfg = model.config
    heads = list(cfg.meta_streams) if cfg.meta_predict else []
    marginal = nll_rule == 'marginal' and not no_tags
    # a model whose next tags add nothing (meta_weight 0) has its marginal equal to its token loss
    marginal_free = marginal and not any(cfg.meta_weight)
    model.eval()
    # loss, n, correct, start_ok, start_n, cont_ok, cont_n, first-tag cost, correct with own tags,
    # target bytes, honest NLL (val_nll's sum), then (tag CE, tag ok) per stream
    s = torch.zeros(11 + 2 * len(heads), dtype=torch.float64, device=device)
    per_doc = torch.zeros(3, n_docs, dtype=torch.float64, device=device)  # nll, loss, tokens
    t_marg = 0.0
    for j in range(0, len(starts), bs):
        chunk = starts[j:j + bs]
        x, y, meta = split.windows(chunk, T)
        x, y = x.to(device), y.to(device)
        # no_tags: a cooled-down model (meta_cooldown) is evaluated as what it now is, a plain language model
        meta = None if no_tags else {k: v.to(device) for k, v in meta.items()}
        with ctx:
            if heads:
                nxt = {k: v.to(device) for k, v in split.next_tags(chunk, T).items()}
                logits, _, tag_logits, h = model.forward_predict(x, meta, nxt, targets=y)
                own, _, _, _ = model.forward_predict(x, meta, targets=y, choose=model.argmax_tags, h=h)
                s[8] += (own.argmax(-1) == y).sum()
            else:
                logits, _ = model(x, meta, targets=y)
        logits = logits.float()
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction='none').view(y.shape).double()
        s[0] += ce.sum()
        s[1] += y.numel()
        ok = logits.argmax(-1) == y
        s[2] += ok.sum()
        if word_ids is not None:
            w = split.word(chunk, T).to(device)
            start, cont = w == word_ids[0], w == word_ids[1]
            s[3] += (ok & start).sum(); s[4] += start.sum()
            s[5] += (ok & cont).sum(); s[6] += cont.sum()
        nll = ce.clone()  # the honest NLL per position where the rule has one (else: the loss, unused)
        for d, (name, tl) in enumerate(zip(heads, tag_logits if heads else [])):
            tl = tl.float()
            tce = F.cross_entropy(tl.view(-1, tl.size(-1)), nxt[name].view(-1), reduction='none').view(y.shape)
            s[11 + 2 * d] += tce.sum().double()
            s[12 + 2 * d] += (tl.argmax(-1) == nxt[name]).sum()
            if nll_rule == 'val_loss_bound':
                nll += tce.double()
        if token_bytes is not None:
            s[9] += token_bytes[y.cpu()].sum()
        if first_tag_nll:
            first = sum(first_tag_nll[k][meta[k][:, 0].cpu()] for k in first_tag_nll).to(device)
            s[7] += first.sum()
            if nll_rule == 'val_loss_bound':
                nll[:, 0] += first
        if marginal and not marginal_free:
            t0 = time.time()
            with ctx:
                nll = -model.marginal(x, meta, nxt, y, top_k=marginal_k).double()
            t_marg += time.time() - t0
        s[10] += nll.sum()
        if docs is not None:
            d = torch.tensor(docs[j:j + bs], device=device)
            per_doc[0].index_add_(0, d, nll.sum(1))
            per_doc[1].index_add_(0, d, ce.sum(1))
            per_doc[2].index_add_(0, d, torch.full((len(chunk),), float(T), dtype=torch.float64, device=device))
    if ddp:
        torch.distributed.all_reduce(s)
        torch.distributed.all_reduce(per_doc)
    model.train()
    out = eval_summary(s.tolist(), heads, word_ids is not None, token_bytes is not None)
    out['val_marginal_s'] = t_marg if marginal else None
    if docs is not None:
        out['doc_nll'], out['doc_loss'], out['doc_tokens'] = per_doc.tolist()
    return out


def eval_summary(s, heads, words, nbytes):
    """evaluate()'s sums s as the row's numbers. Loss, next-token accuracy, and accuracy on targets
    that start a word (word tag B) vs continue one (I); <pad>/<space>/<unk> targets are left out of
    that split. meta_predict models also get each stream's next-tag loss and accuracy (fed the data's
    next tags, as in training), val_tag_loss (their sum) and val_loss_bound = val_loss + val_tag_loss
    (+ the first tags' price): the loss of the model as a generative model of (tags, text), an upper
    bound on its NLL of the text alone. val_acc of a meta_predict model is read with the data's next
    tags (an oracle); val_acc_own with the heads' own argmax tags (from the past alone).
    val_bytes_per_token: the mean over the targets. val_nll_sum: the honest NLL per token (nll_rule)."""
    loss = s[0] / s[1]
    out = dict(val_loss=loss, val_ppl=math.exp(min(loss, 700)), val_acc=s[2] / s[1],
               val_acc_word_start=None, val_acc_word_cont=None, val_tag_loss=None, val_loss_bound=None,
               val_acc_own=None, val_bytes_per_token=s[9] / s[1] if nbytes else None, val_nll_sum=s[10] / s[1])
    if words:
        out['val_acc_word_start'] = s[3] / s[4] if s[4] else None
        out['val_acc_word_cont'] = s[5] / s[6] if s[6] else None
    if heads:
        out['val_tag_loss'] = sum(s[11 + 2 * d] for d in range(len(heads))) / s[1]
        out['val_loss_bound'] = loss + out['val_tag_loss'] + s[7] / s[1]
        out['val_acc_own'] = s[8] / s[1]
        for d, name in enumerate(heads):
            out[f'val_tag_acc_{name}'] = s[12 + 2 * d] / s[1]
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


def nll_rule(streams, shift, predict, shuffle, classes='data'):
    """How val_nll, the NLL per token of the val text under the model as a generative model of text
    alone (or an upper bound of it), is computed, or None where the model reads tags that depend on
    tokens it has not seen: 'val_loss' (baseline; LIME on causal streams, or on token classes:
    meta_classes), 'marginal' (meta_predict on those: the next tags summed out, GPT.marginal),
    'val_loss_bound' (meta_predict on full streams: the joint bound, which pays for every tag it
    reads; their marginal would read the future), None (full streams, LIME+1 fed the data's next
    tags, shuffled tags)."""
    if shuffle:
        return None
    if not streams:
        return 'val_loss'
    past_only = classes != 'data' or all(is_causal(s) for s in streams)
    if predict:
        return 'marginal' if past_only else 'val_loss_bound'
    return 'val_loss' if shift == 0 and past_only else None


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


def check_resume_data(ckpt, info, streams, ckpt_path, meta_path, fingerprint, allow_change):
    """A checkpoint only makes sense on data with the same tokenizer and tag vocabularies; on other data
    of that kind (re-prepared: other documents, seed or split) only when told so (allow_change, logged)."""
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
    old_fp = ckpt.get('data_fingerprint')  # absent in checkpoints from before it was recorded
    if isinstance(old_fp, str) and old_fp != fingerprint:
        what = (f"{ckpt_path}: saved on another version of {os.path.dirname(meta_path)} (its meta.json or file "
                f"sizes differ: re-prepared?)")
        if not allow_change:
            fail(f"{what}; point --data_dir at the run's data, or resume on this data with --allow_data_change=True")
        print(f"note: {what}; resuming on this data as asked (--allow_data_change=True)")


# -----------------------------------------------------------------------------
# checkpoints and the out_dir

def snapshot(src, dst):
    """dst becomes a copy of src, atomically: a hard link (no extra disk; ckpt.pt is later replaced by
    a rename, so the link keeps this version), or a plain copy where links are not possible."""
    # write_atomic's naming: a killed run's leftover is found and removed like its other temporary files
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.hardlink.tmp")
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


def new_paths(out_dir):
    """What lock_out_dir is about to create, deepest first: train.lock and the directories out_dir and
    above that do not exist yet."""
    made, d = [], os.path.abspath(out_dir)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    lock = os.path.join(os.path.abspath(out_dir), 'train.lock')
    return ([] if os.path.exists(lock) else [lock]) + made


def remove_if_unused(made, out_dir):
    """A run that wrote nothing (it failed before training started) leaves no debris: removes what
    new_paths listed as created by it, and only while out_dir holds nothing else."""
    lock = os.path.join(os.path.abspath(out_dir), 'train.lock')
    try:
        if lock in made and os.listdir(out_dir) == ['train.lock']:
            os.remove(lock)
            for d in made[1:]:  # deepest first; each was empty but for what we made
                os.rmdir(d)
    except OSError:  # someone else wrote there meanwhile: theirs stays
        pass


def prepare_out_dir(C, ckpt_path, log_path, iter_num):
    """Before the first write: remove temporary files that a killed run left (the lock says no live run
    owns them), then start the log afresh (scratch; an --overwrite'n run's checkpoint goes too, so
    the directory never mixes two runs) or trim it to the checkpoint (resume)."""
    remove_temps(C.out_dir, only_dead=False)  # of ckpt.pt, log.jsonl and the snapshots
    if C.init_from == 'scratch':
        for p in [ckpt_path, os.path.join(C.out_dir, 'ckpt_best.pt')] + snapshots(C.out_dir):
            if os.path.exists(p):
                os.remove(p)
        write_atomic(log_path, b'')
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
        fail("wandb_log=True needs the wandb package: pip install wandb")
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
                 meta_classes=ckpt['config'].get('meta_classes', 'data'),
                 **{k: a.get(k, DEFAULTS[k]) for k in ('meta_predict', 'meta_inject_layer', 'meta_loss_weight')})
    given = dict(cfg, metadata=[s.strip() for s in cfg['metadata'].split(',') if s.strip()])
    # 0 means the default the model resolves (as GPTConfig does): the same architecture, not a conflict
    for d in (fixed, given):
        d['n_kv_head'], d['mlp_hidden'] = d['n_kv_head'] or d['n_head'], d['mlp_hidden'] or 4 * d['n_embd']
    w = cfg['meta_weight']
    given['meta_weight'] = [float(x) for x in w] if isinstance(w, list) else [float(w)] * len(given['metadata'])
    return [f"--{k}={cfg[k]!r} (checkpoint: {fixed[k]!r})" for k in fixed if k in explicit and given[k] != fixed[k]]

# -----------------------------------------------------------------------------

def check_memory(C, model_config, rows, procs):
    """Refuse a run that cannot fit, before it allocates: a rough, low estimate of its bytes against this
    machine's memory (the GPU's, on CUDA; the host's shared by procs processes). Device: the parameters,
    16 bytes each to train (float32 weights and gradients, AdamW's two moments; 4 for eval_only), the
    activations kept for the backward pass, ~34 bytes per row, position, channel and layer (Korthikanti
    et al. 2022, 16-bit, fused attention), and the logits, 8 bytes per row, position and vocabulary entry.
    Host: the iteration's rows of ids (int64) and the validation offsets (~56 bytes each: numpy, a list)."""
    with redirect_stdout(io.StringIO()), torch.device('meta'):  # sizes without memory
        n_params = GPT(model_config).get_num_params()
    cfg, B, T = model_config, C.batch_size, C.block_size
    per_param = 4 if C.eval_only else 16
    acts = B * T * ((0 if C.eval_only else 34 * cfg.n_embd * cfg.n_layer) + 8 * cfg.vocab_size)
    host = rows * T * 8 * (2 + 2 * len(cfg.meta_streams)) + C.eval_iters * B * 56
    gib = lambda b: f"{b / 2**30:,.1f} GiB"
    parts = [f"{n_params:,} parameters x {per_param} B = {gib(n_params * per_param)}",
             f"activations of batch_size={B} x block_size={T}: {gib(acts)}",
             f"batch ids and eval_iters x batch_size = {C.eval_iters * B:,} validation windows: {gib(host)}"]
    try:
        have_host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // procs
    except (AttributeError, ValueError, OSError):  # no sysconf here: the host is not checked
        have_host = None
    if C.device.startswith('cuda'):
        checks = [(n_params * per_param + acts, torch.cuda.get_device_properties(torch.device(C.device)).total_memory,
                   C.device, parts[:2]), (host, have_host, 'the host', parts[2:])]
    else:
        checks = [(n_params * per_param + acts + host, have_host, 'this machine', parts)]
    for need, have, where, what in checks:
        if have is not None and need > have:
            shared = f" ({procs} processes share it)" if procs > 1 and where != C.device else ""
            fail(f"this run needs at least {gib(need)} on {where} ({'; '.join(what)}) but it has "
                 f"{gib(have)}{shared}; use a smaller model, batch_size or eval_iters")


STOP_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')  # preemption (Slurm, most clusters), Ctrl-C, Slurm's --signal
STOP_EXIT = 3  # the exit status of a run stopped by one of them after saving its checkpoint: resume it


def catch_stop_signals(stop):
    """SIGTERM, SIGINT and SIGUSR1 only set stop[0] to the signal's name: the training loop saves a
    checkpoint at the next step boundary and exits STOP_EXIT. A second Ctrl-C stops at once, unsaved.
    Returns the previous handlers, to restore; none outside the main thread (python allows none there)."""
    def handler(signum, frame):
        if stop[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop[0] = stop[0] or signal.Signals(signum).name
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (getattr(signal, n) for n in STOP_SIGNALS)}


def any_rank(flag, ddp, device):
    """flag here or, under DDP, on any rank: every rank takes the same branch, since a rank that left
    the loop alone would leave the others waiting in their next all-reduce. One tiny all-reduce."""
    if not ddp:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def main(argv):
    cfg, explicit = configure(argv, DEFAULTS)
    check_config(cfg)
    lock, made = None, []
    if int(os.environ.get('RANK', 0)) == 0 and not cfg['eval_only']:
        made = new_paths(cfg['out_dir'])
        lock = lock_out_dir(cfg['out_dir'])  # before reading or writing anything in it
    stop = [None]
    handlers = catch_stop_signals(stop) if not cfg['eval_only'] else {}
    try:
        run(cfg, explicit, stop)
    except KeyboardInterrupt:  # a second Ctrl-C, or a signal before training set up its handlers
        print("interrupted: stopped without saving a checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if lock is not None:
            unlock_out_dir(lock)
            remove_if_unused(made, cfg['out_dir'])


def run(cfg, explicit, stop=None):
    """Train (or evaluate) with config cfg. stop: a one-item list a signal handler sets to the signal's
    name (catch_stop_signals): the run then saves a checkpoint at the next step boundary and exits STOP_EXIT.
    The steps, top to bottom: the config (a resume continues the checkpoint's), the processes and device,
    the data, the model and optimizer, then the loop: evaluate when due, one optimizer step, repeat."""
    cfg, ckpt = resolve_config(cfg, explicit)
    C = SimpleNamespace(**cfg)
    S = setup(C)
    D = open_data(C, cfg, S, ckpt)
    R = build_model(C, S, D, ckpt)
    ckpt = None  # free memory
    if S.master and not C.eval_only:
        prepare_out_dir(C, S.ckpt_path, S.log_path, R.iter_num)
    R.wb = start_wandb(C, cfg) if S.master and C.wandb_log and not C.eval_only else None
    stopped = train_loop(C, cfg, S, D, R, stop)
    if R.wb is not None:
        R.wb.finish()
    if S.ddp:
        # wait for rank 0 to finish its checkpoint: a rank that tears gloo down while its peer is
        # still busy can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        del R.model
        torch.distributed.destroy_process_group()
    if stopped:
        if S.master:
            print(f"stopped by {stopped} at iter {R.iter_num}: checkpoint saved to {S.ckpt_path}; continue with "
                  "--init_from=resume", file=sys.stderr, flush=True)
        raise SystemExit(STOP_EXIT)


def resolve_config(cfg, explicit):
    """The run's config and the checkpoint it starts from (None from scratch): a resume continues the
    checkpoint's run, a branch starts a new run in out_dir from a checkpoint file (branch_from); both
    take the checkpoint's config with only the keys set now on top. A new run (scratch or branch)
    refuses to replace a run unasked."""
    C = SimpleNamespace(**cfg)
    master_env = int(os.environ.get('RANK', 0)) == 0
    ckpt_path = os.path.join(C.out_dir, 'ckpt.pt')
    if C.init_from != 'resume':
        if master_env and not C.eval_only and not C.overwrite and existing_run(C.out_dir):
            found = existing_run(C.out_dir)
            # only a checkpoint can be resumed: a log alone is a run stopped before its first save
            resume = ("continue it with --init_from=resume, " if 'ckpt.pt' in found
                      else "it has no checkpoint to resume; ")
            fail(f"{C.out_dir}: already holds a run ({', '.join(found)}); {resume}replace it with --overwrite=True, "
                 "or choose another --out_dir")
        if not C.branch_from:
            return cfg, None
        if os.path.realpath(os.path.dirname(os.path.abspath(C.branch_from))) == os.path.realpath(C.out_dir):
            # the new run's start would replace the run it branches from (its checkpoint and snapshots)
            fail(f"{C.branch_from}: a branch starts a new run: give it another --out_dir than the checkpoint's")
        ckpt_path = C.branch_from
    elif not os.path.isfile(ckpt_path):
        found = existing_run(C.out_dir)
        fail(f"{ckpt_path}: not found, cannot resume; " + (
             f"{C.out_dir} holds a run that stopped before its first checkpoint ({', '.join(found)}): "
             "start it again with --init_from=scratch --overwrite=True" if found else
             "no run to continue there: train from scratch (--init_from=scratch)"))
    ckpt = load_checkpoint(ckpt_path, resume=True)
    conflicts = resume_conflicts(ckpt, cfg, explicit)
    if conflicts:
        fail(f"{ckpt_path}: a {'branch' if C.branch_from else 'resume'} keeps the checkpoint's architecture and "
             f"metadata, but {', '.join(conflicts)}; drop these flags, or train from scratch in another out_dir")
    # continue the checkpoint's run: its config, with only the keys set now on top (a branch: its own
    # out_dir, branch_from and overwrite, whether given or not)
    old = {k: coerce(k, v, ckpt_path, DEFAULTS) for k, v in ckpt['config'].items() if k in DEFAULTS}
    now = set(explicit) | ({'out_dir', 'branch_from', 'overwrite', 'init_from'} if C.branch_from else set())
    cfg = {**DEFAULTS, **old, **{k: cfg[k] for k in now}}
    cfg['allow_data_change'] = cfg['allow_data_change'] and 'allow_data_change' in explicit  # this resume only
    if C.init_from == 'resume':
        cfg['branch_from'] = ''  # a resumed branch continues from its own ckpt.pt
    for k in MODEL_KEYS + ('meta_shift',):  # the architecture is the checkpoint's (older ones: gpt2)
        cfg[k] = coerce(k, ckpt['model_args'].get(k, DEFAULTS[k]), ckpt_path, DEFAULTS)
    cfg['metadata'] = ','.join(ckpt['model_args']['meta_streams'])
    for k in ('meta_predict', 'meta_inject_layer', 'meta_loss_weight'):  # absent in older checkpoints
        cfg[k] = ckpt['model_args'].get(k, DEFAULTS[k])
    check_config(cfg)  # the merged config, e.g. the checkpoint's device on this machine
    if C.branch_from and cfg['max_iters'] <= ckpt['iter_num']:
        fail(f"{ckpt_path}: saved at iter {ckpt['iter_num']}; a branch from it needs --max_iters above that "
             f"(got {cfg['max_iters']})")
    return cfg, ckpt


def setup(C):
    """The processes (DDP or one), the seed, the device and its autocast, and the run's paths."""
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
        fail(f"gradient_accumulation_steps={C.gradient_accumulation_steps} "
             f"is not divisible by {world} processes")
    global_rows = C.batch_size * C.gradient_accumulation_steps
    tokens_per_iter = global_rows * C.block_size
    log = print if master else (lambda *a, **k: None)
    log(f"tokens per iteration: {tokens_per_iter:,} ({global_rows} rows x {C.block_size}, {world} process(es))")

    torch.manual_seed(C.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    C.dtype = resolve_dtype(C.dtype, C.device)  # the saved config keeps what was asked for ('auto')
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world=world, master=master,
                           accum=C.gradient_accumulation_steps // world,  # micro-steps on this rank
                           global_rows=global_rows, tokens_per_iter=tokens_per_iter, log=log,
                           device_type='cuda' if 'cuda' in C.device else 'cpu', ctx=autocast(C.device, C.dtype),
                           ckpt_path=os.path.join(C.out_dir, 'ckpt.pt'), log_path=os.path.join(C.out_dir, 'log.jsonl'),
                           src_path=C.branch_from or os.path.join(C.out_dir, 'ckpt.pt'))  # what a resume/branch loads


def open_data(C, cfg, S, ckpt):
    """The dataset, checked (against the checkpoint too), the model config it sizes (checked against
    this machine's memory), the two splits, the fixed validation windows and what evaluation reads."""
    streams = [s.strip() for s in C.metadata.split(',') if s.strip()]
    ensure_data(C.data_dir)
    info = load_meta(C.data_dir, streams)
    fingerprint = data_fingerprint(C.data_dir, streams)
    if ckpt is not None:
        check_resume_data(ckpt, info, streams, S.src_path, os.path.join(C.data_dir, 'meta.json'), fingerprint,
                          C.allow_data_change)
    model_args = dict(arch=C.arch, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head, n_embd=C.n_embd,
                      mlp_hidden=C.mlp_hidden, block_size=C.block_size,
                      bias=C.bias, dropout=C.dropout, vocab_size=info['vocab_size'],
                      meta_streams=tuple(streams),
                      meta_n_tags=tuple(len(info['streams'][s]['tags']) for s in streams),
                      meta_weight=C.meta_weight, meta_shift=C.meta_shift, meta_predict=C.meta_predict,
                      meta_inject_layer=C.meta_inject_layer if C.meta_predict else 0,
                      meta_loss_weight=C.meta_loss_weight)
    try:
        model_config = GPTConfig(**model_args)
    except ValueError as e:  # e.g. n_head not a multiple of n_kv_head
        fail(str(e))
    if C.meta_predict:  # the run's config records the block GPTConfig resolved (0: the middle one)
        C.meta_inject_layer = cfg['meta_inject_layer'] = model_config.meta_inject_layer
    check_memory(C, model_config, C.batch_size * S.accum, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    word_ids = None
    word_tags = info.get('streams', {}).get('word', {}).get('tags')
    if word_tags and 'B' in word_tags and 'I' in word_tags:
        word_ids = (word_tags.index('B'), word_tags.index('I'))
    shuffle_seed = C.seed if C.meta_shuffle else None
    train_split = Split(C.data_dir, 'train', streams, C.meta_shift, shuffle_seed,
                        limits=id_limits(C.data_dir, 'train', info, streams))
    classes = None
    if C.meta_classes != 'data':  # the control arms: the streams become functions of the token
        classes = token_classes(train_split, streams, model_config.meta_n_tags, info['vocab_size'],
                                C.meta_classes, C.seed)
        train_split.classes = classes
    val_split = Split(C.data_dir, 'val', streams, C.meta_shift, shuffle_seed, word_tags=word_ids,
                      limits=id_limits(C.data_dir, 'val', info, streams), classes=classes)
    for sp in (train_split, val_split):
        if sp.n < C.block_size + 2:
            fail(f"{sp.tok_path}: {sp.n} tokens, too few for block_size {C.block_size}")
    # the fixed validation windows, shared out between the val documents (common.eval_starts)
    ends = val_split.doc_ends(info.get('eot_token'))
    starts = eval_starts(val_split.n, C.block_size, C.eval_iters * C.batch_size, ends)
    docs = window_docs(starts, ends)
    return SimpleNamespace(
        streams=streams, info=info, fingerprint=fingerprint, model_config=model_config, word_ids=word_ids,
        train=train_split, val=val_split, classes=classes,
        val_windows=starts[S.rank::S.world], val_docs=docs[S.rank::S.world], n_docs=max(docs) + 1,
        nll_key=nll_rule(streams, C.meta_shift, C.meta_predict, C.meta_shuffle, C.meta_classes),
        first_tags=(first_tag_costs(train_split, streams, [len(info['streams'][s]['tags']) for s in streams])
                    if C.meta_predict else None),
        token_bytes=token_byte_lengths(info))


def build_model(C, S, D, ckpt):
    """The model (the checkpoint's weights on resume), its optimizer (and RNG state) and the
    metadata cooldown's start, compiled and DDP-wrapped as asked: the training state, R."""
    model = GPT(D.model_config)
    model_args = dict(vars(model.config))  # normalised (meta_weight as one float per stream)
    iter_num, best_val_loss = 0, 1e9
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{S.src_path}: weights do not fit the checkpoint's model_args ({first_line(e)})")
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    model.to(C.device)
    raw_model = model
    # metadata cooldown: the iterations from cool_start on train without tags, and the evaluations after
    # it (of a model trained without them since) run without tags too; meta_cooled is saved in model_args
    cool_start = cooldown_start(C.max_iters, C.meta_cooldown) if C.meta_cooldown and D.streams else None
    raw_model.config.meta_cooled = model_args['meta_cooled'] = cool_start is not None and iter_num > cool_start
    scaler = torch.amp.GradScaler(S.device_type, enabled=(C.dtype == 'float16' and S.device_type == 'cuda'))
    optimizer = model.configure_optimizers(C.weight_decay, C.learning_rate, (C.beta1, C.beta2), S.device_type)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
            torch.set_rng_state(ckpt['rng']['torch'])
            if S.device_type == 'cuda' and ckpt['rng'].get('cuda') is not None:
                torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            fail(f"{S.src_path}: bad optimizer or RNG state ({first_line(e)})")
    if C.compile:
        S.log("compiling the model...")
        model = torch.compile(model)
    if S.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # in the cooldown the metadata tables get no gradient: DDP must be told that parameters may go unused
        model = DDP(model, device_ids=[S.local_rank] if S.device_type == 'cuda' else None,
                    find_unused_parameters=cool_start is not None)
    return SimpleNamespace(model=model, raw_model=raw_model, model_args=model_args, optimizer=optimizer,
                           scaler=scaler, iter_num=iter_num, best_val_loss=best_val_loss, cool_start=cool_start)


def train_loop(C, cfg, S, D, R, stop):
    """nanoGPT's loop: at each iteration set the lr, evaluate when due, stop when done or signalled,
    else take one optimizer step. Returns what stopped it early (a signal's name), else None."""
    R.start_iter, R.t_start = R.iter_num, time.time()
    R.t_interval, R.it_interval = time.time(), R.iter_num
    R.loss_sum, R.loss_count = torch.zeros((), device=C.device), 0
    while True:
        lr = get_lr(R.iter_num, C)
        for group in R.optimizer.param_groups:
            group['lr'] = lr

        # evaluate, log and checkpoint; a resumed run already did this at its start iteration
        due = R.iter_num % C.eval_interval == 0 or R.iter_num == C.max_iters
        if (due and (R.iter_num != R.start_iter or C.init_from == 'scratch')) or C.eval_only:
            eval_step(C, cfg, S, D, R, lr)
            if C.eval_only:
                return None
        if R.iter_num >= C.max_iters:
            return None
        # a stop signal (preemption, Ctrl-C): save at this step boundary, exit after the loop. Under DDP
        # the ranks agree at each log interval (one tiny all-reduce where the loss is read anyway, not a
        # GPU sync every step), so all stop at the same step (a rank stopping alone would hang the others)
        asks = not S.ddp or R.iter_num % C.log_interval == 0
        if stop is not None and asks and any_rank(stop[0], S.ddp, C.device):
            if S.master:
                save_state(cfg, S, D, R)  # whatever always_save_checkpoint says: this is the run's progress
            return stop[0] or 'a signal to another rank'

        train_step(C, S, D, R, lr)
        R.iter_num += 1


def eval_step(C, cfg, S, D, R, lr):
    """Evaluate on the fixed validation windows, log a row (log.jsonl, wandb, stdout) with the train
    loss and speed since the last one, and save the checkpoint (and the snapshots asked for)."""
    if any_rank(data_fingerprint(C.data_dir, D.streams) != D.fingerprint, S.ddp, C.device):
        fail(f"{C.data_dir}: the dataset changed during the run (meta.json or file sizes: re-prepared?); "
             f"stopped at iter {R.iter_num} without saving: resume from {S.ckpt_path} on the run's data, or "
             "on this data with --allow_data_change=True")
    if S.device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.time() - R.t_interval
    n_it = R.iter_num - R.it_interval
    if S.ddp:
        torch.distributed.all_reduce(R.loss_sum)
        R.loss_sum /= S.world
    train_loss = R.loss_sum.item() / R.loss_count if R.loss_count else None
    tps = n_it * S.tokens_per_iter / dt if n_it else None
    mfu = R.raw_model.estimate_mfu(C.batch_size * S.accum, dt / n_it, C.peak_flops) if n_it else None
    # ranks may hold different numbers of windows, so evaluate outside DDP's forward and all-reduce sums
    # the marginal (meta_predict, causal streams): exact at the last evaluation, else the top-k bound
    k = 0 if R.iter_num >= C.max_iters or C.eval_only else C.marginal_k
    t_eval = time.time()
    res = evaluate(R.model.module if S.ddp else R.model, D.val, D.val_windows, C.block_size, C.batch_size,
                   S.ctx, C.device, D.word_ids, S.ddp, D.first_tags, D.token_bytes,
                   no_tags=R.raw_model.config.meta_cooled, nll_rule=D.nll_key, marginal_k=k,
                   docs=D.val_docs, n_docs=D.n_docs)
    res['val_eval_s'] = time.time() - t_eval
    # evaluated without tags (cooldown): a plain language model's NLL, whatever tags it trained on
    res['val_no_tags'] = R.raw_model.config.meta_cooled
    nll_sum = res.pop('val_nll_sum')
    docs = {key: res.pop(key) for key in ('doc_nll', 'doc_loss', 'doc_tokens')}
    if res['val_no_tags']:
        res['val_nll'], res['val_nll_kind'] = res['val_loss'], 'exact'
    elif D.nll_key is None:
        res['val_nll'], res['val_nll_kind'] = None, None
        docs['doc_nll'] = None
    else:
        res['val_nll'] = nll_sum
        res['val_nll_kind'] = ('joint bound' if D.nll_key == 'val_loss_bound' else
                               f'top-{k} bound' if D.nll_key == 'marginal' and 0 < k < math.prod(D.model_config.meta_n_tags)
                               and any(D.model_config.meta_weight) else 'exact')
    res['val_bpb'] = bits_per_byte(res['val_nll'], res['val_bytes_per_token'])
    row = dict(iter=R.iter_num, tokens=R.iter_num * S.tokens_per_iter, lr=lr, train_loss=train_loss, **res,
               tokens_per_sec=tps, mfu=mfu, elapsed_s=time.time() - R.t_start)
    fmt = lambda v: 'n/a' if v is None else f"{v:.4f}"
    S.log(f"step {R.iter_num}: train loss {fmt(train_loss)}, val loss {res['val_loss']:.4f}, "
          f"val_nll {fmt(res['val_nll'])}{' (' + res['val_nll_kind'] + ')' if res['val_nll_kind'] else ''} "
          f"(bpb {fmt(res['val_bpb'])})"
          + (f" (bound: tag loss {res['val_tag_loss']:.4f})" if C.meta_predict else "")
          + (" (no tags: cooldown)" if res['val_no_tags'] else "")
          + f", ppl {res['val_ppl']:.2f}, acc {res['val_acc']:.4f} (word start {fmt(res['val_acc_word_start'])}, "
          f"cont {fmt(res['val_acc_word_cont'])})" + (f", {tps:,.0f} tok/s" if tps else ""))
    if C.eval_only:
        S.log(json.dumps(row))
        return
    if S.master:
        append_log(S.log_path, row)
        # the last evaluation's numbers per val document: what comparisons resample (experiments.py)
        write_json(os.path.join(C.out_dir, 'val_docs.json'),
                   dict(iter=R.iter_num, tokens=row['tokens'], val_nll_kind=res['val_nll_kind'],
                        windows=C.eval_iters * C.batch_size, **docs))
        if R.wb is not None:
            R.wb.log({k: v for k, v in row.items() if v is not None}, step=R.iter_num)
    # the loss the run minimises: meta_predict models also pay for their tags
    score = res['val_loss_bound'] if C.meta_predict else res['val_loss']
    improved = score < R.best_val_loss
    R.best_val_loss = min(R.best_val_loss, score)
    if S.master and R.iter_num > 0 and (improved or C.always_save_checkpoint):
        save_state(cfg, S, D, R)
        if C.keep_checkpoints:
            snapshot(S.ckpt_path, os.path.join(C.out_dir, f'ckpt_{R.iter_num:06d}.pt'))
            for old in snapshots(C.out_dir)[:-C.keep_checkpoints]:
                os.remove(old)
        if C.keep_checkpoints and improved and C.always_save_checkpoint:
            snapshot(S.ckpt_path, os.path.join(C.out_dir, 'ckpt_best.pt'))  # ckpt.pt is the latest
    R.loss_sum, R.loss_count = torch.zeros((), device=C.device), 0
    R.t_interval, R.it_interval = time.time(), R.iter_num


def save_state(cfg, S, D, R):
    """The checkpoint of the state after R.iter_num iterations; atomic: never a truncated ckpt.pt."""
    ck = dict(model=R.raw_model.state_dict(), optimizer=R.optimizer.state_dict(), model_args=R.model_args,
              iter_num=R.iter_num, best_val_loss=R.best_val_loss, config=cfg, dataset=D.info,
              data_fingerprint=D.fingerprint,
              classes=({s: torch.from_numpy(v.astype(np.int16)) for s, v in D.classes.items()} if D.classes else None),
              rng=dict(torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state_all() if S.device_type == 'cuda' else None))
    save_checkpoint(S.ckpt_path, ck)


def to_device(t, device):
    """A batch tensor on the device: through pinned memory, asynchronously, on CUDA."""
    if 'cuda' in device:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def train_step(C, S, D, R, lr):
    """One optimizer step on the global batch of iteration R.iter_num; this rank takes its slice."""
    t0 = time.time()
    torch.manual_seed(mix_seed(C.seed, R.iter_num, S.rank, 1))  # model dropout: a function of (seed, iter, rank)
    # the batch: the global one's rows of this rank, tags dropped to <unk> as drawn, on the device
    rows = C.batch_size * S.accum
    starts, masks = sample_batch(D.train, C.seed, R.iter_num, S.global_rows, C.block_size, D.streams, C.meta_dropout)
    lo = S.rank * rows
    mine = starts[lo:lo + rows]
    x_all, y_all, meta_all = D.train.windows(mine, C.block_size)
    meta_all = apply_meta_dropout(meta_all, {s: m[lo:lo + rows] for s, m in masks.items()})
    x_all, y_all = to_device(x_all, C.device), to_device(y_all, C.device)
    meta_all = {k: to_device(v, C.device) for k, v in meta_all.items()}
    # meta_predict: the next token's tags, teacher-forced (never dropped: they are also the tag targets)
    next_all = ({k: to_device(v, C.device) for k, v in D.train.next_tags(mine, C.block_size).items()}
                if C.meta_predict else None)
    # metadata cooldown: no tags from cool_start on (not even <unk>)
    if R.cool_start is not None and R.iter_num >= R.cool_start:
        R.raw_model.config.meta_cooled = R.model_args['meta_cooled'] = True
    # forward and backward, micro-step by micro-step (gradient accumulation)
    it_loss = torch.zeros((), device=C.device)
    for micro in range(S.accum):
        sl = slice(micro * C.batch_size, (micro + 1) * C.batch_size)
        if S.ddp:
            # all-reduce gradients only on the last micro-step
            R.model.require_backward_grad_sync = (micro == S.accum - 1)
        with S.ctx:
            nm = {k: v[sl] for k, v in next_all.items()} if next_all is not None else None
            meta = None if R.raw_model.config.meta_cooled else {k: v[sl] for k, v in meta_all.items()}
            _, loss = R.model(x_all[sl], meta, targets=y_all[sl], next_meta=nm)
            loss = loss / S.accum
        it_loss += loss.detach()
        R.scaler.scale(loss).backward()
    # clip, step, and zero the gradients
    if C.grad_clip != 0.0:
        R.scaler.unscale_(R.optimizer)
        torch.nn.utils.clip_grad_norm_(R.model.parameters(), C.grad_clip)
    R.scaler.step(R.optimizer)
    R.scaler.update()
    R.optimizer.zero_grad(set_to_none=True)
    # log: the loss is summed on the device, read at the evaluation; read here only every log_interval
    R.loss_sum += it_loss
    R.loss_count += 1
    if R.iter_num % C.log_interval == 0 and S.master:
        lossf = it_loss.item()  # syncs with the device
        S.log(f"iter {R.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {(time.time() - t0) * 1000:.1f}ms")


if __name__ == '__main__':
    sys.exit(run_main('train.py', main, sys.argv[1:]))
