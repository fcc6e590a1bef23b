"""
Downstream evaluation: this project's checkpoints as an EleutherAI lm-evaluation-harness model,
and the offline tasks (LAMBADA-style cloze, arithmetic) built from data that needs no download.

$ python harness.py --build_tasks=True --task_dir=tasks/lime            # write the offline tasks
$ python harness.py --out_dir=out-cpu-demo-lime --tasks=lime_cloze,lime_arithmetic
$ python harness.py --out_dir=DIR --tasks=lime_cloze --tag_policy=causal,oracle,unk
$ python harness.py --out_dir=DIR --tasks=lambada_openai,hellaswag      # standard tasks (internet)

From python: lm_eval.simple_evaluate(model=harness.make_lm(out_dir=DIR, tag_policy='causal'), ...).

Tag policies: what the model is fed at every position, printed with every result:
  causal   every position gets the causal tags of the text so far (tags of token t from tokens <= t).
           The default for baseline, LIME and LIME+1. LIME+1 (position t reads token t+1's tags): a
           position whose next token is in the context gets that token's causal tags, a scored
           position (its next token is the continuation's) gets <unk>; generation takes the task's
           hints (gen_kwargs 'hints', sample.py's syntax), <unk> elsewhere.
  predict  meta_predict models (their default): own tags causal; a log-likelihood is the model's
           marginal, log p(token | past) with the token's next tags summed out,
           log sum_g p(g | past) p(token | past, g) over every combination g of every stream's tags
           (model.marginal; the past's next tags are the text's causal tags): the exact likelihood of
           the text, comparable with the baseline's. marginal_k=k > 0 sums over the heads' top k
           combinations and the text's own only: cheaper, and minus it an upper bound on the NLL
           (printed 'top-k bound'). A model trained on full tags (a stream not *_causal) gets the
           joint bound instead, the heads' log-probability of the text's causal next tags plus the
           token log-probability given them (printed 'joint bound'). Printed beside every result:
           'exact marginal', 'top-k bound' or 'joint bound'. is_greedy and generation follow the
           heads' own tags (argmax when greedy), hints override them.
  oracle   LIME+1 / meta_predict read the continuation's own next-token tags (the tag kind the
           model was trained on, over context and continuation): reads the future, marked ORACLE
           in every output, never the default; log-likelihoods only (generation has no reference).
  unk      every tag <unk> (LIME+1 and meta_predict: next-token tags too).
Full tags computed over context and continuation together would leak the continuation: refused.
Every module-level name below is a config key (--key=value, or a config file), as in train.py.
Imports: common.py (config, checkpoint loading, autocast, atomic writes), model.py, metadata.py, and
sample.py, which is harness's engine of generation (sample.generate, parse_hints, Text): the one
script that another script imports.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import common
import sample  # the engine of generation (sample.generate, parse_hints, Text): harness runs it, not a copy
from common import fail
from metadata import PAD, UNK, base_stream, is_causal

# -----------------------------------------------------------------------------
out_dir = 'out'  # a train.py run directory (its ckpt.pt), or a checkpoint file (e.g. out/ckpt_000500.pt)
tasks = 'lime_cloze,lime_arithmetic,lime_arithmetic_ll'  # comma-separated lm-eval task names
task_dir = 'tasks/lime'  # the offline tasks (built here on first use when a lime_* task is asked for)
tag_policy = ''  # '' = the model's default (causal; predict for meta_predict); comma-separated list; 'all'
limit = 0  # examples per task; 0 = all
num_fewshot = -1  # -1 = the task's default
batch_size = 16  # rows per forward pass (log-likelihoods)
# predict policy (meta_predict models on causal tags): 0 = the exact marginal (next tags summed out over
# every tag combination); k > 0 = the top-k bound (over the heads' k likeliest combinations and the text's
# own: cheaper; minus it is an upper bound on the NLL)
marginal_k = 0
bootstrap_iters = 1000  # lm-eval's bootstrap for the stderr of non-mean metrics (perplexity)
device = 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
seed = 1337
out_json = ''  # '' = out_dir/harness.json; for a checkpoint file out_dir/x.pt: out_dir/x.harness.json
# BLiMP (--tasks=blimp): one task per paradigm file (<UID>.jsonl, the official format, any subset of pairs)
blimp_dir = 'auto'  # 'auto' = ../shared/blimp/data beside the repository when present, else lm-eval's own (hub)
blimp_task_dir = 'tasks/blimp'  # the task configs written for blimp_dir (rewritten on every run)
# task builder (--build_tasks=True)
build_tasks = False
cloze_n = 500  # cloze passages, shared evenly over the five corpora
cloze_min_words = 30  # words of a passage (whitespace-separated, target included)
cloze_max_words = 80
arith_n = 50  # test problems per kind (1-3 digits x plus/minus), at most half of a kind's problems
task_seed = 1234
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}

LM_EVAL_PIN = 'lm-eval==0.4.13'
POLICIES = {  # model kind -> its policies, the default first
    'baseline': ('causal',),
    'lime': ('causal', 'unk'),
    'lime1': ('causal', 'oracle', 'unk'),
    'predict': ('predict', 'oracle', 'unk'),
}
KIND_NAMES = {'baseline': 'baseline', 'lime': 'LIME', 'lime1': 'LIME+1', 'predict': 'LIME+1, self-predicted tags'}


def configure(argv):
    cfg = common.configure(argv, DEFAULTS)[0]
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Ranges of the options: one line naming the allowed range (a LimeError), before any work."""
    from common import check_device, check_range
    for k in ('limit', 'bootstrap_iters', 'seed', 'task_seed', 'marginal_k'):
        check_range(cfg, k, cfg[k] >= 0, 'an integer >= 0' + (' (0: all examples)' if k == 'limit' else
                                                             ' (0: no stderr)' if k == 'bootstrap_iters' else
                                                             ' (0: the exact marginal)' if k == 'marginal_k' else ''))
    check_range(cfg, 'num_fewshot', cfg['num_fewshot'] >= -1, "an integer >= 0, or -1 for the task's default")
    for k in ('batch_size', 'cloze_n', 'cloze_min_words', 'arith_n'):
        check_range(cfg, k, cfg[k] >= 1, 'an integer >= 1')
    check_range(cfg, 'cloze_max_words', cfg['cloze_max_words'] >= cfg['cloze_min_words'],
                f"an integer >= cloze_min_words={cfg['cloze_min_words']}")
    check_range(cfg, 'out_dir', cfg['out_dir'].strip() != '', 'a run directory or a checkpoint file')
    check_device(cfg['device'])


def results_path(cfg):
    """Where the results go: out_json, else harness.json in the run directory, else beside the
    checkpoint file (x.pt -> x.harness.json, so two snapshots of a run keep their own results)."""
    if cfg['out_json']:
        return cfg['out_json']
    d = cfg['out_dir']
    return os.path.splitext(d)[0] + '.harness.json' if os.path.isfile(d) else os.path.join(d, 'harness.json')


def check_writable(path):
    """The results file must be writable: refused before the evaluation, not after it."""
    if os.path.isdir(path):
        fail(f"{path}: cannot write the results (a directory)")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):  # write_json creates the missing directories
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        fail(f"{path}: cannot write the results ({d} is not a directory)")
    if not os.access(d, os.W_OK | os.X_OK):
        fail(f"{path}: cannot write the results ({d} is not writable)")


def require_lm_eval():
    """lm_eval, imported on first use (slow, optional): a one-line error naming the package."""
    if os.environ.get('LIME_NO_DOWNLOAD') == '1':  # offline: local json tasks must not reach for the hub
        os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # (read when datasets is first imported)
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        fail(f"lm-eval is not installed: pip install {LM_EVAL_PIN} "
             "(or pip install -r requirements-dev.txt)")
    return lm_eval


JOINT_BOUND = 'joint bound (full tags: the marginal would read the future)'


def likelihood_kind(policy, kind, streams, marginal_k=0):
    """What a log-likelihood under the predict policy is: 'exact marginal', 'top-k bound (k=K)' or the
    joint bound (a stream not causal); None for the other policies (the log-likelihood given the tags)."""
    if kind != 'predict' or policy != 'predict':
        return None
    if not all(is_causal(s) for s in streams):
        return JOINT_BOUND
    return 'exact marginal' if not marginal_k else f'top-k bound (k={marginal_k})'


def policy_label(policy, kind, ll_kind=None):
    if kind == 'baseline':
        return 'causal (baseline: no tags)'
    if policy == 'predict':  # ll_kind: likelihood_kind's
        if ll_kind == 'exact marginal':
            detail = 'next tags summed out, log sum_g p(g | past) p(token | past, g)'
        elif ll_kind and ll_kind.startswith('top-k'):
            detail = "next tags summed over the heads' top k combinations and the text's own: an upper bound on the NLL"
        else:
            ll_kind, detail = ll_kind or 'joint bound', 'tag log-prob + token log-prob: an upper bound on the NLL'
        return f"predict ({ll_kind}: {detail})"
    return {'causal': 'causal', 'unk': 'unk (every tag <unk>)',
            'oracle': "ORACLE (reads the continuation's own tags)"}[policy]


# -----------------------------------------------------------------------------
# the scorer: tags per policy, log-likelihoods, generation (no lm_eval needed)

_MEMO = {}
MEMO_MAX = 1 << 19  # entries; BLiMP has 67,000 sentences


def memo(key, fn):
    """fn() once per key in this process: the tokens and causal tags of a text depend only on it and
    the tokenizer (key holds both), and BLiMP scores the same sentences for every checkpoint of a run."""
    if key not in _MEMO:
        if len(_MEMO) >= MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = fn()
    return _MEMO[key]


class UnkTagger:
    """A tagger for sample.generate that gives every token <unk> (the unk policy)."""

    def __init__(self, keys):
        self.keys = list(keys)

    def extend(self, ids):
        return {k: np.full(len(ids), UNK, dtype=np.uint16) for k in self.keys}


class Scorer:
    """A checkpoint, its tokenizer and a tag policy: log-likelihoods of (context, continuation)
    token lists and greedy generation, with the tags the policy promises."""

    def __init__(self, out_dir, policy='', device='cpu', batch_size=16, dtype='float32', err=None, marginal_k=0):
        self.err = err or sys.stderr
        self.noted = set()
        self.model, ckpt = common.load_model(out_dir, device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            fail(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(marginal_k, bool) or not isinstance(marginal_k, (int, np.integer)) or marginal_k < 0:
            fail(f"marginal_k must be an integer >= 0 (0: the exact marginal), got {marginal_k!r}")
        self.marginal_k = int(marginal_k)
        self.out_dir, self.device, self.batch_size = out_dir, device, int(batch_size)
        cfg = self.model.config
        self.streams = cfg.input_streams
        self.bases = [base_stream(s) for s in self.streams]
        self.block_size = cfg.block_size
        self.kind = ('baseline' if not self.streams else 'predict' if cfg.meta_predict
                     else 'lime1' if cfg.meta_shift == 1 else 'lime')
        dataset = ckpt.get('dataset') or {}
        if (ckpt.get('config') or {}).get('meta_shuffle'):
            fail(f"{out_dir}: trained with meta_shuffle (a control): its tags mean nothing at evaluation")
        for s in self.streams:
            if base_stream(s) not in ('pos', 'ner'):
                fail(f"{out_dir}: stream '{s}' cannot be computed from text (only pos/ner, full or causal)")
        self.classes = self.class_tables(ckpt, out_dir)
        self.text = sample.Text(dataset)
        self.vocabs = {s: dataset.get('streams', {}).get(s, {}).get('tags') for s in self.streams}
        for s in self.streams:
            if self.vocabs[s] != self.text.md.stream_tags(base_stream(s), self.text.ner):
                fail(f"{out_dir}: stream '{s}': the checkpoint's tag vocabulary differs from metadata.py's")
        self.set_policy(policy)
        if dtype not in ('float32', 'bfloat16', 'float16'):
            fail(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.ctx = common.autocast(device, dtype)
        self.cache_dtype = common.torch_dtype(dtype) if device.startswith('cuda') else None
        self.greedy = True  # False: a meta_predict model's greedy flags are not computed (multiple-choice tasks read none)
        if self.policy == 'causal' and any(not is_causal(s) for s in self.streams):
            self.note(f"note: {out_dir} was trained on full tags ({', '.join(self.streams)}); the causal policy "
                      "feeds it causal tags (full tags of the text would read the continuation)")

    def class_tables(self, ckpt, out_dir):
        """A meta_classes control (train.py): {stream: (vocab,) tag ids}, each token's class, which the
        model read instead of tags; None for a model trained on tags. From the checkpoint, or for one
        written before train.py kept them, recomputed from its data_dir if that is the same data."""
        mode = (ckpt.get('config') or {}).get('meta_classes', 'data')
        if mode == 'data':
            return None
        if ckpt.get('classes') is not None:
            return {k: v.numpy().astype(np.int64) for k, v in ckpt['classes'].items()}
        cfg, streams = ckpt['config'], list(self.model.config.meta_streams)
        d = cfg.get('data_dir', '')
        if not (isinstance(d, str) and os.path.isfile(os.path.join(d, 'meta.json'))):
            fail(f"{out_dir}: a meta_classes='{mode}' control without its class table (older than train.py's "
                 f"storing it), and its data_dir {d!r} is not here to recompute it from")
        if ckpt.get('data_fingerprint') != common.data_fingerprint(d, streams):
            fail(f"{out_dir}: a meta_classes='{mode}' control without its class table, and its data_dir {d} "
                 "has changed since training: the classes cannot be recomputed")
        self.note(f"note: {out_dir}: meta_classes='{mode}': the class table recomputed from {d} (as training did)")
        split = common.Split(d, 'train', streams, 0)
        return common.token_classes(split, streams, self.model.config.meta_n_tags, ckpt['dataset']['vocab_size'],
                                    mode, cfg.get('seed', 1337))

    def note(self, msg):
        if msg not in self.noted:
            self.noted.add(msg)
            print(msg, file=self.err)

    def set_policy(self, policy):
        """Switch the tag policy ('' = the model's default); the model stays loaded."""
        self.policy = self.check_policy(policy)
        # k >= every combination: exact; tags that add nothing (meta_weight 0: the tag loss alone) leave the
        # token's probability the same under every next tag, so the marginal is the plain log-probability
        self.inert = self.kind == 'predict' and not any(self.model.config.meta_weight)
        k = self.marginal_k if self.marginal_k < math.prod(self.model.config.meta_n_tags) and not self.inert else 0
        self.ll_kind = likelihood_kind(self.policy, self.kind, self.streams, k)
        self.label = policy_label(self.policy, self.kind, self.ll_kind)
        self.oracle = self.policy == 'oracle'

    def check_policy(self, policy):
        allowed = POLICIES[self.kind]
        policy = policy or allowed[0]
        if policy == 'full':
            fail("tag policy 'full' is refused: full tags computed over context and continuation "
                 "read the continuation (use causal; oracle for LIME+1, which is marked)")
        if policy not in ('causal', 'predict', 'oracle', 'unk'):
            fail(f"unknown tag policy {policy!r} (causal, predict, oracle, unk)")
        if policy not in allowed:
            fail(f"tag policy '{policy}' does not apply to a {KIND_NAMES[self.kind]} model "
                 f"({self.out_dir}): use {' or '.join(allowed)}")
        return policy

    # --- tags ---

    def causal_tags(self, seq):
        """{base stream: causal tags of each token of seq} (tags of token t from tokens <= t); read-only.
        A meta_classes control: each token's class (a lookup, the tags it was trained on)."""
        if self.classes is not None:
            a = np.asarray(seq, dtype=np.int64)
            return {base_stream(s): v[a] for s, v in self.classes.items()}

        def tag():
            c = self.text.md.annotate_causal(np.asarray(seq, dtype=np.int64), self.text.ner)
            out = {b: c[b + '_causal'].astype(np.int64) for b in ('pos', 'ner')}
            for v in out.values():
                v.flags.writeable = False
            return out
        return memo(('causal', self.text.md.TOKENIZER, self.text.ner, tuple(seq)), tag)

    def full_tags(self, seq):
        f = self.text.md.annotate_ids(np.asarray(seq, dtype=np.int64), self.text.ner, 'full')
        return {b: f[b].astype(np.int64) for b in set(self.bases)}

    def policy_inputs(self, seq, n_ctx):
        """The tags fed at input positions 0..len(seq)-2 of a token sequence whose tokens from index
        n_ctx on are scored (the continuation): (meta {stream: ids}, next {stream: ids} for
        meta_predict models, else None). Position t predicts seq[t+1]."""
        P = len(seq) - 1
        if not self.streams:
            return {}, None
        if self.policy == 'unk':
            unk = {s: np.full(P, UNK, dtype=np.int64) for s in self.streams}
            return unk, (dict(unk) if self.kind == 'predict' else None)
        C = self.causal_tags(seq)
        if self.kind == 'lime':
            return {s: C[b][:P] for s, b in zip(self.streams, self.bases)}, None
        if self.kind == 'predict':  # own tags causal; next tags: the text's causal tags (paid for, or oracle)
            return ({s: C[b][:P] for s, b in zip(self.streams, self.bases)},
                    {s: C[b][1:] for s, b in zip(self.streams, self.bases)})
        meta = {}
        if self.policy == 'oracle':  # the tags the model was trained on, of the real next tokens
            full = self.full_tags(seq) if any(not is_causal(s) for s in self.streams) else None
            for s, b in zip(self.streams, self.bases):
                meta[s] = (C if is_causal(s) else full)[b][1:].copy()
        else:  # causal: next token's causal tags while it is in the context, <unk> where it is scored
            for s, b in zip(self.streams, self.bases):
                m = C[b][1:].copy()
                m[max(n_ctx - 1, 0):] = UNK
                meta[s] = m
        return meta, None

    # --- log-likelihoods ---

    def row(self, seq, meta, nxt, hi, n, skip=0):
        """A forward row ending at seq[hi-1]: the last block_size inputs before it, n scored targets
        (the first skip of them taken from another row)."""
        if n > self.block_size:
            fail(f"a continuation of {n} tokens is longer than block_size {self.block_size}")
        lo = max(0, hi - 1 - self.block_size)
        sl = slice(lo, hi - 1)
        return (list(seq[lo:hi]), {s: v[sl] for s, v in meta.items()},
                {s: v[sl] for s, v in nxt.items()} if nxt is not None else None, n, skip)

    def loglikelihood(self, pairs):
        """[(context ids, continuation ids)] -> [(log-likelihood of the continuation, is_greedy)].
        is_greedy: greedy generation (temperature 0; for meta_predict the heads' argmax tags, which
        become the token's own tags) would produce the continuation.
        A target's log-probability and greedy flag read only the tokens up to it and the context's
        length (every policy but oracle, which reads the continuation's tags, and in a row that is
        not cut to block_size), so requests with the same context length share the values of the
        targets in their common token prefix: computed once (BLiMP's two sentences of a pair share
        their first words; for a self-predicting model the marginal is most of the cost)."""
        seqs = [list(c) + list(k) for c, k in pairs]
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), seqs[i]))
        skip, prev = [0] * len(pairs), [None] * len(pairs)
        fits = lambda i: len(seqs[i]) <= self.block_size + 1
        if self.policy != 'oracle':
            for last, i in zip(order, order[1:]):  # sorted: the longest shared prefix is a neighbour's
                n_ctx = len(pairs[i][0])
                if len(pairs[last][0]) == n_ctx and fits(i) and fits(last):
                    a, b = seqs[last], seqs[i]
                    lcp = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
                    skip[i], prev[i] = max(0, lcp - n_ctx), last  # targets n_ctx..lcp-1 are shared
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            meta, nxt = self.policy_inputs(seqs[i], len(ctx))
            rows.append(self.row(seqs[i], meta, nxt, len(seqs[i]), len(cont), skip[i]))
        res = self.forward_rows(rows)
        for i in order:  # a request's shared targets from its neighbour, already complete
            if skip[i]:
                k = skip[i]
                res[i][0][:k], res[i][1][:k] = res[prev[i]][0][:k], res[prev[i]][1][:k]
        return [(float(lp.sum()), bool(g.all())) for lp, g in res]

    def rolling(self, tokens, windows):
        """The log-likelihood of a whole document tokens (prefix token first: tokens[0] is not
        scored), scored in windows [(start, end)] of target indices; tags from the whole document."""
        meta, nxt = self.policy_inputs(tokens, 1)
        rows = [self.row(tokens, meta, nxt, b, b - a) for a, b in windows]
        return float(sum(lp.sum() for lp, _ in self.forward_rows(rows)))

    @torch.no_grad()
    def forward_rows(self, rows):
        """rows: (tokens, meta, next, n, skip): inputs tokens[:-1] with their tags, targets tokens[1:],
        the last n scored, the first skip of those left out (NaN, greedy False). Batched, longest first,
        right-padded (causal attention: padding after a position changes nothing at it). Returns per
        row (log-probs (n,), greedy flags (n,)): a flag says the greedy choice at that position is its
        target. predict policy: the model's marginal (next tags summed out, exactly or over the top
        marginal_k), or for full-tag models the joint bound (the heads' log-probs of the text's next
        tags added); its greedy flags follow greedy generation's tags (greedy_path)."""
        model, dev = self.model, self.model.lm_head.weight.device
        out = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            T = max(len(rows[i][0]) - 1 for i in idx)
            x = torch.full((len(idx), T), self.text.eot, dtype=torch.long)
            y = torch.full((len(idx), T), -1, dtype=torch.long)
            scored = torch.zeros((len(idx), T), dtype=torch.bool)  # positions whose target is scored
            todo = torch.zeros((len(idx), T), dtype=torch.bool)  # ... and not taken from another row
            meta = {s: torch.full((len(idx), T), PAD, dtype=torch.long) for s in self.streams}
            nxt = {s: torch.full((len(idx), T), PAD, dtype=torch.long) for s in self.streams}
            for r, i in enumerate(idx):
                tok, m, nx, n, skip = rows[i]
                L = len(tok) - 1
                x[r, :L] = torch.tensor(tok[:-1])
                y[r, :L] = torch.tensor(tok[1:])
                scored[r, L - n:L] = True
                todo[r, L - n + skip:L] = True
                for s in self.streams:
                    meta[s][r, :L] = torch.from_numpy(np.array(m[s]))  # a copy: cached tags are read-only
                    if nx is not None:
                        nxt[s][r, :L] = torch.from_numpy(np.array(nx[s]))
            x, y, scored, todo = x.to(dev), y.to(dev), scored.to(dev), todo.to(dev)
            meta = {s: v.to(dev) for s, v in meta.items()}
            nxt = {s: v.to(dev) for s, v in nxt.items()}
            tag_lp = marg = None
            with self.ctx:
                if self.kind == 'predict':
                    logits, _, tag_logits, _ = model.forward_predict(x, meta, nxt, targets=y)
                    if self.ll_kind == JOINT_BOUND:
                        tag_lp = sum(F.log_softmax(tl.float(), -1).gather(-1, nxt[s].unsqueeze(-1)).squeeze(-1)
                                     for s, tl in zip(self.streams, tag_logits))
                    elif self.policy == 'predict' and not self.inert:  # padded targets (-1) read as 0: never computed
                        marg = model.marginal(x, meta, nxt, y.clamp(min=0), top_k=self.marginal_k, positions=todo)
                    greedy_logits = logits
                    if self.policy == 'predict':  # not asked for: every flag False
                        greedy_logits = self.greedy_path(x, y, meta, nxt, rows, idx) if self.greedy else None
                else:
                    logits, _ = model(x, meta if self.streams else None, targets=y)
                    greedy_logits = logits
            logp = F.log_softmax(logits.float(), -1)
            greedy = (greedy_logits.argmax(-1) == y).cpu() if greedy_logits is not None else torch.zeros(y.shape, dtype=torch.bool)
            lps = (marg if marg is not None else logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1))
            if tag_lp is not None:
                lps = lps + tag_lp
            lps = lps.double().cpu()
            for r, i in enumerate(idx):
                tok, _, _, n, skip = rows[i]
                L = len(tok) - 1
                lp, g = lps[r, L - n:L].numpy().copy(), greedy[r, L - n:L].numpy().copy()
                lp[:skip], g[:skip] = np.nan, False
                out[i] = (lp, g)
        return out

    def greedy_path(self, x, y, meta, nxt, rows, idx):
        """A meta_predict model's token logits along the tags greedy generation would feed it: from the
        context's last position on, each position's next tags are the heads' argmax, which are also
        the next token's own tags (sample.generate). Each choice reads the one before it: one forward
        pass per continuation token."""
        own, nx = {s: v.clone() for s, v in meta.items()}, {s: v.clone() for s, v in nxt.items()}
        ends = [(len(rows[i][0]) - 1, rows[i][3]) for i in idx]  # (inputs L, scored n) per row
        for j in range(max(n for _, n in ends) + 1):
            logits, _, tag_logits, _ = self.model.forward_predict(x, own, nx, targets=y)
            for r, (L, n) in enumerate(ends):
                if j < n:
                    p = L - n + j
                    for s, tl in zip(self.streams, tag_logits):
                        nx[s][r, p] = tl[r, p].argmax()
                        if p + 1 < L:
                            own[s][r, p + 1] = nx[s][r, p]
        return logits

    # --- generation ---

    def tagger(self):
        if not self.streams:
            return None
        if self.classes is not None:
            fail(f"{self.out_dir}: a meta_classes control model reads token classes, not tags: "
                 "log-likelihood tasks only (no generation)")
        if self.policy == 'unk':
            return UnkTagger(set(self.bases))
        return self.text.tagger()

    def parse_hints(self, hints):
        if not hints:
            return []
        if self.kind not in ('lime1', 'predict'):
            self.note(f"note: hints ignored: a {KIND_NAMES[self.kind]} model reads no next-token tags")
            return []
        if self.policy == 'unk':
            self.note("note: hints ignored under the unk policy (every tag <unk>)")
            return []
        try:
            return sample.parse_hints(hints, self.vocabs)
        except common.LimeError as e:
            fail(f"gen_kwargs hints: {e.msg}")

    def generate(self, ctx, until=(), max_new_tokens=32, hints='', temperature=0.0, generator=None):
        """Text generated after the token ids ctx (sample.generate: KV cache, online causal tags),
        up to the first stop string (not included) or <|endoftext|>."""
        if self.oracle:
            fail("tag policy 'oracle' has no generation: the continuation's tags need the "
                 "reference continuation (log-likelihood tasks only)")
        until = [u for u in ([until] if isinstance(until, str) else list(until or ())) if u]
        h = self.parse_hints(hints)
        if self.kind == 'predict' and self.policy == 'unk':
            h = [{s: UNK for s in self.streams}] * max_new_tokens  # next tags <unk> too
        h = h[:max_new_tokens]
        decode = lambda new: self.text.decode([t for t in new if t != self.text.eot])

        def stop(new):
            return new[-1] == self.text.eot or any(u in decode(new) for u in until)

        r = sample.generate(self.model, list(ctx) or [self.text.eot], max_new_tokens, temperature,
                                 1 if temperature == 0 else 0, True, tagger=self.tagger(), hints=h, ctx=self.ctx,
                                 generator=generator, cache_dtype=self.cache_dtype, tag_generated=False,
                                 meta_temperature=0 if temperature == 0 else None, stop=stop if max_new_tokens else None)
        new = r['tokens'][len(ctx) or 1:]
        if self.text.eot in new:
            new = new[:new.index(self.text.eot)]
        text = decode(new)
        cut = min([text.index(u) for u in until if u in text], default=len(text))
        return text[:cut]


# -----------------------------------------------------------------------------
# the lm-evaluation-harness model (lm_eval imported on first use)

_LM_CLASS = []


def lm_class():
    """The lm_eval.api.model.TemplateLM subclass for this project's checkpoints (registered as 'lime':
    simple_evaluate(model='lime', model_args='out_dir=DIR,tag_policy=causal') works too)."""
    if _LM_CLASS:
        return _LM_CLASS[0]
    require_lm_eval()
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    class LimeLM(TemplateLM):
        """loglikelihood / loglikelihood_rolling / generate_until through Scorer, with its tag policy
        (self.tag_policy, self.policy_label: printed with every result by harness.py)."""

        def __init__(self, out_dir='out', tag_policy='', device='cpu', batch_size=16, dtype='float32',
                     scorer=None, marginal_k=0, **unused):
            super().__init__()
            device = device or 'cpu'  # simple_evaluate(model='lime') passes device=None
            self.scorer = scorer or Scorer(out_dir, tag_policy, device, int(batch_size or 16), dtype or 'float32',
                                           marginal_k=int(marginal_k or 0))
            self.tag_policy, self.policy_label = self.scorer.policy, self.scorer.label
            self._device = device

        @property
        def eot_token_id(self):
            return self.scorer.text.eot

        @property
        def max_length(self):
            return self.scorer.block_size

        @property
        def tokenizer_name(self):
            return f"{self.scorer.text.md.TOKENIZER}/{self.scorer.text.tokenization}"

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            t = self.scorer.text  # the checkpoint's tokenizer and tokenization
            return list(memo(('encode', t.md.TOKENIZER, t.tokenization, string), lambda: t.encode(string)))

        def tok_decode(self, tokens, **kwargs):
            return self.scorer.text.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            res = self.scorer.loglikelihood([(c, k) for _, c, k in requests])
            for (key, _, _), r in zip(requests, res):
                if key is not None:
                    self.cache_hook.add_partial('loglikelihood', key, r)
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            out = []
            for (string,) in [r.args for r in requests]:
                tokens = self.tok_encode(string)
                # lm-eval's windows of max_length (disjoint targets, each with the most context that fits)
                windows, k = [], 0
                for _, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                        context_len=1)):
                    windows.append((k + 1, k + 1 + len(pred)))  # target indices in [prefix] + tokens
                    k += len(pred)
                ll = self.scorer.rolling([self.prefix_token_id] + tokens, windows) if windows else 0.0
                self.cache_hook.add_partial('loglikelihood_rolling', (string,), ll)
                out.append(ll)
            return out

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            g = torch.Generator(device=self.scorer.model.lm_head.weight.device).manual_seed(seed)
            for context, kw in [r.args for r in requests]:
                kw = dict(kw or {})
                temp = float(kw.get('temperature', 0.0) or 0.0) if kw.get('do_sample', False) else 0.0
                text = self.scorer.generate(self.tok_encode(context), kw.get('until', ()),
                                            int(kw.get('max_gen_toks', 256)), kw.get('hints', ''), temp, g)
                self.cache_hook.add_partial('generate_until', (context, kw), text)
                out.append(text)
            return out

    register_model('lime')(LimeLM)
    _LM_CLASS.append(LimeLM)
    return LimeLM


def make_lm(**kwargs):
    """An lm-eval model for a checkpoint: make_lm(out_dir=DIR, tag_policy='causal', device='cpu')."""
    return lm_class()(**kwargs)


# -----------------------------------------------------------------------------
# offline tasks: cloze (LAMBADA-style) and arithmetic, from NLTK corpora and a generator

CLOZE_SOURCES = ('brown', 'treebank', 'inaugural', 'state_union', 'webtext')  # not Gutenberg: the training corpus
ARITH_KINDS = tuple((d, op) for d in (1, 2, 3) for op in ('plus', 'minus'))


def arith_name(d, op):
    return f"{d}d{'a' if op == 'plus' else 's'}"


def arith_doc(a, op, b, d):
    """lm-eval's arithmetic format (its tasks' context and completion); subtraction never goes negative."""
    ans = a + b if op == 'plus' else a - b
    return dict(context=f"Question: What is {a} {op} {b}?\nAnswer:", completion=f" {ans}", answer=str(ans),
                kind=arith_name(d, op))


def _operands(d, rng):
    lo = 0 if d == 1 else 10 ** (d - 1)
    return int(rng.integers(lo, 10 ** d)), int(rng.integers(lo, 10 ** d))


def _pair(d, op, rng):
    a, b = _operands(d, rng)
    return (max(a, b), min(a, b)) if op == 'minus' else (a, b)


def arithmetic_test(n=50, seed=1234):
    """n distinct problems per kind (at most half of the kind's problems, so training keeps the rest),
    seeded, in kind order then drawing order."""
    rng = np.random.default_rng([seed, 1])
    docs = []
    for d, op in ARITH_KINDS:
        size = (10 if d == 1 else 9 * 10 ** (d - 1)) ** 2
        size = (size + (10 if d == 1 else 9 * 10 ** (d - 1))) // 2 if op == 'minus' else size
        k, seen = min(n, size // 2), set()
        while len(seen) < k:
            p = _pair(d, op, rng)
            if p not in seen:
                seen.add(p)
                docs.append(arith_doc(p[0], op, p[1], d))
    return docs


def arithmetic_train(n, test, seed=1234, per_doc=50):
    """Training documents: n problems (kinds uniform) that are not test problems, per_doc a document
    (separated by blank lines, the way lm-eval puts few-shot examples)."""
    held = {d['context'] for d in test}
    rng = np.random.default_rng([seed, 2])
    probs = []
    while len(probs) < n:
        d, op = ARITH_KINDS[int(rng.integers(len(ARITH_KINDS)))]
        a, b = _pair(d, op, rng)
        doc = arith_doc(a, op, b, d)
        if doc['context'] not in held:
            probs.append(doc['context'] + doc['completion'])
    return ['\n\n'.join(probs[i:i + per_doc]) for i in range(0, len(probs), per_doc)]


def corpus_sentences(name):
    """(fileid, sentences as text) of each document of an offline NLTK corpus, in fileid order. Brown
    and the Treebank come tokenized (their sentences, detokenized; Treebank traces dropped), the
    others raw (punkt)."""
    import nltk
    from nltk.tokenize.treebank import TreebankWordDetokenizer
    corpus = getattr(nltk.corpus, name)
    detok = TreebankWordDetokenizer().detokenize
    brackets = {'-LRB-': '(', '-RRB-': ')', '-LCB-': '{', '-RCB-': '}', '-LSB-': '[', '-RSB-': ']'}
    for f in corpus.fileids():
        if name == 'brown':
            yield f, (lambda f=f: [detok(s) for para in corpus.paras(f) for s in para])
        elif name == 'treebank':
            yield f, (lambda f=f: [detok([brackets.get(w, w) for w, t in s if t != '-NONE-'])
                                   for s in corpus.tagged_sents(f)])
        else:
            yield f, (lambda f=f: nltk.sent_tokenize(corpus.raw(f)))


def cloze_candidates(sents, min_words, max_words):
    """LAMBADA-style passages of one document: consecutive sentences (the fewest that reach min_words,
    at most max_words) whose last word, alphabetic and 3+ letters, ends the last sentence (before its
    final punctuation) and already occurs in the passage: predictable from the broad context, which
    is what LAMBADA's human filter selected for. Non-overlapping, in order. -> [(context, target)]."""
    import re
    words = [s.split() for s in sents]
    end = re.compile(r'^([A-Za-z]{3,})[.!?]["\u201d\']?$')
    out, last = [], -1
    for j, w in enumerate(words):
        if not w or not end.match(w[-1]):
            continue
        n, i = 0, j
        while i > last and n < min_words:
            n += len(words[i])
            i -= 1
        i += 1
        if n < min_words or n > max_words:
            continue
        passage = [x for k in range(i, j + 1) for x in words[k]]
        target = end.match(passage[-1]).group(1)
        context = passage[:-1]
        if target not in {re.sub(r'^\W+|\W+$', '', x) for x in context}:
            continue
        out.append((' '.join(context), ' ' + target))
        last = j
    return out


def cloze_docs(n=500, seed=1234, min_words=30, max_words=80):
    """n passages, an equal share from each corpus: documents in a seeded order until three times the
    share of candidates is found, then a seeded draw of the share among them, kept in corpus order."""
    quota = -(-n // len(CLOZE_SOURCES))
    docs = []
    for c, name in enumerate(CLOZE_SOURCES):
        rng = np.random.default_rng([seed, 3, c])
        files = list(corpus_sentences(name))
        cands = []
        for k in rng.permutation(len(files)).tolist():
            fid, sents = files[k]
            cands += [(fid, j, ctx, tgt) for j, (ctx, tgt) in enumerate(cloze_candidates(sents(), min_words, max_words))]
            if len(cands) >= 3 * quota:
                break
        pick = sorted(rng.choice(len(cands), min(quota, len(cands)), replace=False).tolist())
        docs += [dict(context=cands[i][2], target=cands[i][3], source=f"{name}/{cands[i][0]}") for i in pick]
    rng = np.random.default_rng([seed, 4])
    keep = sorted(rng.choice(len(docs), min(n, len(docs)), replace=False).tolist())
    return [docs[i] for i in keep]


def yaml_dump(obj, indent=0):
    """Task configs as YAML: keys plain, values as JSON scalars and lists (valid YAML, exact escapes)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict):
            lines.append(' ' * indent + f"{k}:")
            lines.append(yaml_dump(v, indent + 2))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            lines.append(' ' * indent + f"{k}:")
            for item in v:
                sub = yaml_dump(item, indent + 4).split('\n')
                lines.append(' ' * (indent + 2) + '- ' + sub[0].lstrip())
                lines += sub[1:]
        else:
            lines.append(' ' * indent + f"{k}: {json.dumps(v, ensure_ascii=False)}")
    return '\n'.join(lines)


def task_configs(task_dir):
    """{file name: config} of the offline tasks; data files by absolute path (lm-eval's json loader)."""
    data = lambda f: {'test': os.path.join(os.path.abspath(task_dir), f)}
    common = dict(dataset_path='json', test_split='test', target_delimiter='')
    gen = dict(until=['\n'], max_gen_toks=8, do_sample=False, temperature=0.0)
    strip = [dict(name='strip', filter=[dict(function='remove_whitespace'), dict(function='take_first')])]
    em = [dict(metric='exact_match', aggregation='mean', higher_is_better=True)]
    ll_metrics = [dict(metric='acc', aggregation='mean', higher_is_better=True),
                  dict(metric='perplexity', aggregation='perplexity', higher_is_better=False)]
    return {
        'lime_cloze.yaml': dict(
            task='lime_cloze', dataset_kwargs=dict(data_files=data('cloze.jsonl')), **common,
            output_type='loglikelihood', doc_to_text='{{context}}', doc_to_target='{{target}}',
            metric_list=ll_metrics, metadata=dict(version=1.0)),
        'lime_arithmetic.yaml': dict(
            task='lime_arithmetic', dataset_kwargs=dict(data_files=data('arithmetic.jsonl')), **common,
            output_type='generate_until', doc_to_text='{{context}}', doc_to_target='{{answer}}',
            generation_kwargs=gen, filter_list=strip, metric_list=em, metadata=dict(version=1.0)),
        # LIME+1 / meta_predict: the first answer token is hinted CD (a number): known from the format
        'lime_arithmetic_hinted.yaml': dict(
            task='lime_arithmetic_hinted', dataset_kwargs=dict(data_files=data('arithmetic.jsonl')), **common,
            output_type='generate_until', doc_to_text='{{context}}', doc_to_target='{{answer}}',
            generation_kwargs=dict(gen, hints='CD'), filter_list=strip, metric_list=em, metadata=dict(version=1.0)),
        # lm-eval's own arithmetic metric: is the greedy continuation the answer (log-likelihood request)
        'lime_arithmetic_ll.yaml': dict(
            task='lime_arithmetic_ll', dataset_kwargs=dict(data_files=data('arithmetic.jsonl')), **common,
            output_type='loglikelihood', doc_to_text='{{context}}', doc_to_target='{{completion}}',
            metric_list=ll_metrics[:1], metadata=dict(version=1.0)),
    }


def build_task_dir(task_dir, cloze_n=500, arith_n=50, seed=1234, min_words=30, max_words=80, out=None):
    """Write the offline tasks (cloze.jsonl, arithmetic.jsonl and one lm-eval yaml per task) into
    task_dir: deterministic for given arguments. Returns {file: number of docs}."""
    import metadata as md
    out = out or sys.stdout
    try:
        md.ensure_resources('binary')  # punkt_tab; the corpora are read through NLTK
    except md.MetadataError as e:
        fail(str(e))
    t0 = time.time()
    try:
        cloze = cloze_docs(cloze_n, seed, min_words, max_words)
    except LookupError as e:
        fail(f"an NLTK corpus is missing ({str(e).strip().splitlines()[0]}): the cloze task "
             f"reads {', '.join(CLOZE_SOURCES)}")
    arith = arithmetic_test(arith_n, seed)
    os.makedirs(task_dir, exist_ok=True)
    for name, docs in (('cloze.jsonl', cloze), ('arithmetic.jsonl', arith)):
        common.write_atomic(os.path.join(task_dir, name), ''.join(json.dumps(d, ensure_ascii=False) + '\n' for d in docs))
    for name, cfg in task_configs(task_dir).items():
        common.write_atomic(os.path.join(task_dir, name), f"# written by python harness.py --build_tasks=True\n"
                                                   f"{yaml_dump(cfg)}\n")
    print(f"wrote {task_dir}: {len(cloze)} cloze passages ({', '.join(CLOZE_SOURCES)}), {len(arith)} arithmetic "
          f"problems, tasks {', '.join(n[:-5] for n in task_configs(task_dir))} ({time.time() - t0:.1f}s)", file=out)
    return {'cloze.jsonl': len(cloze), 'arithmetic.jsonl': len(arith)}


# -----------------------------------------------------------------------------
# BLiMP (Warstadt et al. 2020) from its official files: 67 paradigms of minimal pairs, scored by the
# paper's simple LM method: the whole sentence's log-probability after the document separator,
# correct when the grammatical one is the likelier (lm-eval's multiple_choice with an empty context)

BLIMP_GROUP = 'lime_blimp'
BLIMP_MAX_BYTES = 64 << 20  # an official paradigm file is about 0.4 MB: a larger one is not BLiMP


def resolve_blimp_dir(d):
    """blimp_dir -> the directory of paradigm files, or '' for lm-eval's own tasks (the hub)."""
    if d == 'auto':
        d = os.path.join(os.path.dirname(common.ROOT), 'shared', 'blimp', 'data')
        return d if os.path.isdir(d) else ''
    if d and not os.path.isdir(d):
        fail(f"{d}: blimp_dir is not a directory (official BLiMP files, <UID>.jsonl)")
    return d


def read_blimp_file(path):
    """The pairs of one official-format paradigm file (JSON lines with sentence_good, sentence_bad,
    UID, pairID, field), checked: one line naming the file and the problem, never a traceback."""
    if os.path.getsize(path) > BLIMP_MAX_BYTES:
        fail(f"{path}: {os.path.getsize(path)} bytes, larger than any BLiMP paradigm file")
    uid, docs, ids = os.path.basename(path)[:-len('.jsonl')], [], set()
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                fail(f"{path}: line {n} is not JSON ({str(e).splitlines()[0]})")
            if not isinstance(d, dict):
                fail(f"{path}: line {n} is not a JSON object")
            for k in ('sentence_good', 'sentence_bad', 'UID', 'field'):
                if not isinstance(d.get(k), str) or not d[k].strip():
                    fail(f"{path}: line {n}: '{k}' missing or not a non-empty string")
            if not isinstance(d.get('pairID'), (str, int)) or isinstance(d.get('pairID'), bool):
                fail(f"{path}: line {n}: 'pairID' missing")
            if d['UID'] != uid:
                fail(f"{path}: line {n}: UID '{d['UID']}' is not the file's name")
            if str(d['pairID']) in ids:
                fail(f"{path}: line {n}: pairID {d['pairID']} twice")
            ids.add(str(d['pairID']))
            docs.append(d)
    if not docs:
        fail(f"{path}: no pairs")
    return docs


def build_blimp_tasks(blimp_dir, task_dir):
    """One lm-eval task per paradigm file of blimp_dir (lime_blimp_<UID>, reading the file itself) and
    their group lime_blimp (the mean of the paradigms' accuracies, as BLiMP reports). Returns
    {UID: (field, number of pairs)}."""
    files = sorted(f for f in os.listdir(blimp_dir) if f.endswith('.jsonl'))
    if not files:
        fail(f"{blimp_dir}: no BLiMP paradigm files (<UID>.jsonl)")
    info = {}
    for f in files:
        docs = read_blimp_file(os.path.join(blimp_dir, f))
        info[f[:-len('.jsonl')]] = (docs[0]['field'].replace('/', '_'), len(docs))  # the files spell syntax_semantics both ways
    os.makedirs(task_dir, exist_ok=True)
    for uid in info:
        cfg = dict(task=f"{BLIMP_GROUP}_{uid}", dataset_path='json',
                   dataset_kwargs=dict(data_files={'test': os.path.abspath(os.path.join(blimp_dir, uid + '.jsonl'))}),
                   test_split='test', output_type='multiple_choice', doc_to_text='', doc_to_target=0,
                   doc_to_choice='{{[sentence_good, sentence_bad]}}',
                   target_delimiter='',  # the sentence right after the separator, as documents start (lm-eval's own: ' ')
                   num_fewshot=0, metric_list=[dict(metric='acc', aggregation='mean', higher_is_better=True)],
                   metadata=dict(version=1.0))
        write_if_changed(os.path.join(task_dir, f"{BLIMP_GROUP}_{uid}.yaml"), cfg)
    write_if_changed(os.path.join(task_dir, f"{BLIMP_GROUP}.yaml"), dict(
        group=BLIMP_GROUP, task=[f"{BLIMP_GROUP}_{u}" for u in info],
        aggregate_metric_list=[dict(metric='acc', aggregation='mean', weight_by_size=False)], metadata=dict(version=1.0)))
    for f in os.listdir(task_dir):  # a paradigm no longer in blimp_dir: its task goes
        if f.startswith(BLIMP_GROUP + '_') and f.endswith('.yaml') and f[len(BLIMP_GROUP) + 1:-5] not in info:
            os.remove(os.path.join(task_dir, f))
    return info


def write_if_changed(path, cfg):
    text = f"# written by harness.py for --tasks=blimp\n{yaml_dump(cfg)}\n"
    if not (os.path.isfile(path) and open(path).read() == text):
        common.write_atomic(path, text)


def blimp_summary(samples, info):
    """lm-eval's per-pair samples of the paradigm tasks -> {overall: mean of paradigm accuracies,
    paradigms: {UID: acc}, fields: {field: mean of its paradigms'}, n_pairs, correct: {UID: {pairID:
    0/1}} (for paired comparisons between models)}."""
    correct = {uid: {str(x['doc']['pairID']): int(x['acc']) for x in samples[f"{BLIMP_GROUP}_{uid}"]}
               for uid in info}
    par = {uid: sum(c.values()) / len(c) for uid, c in correct.items()}
    fields = {}
    for uid, (field, _) in info.items():
        fields.setdefault(field, []).append(par[uid])
    return dict(overall=sum(par.values()) / len(par), paradigms=par,
                fields={f: sum(v) / len(v) for f, v in sorted(fields.items())},
                n_pairs=sum(len(c) for c in correct.values()), field_of={u: f for u, (f, _) in info.items()},
                correct=correct)


# -----------------------------------------------------------------------------
# running tasks

def metric_rows(results):
    """lm-eval's results dict -> [(task, metric, value, stderr)] (metric keys 'name,filter')."""
    rows = []
    for task, res in results.items():
        for key, v in res.items():
            if ',' not in key or '_stderr' in key or not isinstance(v, (int, float)):
                continue
            name, filt = key.split(',', 1)
            se = res.get(f"{name}_stderr,{filt}")
            rows.append((task, name if filt == 'none' else f"{name} ({filt})", float(v),
                         se if isinstance(se, (int, float)) else None))
            if name == 'perplexity' and v > 0:  # lm-eval's perplexity is exp(-mean log-likelihood)
                rows.append((task, 'loglikelihood (mean)', -math.log(v), None))
    return rows


def evaluate(lm, task_names, task_dir='', limit=0, num_fewshot=-1, bootstrap_iters=1000, log_samples=False):
    """lm_eval.simple_evaluate on an LM from make_lm; the local tasks from task_dir (or a list of
    directories). Returns lm-eval's
    results dict with 'lime' added: checkpoint, model kind, tag policy (and whether it is an oracle)."""
    import logging
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager
    logging.getLogger('lm_eval').setLevel(logging.WARNING)
    ours = all(t.startswith('lime_') for t in task_names)
    dirs = [d for d in (task_dir if isinstance(task_dir, (list, tuple)) else [task_dir]) if d and os.path.isdir(d)]
    tm = TaskManager(include_path=dirs or None,
                     include_defaults=not ours)
    missing = [t for t in task_names if t not in tm.all_tasks]
    if missing:
        fail(f"unknown task(s) {', '.join(missing)}" + (
            f" (the offline tasks are in {task_dir}: python harness.py --build_tasks=True --task_dir={task_dir})"
            if any(t.startswith('lime_') for t in missing) else ''))
    task_names, skipped = list(task_names), []
    if lm.scorer.oracle:  # the continuation's tags need the continuation: no generation tasks
        from lm_eval.tasks import get_task_dict
        td = get_task_dict(task_names, tm)
        skipped = [n for n in task_names if getattr(td.get(n), 'OUTPUT_TYPE', None) == 'generate_until']
        task_names = [n for n in task_names if n not in skipped]
        if skipped:
            print(f"note: tag policy oracle: generation tasks skipped ({', '.join(skipped)}): the continuation's "
                  "tags need the reference continuation", file=sys.stderr)
    if not task_names:
        return dict(results={}, lime=lime_info(lm.scorer, skipped))
    # BLiMP alone (multiple choice: log-likelihoods only): no greedy path for a self-predicting model
    lm.scorer.greedy = not all(t.startswith(BLIMP_GROUP) for t in task_names)
    res = lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=tm, limit=limit or None,
                                  num_fewshot=None if num_fewshot < 0 else num_fewshot,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                  random_seed=0, numpy_random_seed=1234, torch_random_seed=1234)
    res['lime'] = lime_info(lm.scorer, skipped)
    return res


def lime_info(s, skipped=()):
    return dict(out_dir=s.out_dir, model=KIND_NAMES[s.kind], streams=s.streams, tag_policy=s.policy,
                policy_label=s.label, likelihood=s.ll_kind, marginal_k=s.marginal_k, oracle=s.oracle,
                block_size=s.block_size, skipped_tasks=list(skipped),
                tokenizer=s.text.md.TOKENIZER, tokenization=s.text.tokenization)


def print_results(res, out=None):
    out = out or sys.stdout
    info = res['lime']
    rows = [r for r in metric_rows(res['results']) if not r[0].startswith(BLIMP_GROUP + '_')]  # the group's enough
    w = max([len(t) for t, _, _, _ in rows] + [4])
    mw = max([len(m) for _, m, _, _ in rows] + [6])
    print(f"{info['out_dir']} ({info['model']}{': ' + ','.join(info['streams']) if info['streams'] else ''}), "
          f"tag policy: {info['policy_label']}", file=out)
    num = lambda v: f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3e}"
    for task, metric, v, se in rows:
        print(f"  {task:<{w}}  {metric:<{mw}}  {num(v):>10}" + (f" ± {num(se)}" if se is not None else '')
              + f"  [tags: {info['tag_policy']}{', ' + info['likelihood'] if info.get('likelihood') else ''}"
              f"{', ORACLE' if info['oracle'] else ''}]", file=out)
    if not rows:
        print(f"  (no task ran: {', '.join(info['skipped_tasks'])} skipped)", file=out)


def run(cfg, out=None):
    out = out or sys.stdout
    if cfg['build_tasks']:
        return build_task_dir(cfg['task_dir'], cfg['cloze_n'], cfg['arith_n'], cfg['task_seed'],
                              cfg['cloze_min_words'], cfg['cloze_max_words'], out)
    names = [t.strip() for t in cfg['tasks'].split(',') if t.strip()]
    if not names:
        fail("--tasks is empty")
    # everything that can be refused is refused before the tasks are built and evaluated
    path = results_path(cfg)
    check_writable(path)
    torch.manual_seed(cfg['seed'])
    first = Scorer(cfg['out_dir'], '', cfg['device'], cfg['batch_size'], cfg['dtype'], marginal_k=cfg['marginal_k'])
    lm_class()  # lm-eval missing: one line
    pols = [p.strip() for p in cfg['tag_policy'].split(',') if p.strip()] or [first.policy]
    if pols == ['all']:
        pols = list(POLICIES[first.kind])
    pols = [first.check_policy(p) for p in pols]  # every policy checked before the first evaluation
    blimp = None
    bdir = resolve_blimp_dir(cfg['blimp_dir']) if 'blimp' in names else ''
    if bdir:  # else lm-eval's own blimp (the hub)
        blimp = build_blimp_tasks(bdir, cfg['blimp_task_dir'])
        names = [BLIMP_GROUP if n == 'blimp' else n for n in names]
        print(f"{bdir}: BLiMP, {len(blimp)} paradigms, {sum(n for _, n in blimp.values())} pairs"
              + (f", the first {cfg['limit']} of each scored" if cfg['limit'] else '')
              + f" (tasks in {cfg['blimp_task_dir']})", file=out)
    if any(t.startswith('lime_') and not t.startswith(BLIMP_GROUP) for t in names) \
            and not os.path.isfile(os.path.join(cfg['task_dir'], 'cloze.jsonl')):
        print(f"{cfg['task_dir']}: no offline tasks yet, building them", file=out)
        build_task_dir(cfg['task_dir'], cfg['cloze_n'], cfg['arith_n'], cfg['task_seed'],
                       cfg['cloze_min_words'], cfg['cloze_max_words'], out)
    results = {}
    for p in pols:
        first.set_policy(p)
        t0 = time.time()
        res = evaluate(make_lm(scorer=first), names, [cfg['task_dir'], cfg['blimp_task_dir']], cfg['limit'],
                       cfg['num_fewshot'], cfg['bootstrap_iters'], log_samples=blimp is not None)
        print_results(res, out)
        results[p] = dict(lime=res['lime'], results=res['results'], n_samples=res.get('n-samples'),
                          configs={k: {kk: str(vv) for kk, vv in v.items()} for k, v in res.get('configs', {}).items()},
                          wall_s=time.time() - t0)
        if blimp is not None and res.get('samples'):
            b = results[p]['blimp'] = blimp_summary(res['samples'], blimp)
            b['wall_s'] = time.time() - t0
            print(f"  BLiMP overall {b['overall']:.4f} over {len(b['paradigms'])} paradigms ({b['n_pairs']} pairs, "
                  f"{b['n_pairs'] / b['wall_s']:.0f} pairs/s with lm-eval's overhead); "
                  + ', '.join(f"{f} {v:.4f}" for f, v in b['fields'].items()), file=out)
    # a full disk (which the check above cannot see coming) is a LimeError naming path
    common.write_json(path, dict(config=cfg, policies=results, time=time.strftime('%Y-%m-%d %H:%M:%S')))
    print(f"wrote {path}", file=out)
    return results


def main(argv):
    return common.run_main('harness.py', lambda: run(configure(argv)))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
