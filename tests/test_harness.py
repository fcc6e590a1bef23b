"""harness.py (issue 13): tag policies, the lm-eval model against direct forward passes, rolling
windows, stop strings, the offline task builder, and an lm-eval run end to end."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import harness
import metadata as md
from conftest import ROOT
from metadata import UNK
from test_sample import HAVE_NLTK, make_ckpt

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not HAVE_NLTK, reason='NLTK data or tiktoken cache unavailable')

CTX = 'Mr. Smith went to Washington in 2024. He said that the ship was'
CONT = ' late again'
LONG = ('The old man walked to the harbour in the morning. Mr. Smith sold 3 boats to the Navy in 1901, '
        'and the people of London cheered. She said that it would rain, but it did not.')
KINDS = {  # name: (streams, meta_shift, meta_predict)
    'baseline': ((), 0, False),
    'lime': (('pos_causal', 'ner_causal'), 0, False),
    'lime_full': (('pos', 'ner'), 0, False),
    'lime1': (('pos', 'ner'), 1, False),
    'lime1_causal': (('pos_causal', 'ner_causal'), 1, False),
    'predict': (('pos_causal', 'ner_causal'), 0, True),
    'predict_full': (('pos', 'ner'), 0, True),  # trained on full tags: the joint bound, not the marginal
}


@pytest.fixture(autouse=True)
def gpt2_tokenizer():
    yield
    md.set_tokenizer('gpt2')  # process-global: leave it as the other tests expect


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('harness')
    return {k: make_ckpt(d / k, s, sh, predict=p, block_size=24, seed=i)
            for i, (k, (s, sh, p)) in enumerate(KINDS.items())}


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('tasks') / 'lime'
    harness.build_task_dir(str(d), cloze_n=5, arith_n=2, seed=7)
    return d


try:
    import lm_eval  # noqa: F401
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False


def lm_eval_or_skip():
    return pytest.importorskip('lm_eval', reason='lm-eval not installed (pip install -r requirements-dev.txt)')


def causal(seq):
    c = md.annotate_causal(np.array(seq), 'binary')
    return {'pos': c['pos_causal'].astype(np.int64), 'ner': c['ner_causal'].astype(np.int64)}


def full(seq):
    f = md.annotate_ids(np.array(seq), 'binary', 'full')
    return {'pos': f['pos'].astype(np.int64), 'ner': f['ner'].astype(np.int64)}


def base(s):
    return s.replace('_causal', '')


# --- tag policies ---------------------------------------------------------------------

def test_each_policy_gives_its_tags(ckpts):
    text = harness.Scorer(ckpts['baseline']).text
    ctx = text.encode(CTX)
    seq = text.encode(CTX + CONT)
    assert seq[:len(ctx)] == ctx  # the split at the context is clean here
    n, P = len(ctx), len(seq) - 1
    C, Fu = causal(seq), full(seq)

    s = harness.Scorer(ckpts['baseline'])
    assert s.policy == 'causal' and s.policy_inputs(seq, n) == ({}, None) and 'no tags' in s.label

    s = harness.Scorer(ckpts['lime'])  # default causal: tags of token t from tokens <= t
    meta, nxt = s.policy_inputs(seq, n)
    assert s.policy == 'causal' and nxt is None
    for st in s.streams:
        assert np.array_equal(meta[st], C[base(st)][:P])
    meta, _ = harness.Scorer(ckpts['lime'], 'unk').policy_inputs(seq, n)
    assert all((m == UNK).all() for m in meta.values())

    s = harness.Scorer(ckpts['lime1'])  # causal: next tags while in the context, <unk> where scored
    meta, nxt = s.policy_inputs(seq, n)
    assert s.policy == 'causal' and not s.oracle and nxt is None
    for st in s.streams:
        assert np.array_equal(meta[st][:n - 1], C[base(st)][1:n]) and (meta[st][n - 1:] == UNK).all()
    s = harness.Scorer(ckpts['lime1'], 'oracle')  # full streams: full tags of the next tokens
    meta, _ = s.policy_inputs(seq, n)
    assert s.oracle and 'ORACLE' in s.label
    for st in s.streams:
        assert np.array_equal(meta[st], Fu[base(st)][1:])
    meta, _ = harness.Scorer(ckpts['lime1_causal'], 'oracle').policy_inputs(seq, n)
    for st in meta:
        assert np.array_equal(meta[st], C[base(st)][1:])

    s = harness.Scorer(ckpts['predict'])  # own tags causal, next tags the text's causal tags (the past's)
    meta, nxt = s.policy_inputs(seq, n)
    assert s.policy == 'predict' and 'exact marginal' in s.label and s.ll_kind == 'exact marginal'
    for st in s.streams:
        assert np.array_equal(meta[st], C[base(st)][:P]) and np.array_equal(nxt[st], C[base(st)][1:])
    meta, nxt = harness.Scorer(ckpts['predict'], 'unk').policy_inputs(seq, n)
    assert all((m == UNK).all() for m in list(meta.values()) + list(nxt.values()))


def test_honest_policies_do_not_read_the_continuation(ckpts):
    text = harness.Scorer(ckpts['baseline']).text
    ctx = text.encode(CTX)
    a, b = ctx + text.encode(' late again')[:2], ctx + text.encode(' Paris, France')[:2]
    n = len(ctx)
    for kind, policy in [('lime', 'causal'), ('lime1', 'causal'), ('predict', 'predict'), ('lime', 'unk')]:
        s = harness.Scorer(ckpts[kind], policy)
        (ma, na), (mb, nb) = s.policy_inputs(a, n), s.policy_inputs(b, n)
        for st in s.streams:  # what position t sees depends on tokens <= t only
            for t in range(len(a) - 1):
                same_past = a[:t + 1] == b[:t + 1]
                assert not same_past or ma[st][t] == mb[st][t], (kind, st, t)
    s = harness.Scorer(ckpts['lime1'], 'oracle')  # the oracle does read it
    ma, mb = s.policy_inputs(a, n)[0], s.policy_inputs(b, n)[0]
    assert any((ma[st][n - 1:] != mb[st][n - 1:]).any() for st in s.streams)


@pytest.mark.parametrize('kind,policy,match', [
    ('lime_full', 'full', 'read the continuation'), ('lime', 'oracle', "does not apply"),
    ('baseline', 'unk', 'does not apply'), ('lime1', 'predict', 'does not apply'),
    ('predict', 'causal', 'does not apply'), ('lime', 'bogus', 'unknown tag policy')])
def test_policy_refusals(ckpts, kind, policy, match):
    with pytest.raises(common.LimeError, match=match):
        harness.Scorer(ckpts[kind], policy)


# --- log-likelihoods against direct forward passes ------------------------------------

def direct_ll(model, seq, n_cont, meta=None, nxt=None, pay=False):
    """log p(last n_cont tokens of seq) by one plain forward over the last block_size inputs."""
    T = model.config.block_size
    lo = max(0, len(seq) - 1 - T)
    x = torch.tensor([seq[lo:-1]])
    y = torch.tensor([seq[lo + 1:]])
    m = {s: torch.from_numpy(np.asarray(v[lo:]))[None] for s, v in (meta or {}).items()} or None
    with torch.no_grad():
        if nxt is None:
            logits, _ = model(x, m, targets=y)
            tag_lp = 0
        else:
            nx = {s: torch.from_numpy(np.asarray(v[lo:]))[None] for s, v in nxt.items()}
            logits, _, tag_logits, _ = model.forward_predict(x, m, nx, targets=y)
            tag_lp = sum(F.log_softmax(tl, -1)[0, -n_cont:].gather(-1, nx[s][0, -n_cont:, None]).sum()
                         for s, tl in zip(model.config.meta_streams, tag_logits)) if pay else 0
    lp = F.log_softmax(logits, -1)[0, -n_cont:].gather(-1, y[0, -n_cont:, None]).sum()
    greedy = bool((logits[0, -n_cont:].argmax(-1) == y[0, -n_cont:]).all())
    return float(lp + tag_lp), greedy


def direct_marginal(model, seq, n_cont, meta, nxt, top_k=0):
    """The sum of model.marginal over the last n_cont tokens of seq (next tags summed out), one row
    over the last block_size inputs, no padding."""
    T = model.config.block_size
    lo = max(0, len(seq) - 1 - T)
    x, y = torch.tensor([seq[lo:-1]]), torch.tensor([seq[lo + 1:]])
    m = {s: torch.from_numpy(np.asarray(v[lo:]))[None] for s, v in meta.items()}
    nx = {s: torch.from_numpy(np.asarray(v[lo:]))[None] for s, v in nxt.items()}
    return float(model.marginal(x, m, nx, y, top_k=top_k)[0, -n_cont:].double().sum())


@pytest.mark.parametrize('kind,policy', [('baseline', ''), ('lime', 'causal'), ('lime1', 'causal'),
                                         ('lime1', 'oracle'), ('predict', 'predict'), ('predict', 'oracle'),
                                         ('predict_full', 'predict')])
def test_loglikelihood_equals_a_forward_pass(ckpts, kind, policy):
    lm_eval_or_skip()
    from lm_eval.api.instance import Instance
    lm = harness.make_lm(out_dir=ckpts[kind], tag_policy=policy, batch_size=2)
    model, text = lm.scorer.model, lm.scorer.text
    # three batched requests of different lengths, one longer than block_size (left-truncated), an empty context
    pairs = [(CTX, CONT), (LONG, ' again'), ('The ship was ', 'late'), ('', 'The ship')]
    got = lm.loglikelihood([Instance('loglikelihood', {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:  # lm-eval's split: trailing whitespace goes to the continuation, the whole encoded at once
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
            whole, c = text.encode(ctx + cont), text.encode(ctx)
        else:
            c, whole = [text.eot], [text.eot] + text.encode(cont)
        seq, n = whole, len(whole) - len(c)
        C = causal(seq)
        streams = lm.scorer.streams
        meta = nxt = None
        if kind in ('lime',):
            meta = {s: C[base(s)][:-1] for s in streams}
        elif kind == 'lime1':
            src = full(seq) if policy == 'oracle' else C
            meta = {s: src[base(s)][1:].copy() for s in streams}
            if policy == 'causal':
                for s in streams:
                    meta[s][len(c) - 1:] = UNK
        elif kind.startswith('predict'):  # causal tags, also for the model trained on full tags
            meta = {s: C[base(s)][:-1] for s in streams}
            nxt = {s: C[base(s)][1:] for s in streams}
        # predict: the joint bound (the heads pay for the text's next tags) for the full-tag model only
        want, want_greedy = direct_ll(model, seq, n, meta, nxt, pay=policy == 'predict')
        if (kind, policy) == ('predict', 'predict'):  # causal streams: the marginal
            assert ll > want + 1e-3, (ctx, cont)  # more than the joint bound: the other tags count too
            want = direct_marginal(model, seq, n, meta, nxt)
        assert ll == pytest.approx(want, abs=1e-4), (ctx, cont)
        if policy != 'predict':  # predict: greedy means generation with the heads' own tags (below)
            assert greedy == want_greedy


def test_greedy_is_generation(ckpts):
    """is_greedy is True exactly for what greedy generation produces (meta_predict: with its own tags)."""
    import sample
    for kind in ('baseline', 'lime', 'lime1', 'predict'):
        s = harness.Scorer(ckpts[kind])
        ctx = s.text.encode('He said that the ship was')  # context + continuation within block_size
        tagger = s.text.tagger() if s.streams else None
        gen = sample.generate(s.model, ctx, 4, 0.0, 1, True, tagger=tagger, tag_generated=False,
                              meta_temperature=0)['tokens'][len(ctx):]
        other = gen[:-1] + [(gen[-1] + 1) % s.text.eot]
        (ll, ok), (ll2, bad) = s.loglikelihood([(ctx, gen), (ctx, other)])
        assert ok and not bad and ll > ll2, kind


@pytest.mark.parametrize('kind', ['baseline', 'lime', 'predict'])
def test_loglikelihood_rolling_is_the_sum_over_windows(ckpts, kind):
    lm_eval_or_skip()
    from lm_eval import utils as lmu
    from lm_eval.api.instance import Instance
    lm = harness.make_lm(out_dir=ckpts[kind])
    model, text = lm.scorer.model, lm.scorer.text
    tokens = text.encode(LONG)
    T = model.config.block_size
    assert len(tokens) > 2 * T  # several windows, the last one partial
    got = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (LONG,), 0)])[0]
    doc = [text.eot] + tokens
    C = causal(doc)
    streams = lm.scorer.streams
    total, done = 0.0, 0
    windows = list(map(lmu.make_disjoint_window, lmu.get_rolling_token_windows(tokens, text.eot, T, 1)))
    assert len(windows) >= 3
    for ctx, pred in windows:
        end = done + len(pred) + 1  # doc[:end] ends with this window's last target
        assert doc[end - len(pred):end] == pred
        meta = {s: C[base(s)][:end - 1] for s in streams} if streams else None
        nxt = {s: C[base(s)][1:end] for s in streams} if kind == 'predict' else None
        total += (direct_marginal(model, doc[:end], len(pred), meta, nxt) if kind == 'predict' else
                  direct_ll(model, doc[:end], len(pred), meta, nxt)[0])
        done += len(pred)
    assert done == len(tokens)
    assert got == pytest.approx(total, abs=1e-3)


def test_predict_scores_the_marginal_exact_or_top_k(ckpts, capsys):
    # padded rows of several lengths in one batch (-1 targets), a row longer than block_size, a one-token context
    s = harness.Scorer(ckpts['predict'], batch_size=4)
    text, model = s.text, s.model
    pairs = [(text.encode(CTX), text.encode(CONT)), (text.encode(LONG), text.encode(' again')),
             (text.encode('The ship was'), text.encode(' late')), ([text.eot], text.encode('The ship'))]
    G = math.prod(model.config.meta_n_tags)
    assert G == 48 * 6  # every combination of PTB tags and binary NER tags (with the special tags)
    exact = [ll for ll, _ in s.loglikelihood(pairs)]
    s3 = harness.Scorer(ckpts['predict'], batch_size=4, marginal_k=3)
    top3 = [ll for ll, _ in s3.loglikelihood(pairs)]
    assert s.ll_kind == 'exact marginal' and s3.ll_kind == 'top-k bound (k=3)' and 'top-k bound' in s3.label
    for (ctx, cont), e, b in zip(pairs, exact, top3):
        seq, n = ctx + cont, len(cont)
        C = causal(seq)
        meta = {st: C[base(st)][:-1] for st in s.streams}
        nxt = {st: C[base(st)][1:] for st in s.streams}
        assert e == pytest.approx(direct_marginal(model, seq, n, meta, nxt), abs=1e-5)
        assert b == pytest.approx(direct_marginal(model, seq, n, meta, nxt, top_k=3), abs=1e-5)
        joint = direct_ll(model, seq, n, meta, nxt, pay=True)[0]  # the data's combination alone
        assert joint - 1e-5 <= b <= e + 1e-5 and b < e - 1e-4  # joint <= top-3 bound <= exact
    # k at least the number of combinations: the exact sum, and said so
    sG = harness.Scorer(ckpts['predict'], batch_size=4, marginal_k=G)
    assert sG.ll_kind == 'exact marginal'
    assert [ll for ll, _ in sG.loglikelihood(pairs)] == pytest.approx(exact, abs=1e-5)
    # the kind is printed with the policy and beside every result line
    res = dict(results={'lime_cloze': {'acc,none': 0.5, 'acc_stderr,none': 0.1, 'perplexity,none': 9.0}})
    for sc, kind in ((s, 'exact marginal'), (s3, 'top-k bound (k=3)'),
                     (harness.Scorer(ckpts['predict_full']), harness.JOINT_BOUND)):
        harness.print_results(dict(res, lime=harness.lime_info(sc)))
        lines = capsys.readouterr().out.splitlines()
        assert f'tag policy: predict ({kind}: ' in lines[0]
        assert len(lines) == 4 and all(l.endswith(f'[tags: predict, {kind}]') for l in lines[1:]), lines
    assert harness.lime_info(s3)['likelihood'] == 'top-k bound (k=3)' and harness.lime_info(s3)['marginal_k'] == 3
    harness.print_results(dict(res, lime=harness.lime_info(harness.Scorer(ckpts['predict'], 'unk'))))
    assert all(l.endswith('[tags: unk]') for l in capsys.readouterr().out.splitlines()[1:])
    with pytest.raises(common.LimeError, match='marginal_k must be an integer >= 0'):
        harness.Scorer(ckpts['predict'], marginal_k=-1)


def test_predict_on_full_tags_keeps_the_joint_bound(ckpts):
    # a meta_predict model trained on full tags: its marginal is not a likelihood of the text, the joint bound is kept
    s = harness.Scorer(ckpts['predict_full'], marginal_k=3)
    assert s.policy == 'predict' and s.ll_kind == harness.JOINT_BOUND and 'joint bound (full tags' in s.label
    text = s.text
    ctx, cont = text.encode(CTX), text.encode(CONT)
    seq = ctx + cont
    C = causal(seq)
    meta = {st: C[base(st)][:-1] for st in s.streams}
    nxt = {st: C[base(st)][1:] for st in s.streams}
    (ll, _), = s.loglikelihood([(ctx, cont)])
    assert ll == pytest.approx(direct_ll(s.model, seq, len(cont), meta, nxt, pay=True)[0], abs=1e-4)


# --- generation ---------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['baseline', 'lime', 'lime1', 'predict'])
def test_generate_until_stops_at_stop_strings(ckpts, kind, monkeypatch):
    lm_eval_or_skip()
    import sample
    from lm_eval.api.instance import Instance
    lm = harness.make_lm(out_dir=ckpts[kind])
    s = lm.scorer
    ctx = s.text.encode(CTX)
    free = s.generate(ctx, max_new_tokens=12)
    # sample.py's own generate, greedy, gives the same text (generate_until goes through it)
    tagger = s.text.tagger() if s.streams else None
    r = sample.generate(s.model, ctx, 12, 0.0, 1, True, tagger=tagger, tag_generated=False, meta_temperature=0)
    new = [t for t in r['tokens'][len(ctx):]]
    if s.text.eot in new:
        new = new[:new.index(s.text.eot)]
    assert free == s.text.decode(new)
    k = next(i for i in range(1, len(free) - 2) if free[i:i + 2] not in free[:i + 1])
    stop = free[k:k + 2]
    calls = []
    real = sample.generate
    monkeypatch.setattr(sample, 'generate', lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    out = lm.generate_until([Instance('generate_until', {}, (CTX, {'until': ['@@@', stop], 'max_gen_toks': 12}), 0)])
    assert out == [free[:k]]
    n_new = len(calls[0]['tokens']) - len(ctx)
    assert s.text.decode(calls[0]['tokens'][len(ctx):]).find(stop) >= 0
    assert stop not in s.text.decode(calls[0]['tokens'][len(ctx):len(ctx) + n_new - 1])  # it stopped at once


def test_generation_hints_and_unk(ckpts, monkeypatch):
    lm_eval_or_skip()
    import sample
    from lm_eval.api.instance import Instance
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, 'generate', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    req = [Instance('generate_until', {}, ('Question: What is 2 plus 3?\nAnswer:', {'until': ['\n'], 'max_gen_toks': 4,
                                                                                     'hints': 'CD'}), 0)]
    cd = md.stream_tags('pos', 'binary').index('CD')
    harness.make_lm(out_dir=ckpts['lime1']).generate_until(req)
    assert seen[-1]['hints'] == [{'pos': cd}]  # first answer token hinted CD, the rest <unk>
    harness.make_lm(out_dir=ckpts['predict']).generate_until(req)
    assert seen[-1]['hints'] == [{'pos_causal': cd}]  # the heads fill in the rest
    harness.make_lm(out_dir=ckpts['predict'], tag_policy='unk').generate_until(req)
    assert seen[-1]['hints'] == [{'pos_causal': UNK, 'ner_causal': UNK}] * 4
    assert isinstance(seen[-1]['tagger'], harness.UnkTagger)
    harness.make_lm(out_dir=ckpts['lime']).generate_until(req)  # a LIME model reads no next-token tags
    assert seen[-1]['hints'] == []
    with pytest.raises(common.LimeError, match='oracle'):
        harness.make_lm(out_dir=ckpts['lime1'], tag_policy='oracle').generate_until(req)


# --- offline tasks --------------------------------------------------------------------------

def test_task_builder_is_deterministic(tmp_path, task_dir):
    a, b = tmp_path / 'a', tmp_path / 'b'
    harness.build_task_dir(str(a), cloze_n=5, arith_n=2, seed=7)
    harness.build_task_dir(str(b), cloze_n=5, arith_n=2, seed=7)
    for name in sorted(os.listdir(task_dir)):
        x, y, z = ((d / name).read_text() for d in (a, b, task_dir))
        assert x == y.replace(str(b), str(a)) == z.replace(str(task_dir), str(a)), name
    assert {'cloze.jsonl', 'arithmetic.jsonl', 'lime_cloze.yaml', 'lime_arithmetic.yaml',
            'lime_arithmetic_hinted.yaml', 'lime_arithmetic_ll.yaml'} <= set(os.listdir(a))
    cloze = [json.loads(l) for l in (a / 'cloze.jsonl').read_text().splitlines()]
    assert len(cloze) == 5 and {c['source'].split('/')[0] for c in cloze} == set(harness.CLOZE_SOURCES)
    for c in cloze:
        w = c['target'][1:]
        assert c['target'] == ' ' + w and w.isalpha() and w in c['context'] and 30 <= len(c['context'].split()) + 1 <= 80
    harness.build_task_dir(str(b), cloze_n=5, arith_n=2, seed=8)
    assert (a / 'cloze.jsonl').read_text() != (b / 'cloze.jsonl').read_text()  # the seed matters


def test_arithmetic_problems():
    test = harness.arithmetic_test(n=40, seed=3)
    kinds = [d['kind'] for d in test]
    assert kinds.count('1da') == 40 and kinds.count('1ds') == 27 and kinds.count('3ds') == 40  # 1ds: half of 55
    assert test == harness.arithmetic_test(n=40, seed=3)
    for d in test:
        q = d['context']
        assert q.startswith('Question: What is ') and q.endswith('?\nAnswer:') and d['completion'] == ' ' + d['answer']
        a, op, b = q[len('Question: What is '):-len('?\nAnswer:')].split()
        assert int(d['answer']) == (int(a) + int(b) if op == 'plus' else int(a) - int(b)) >= 0
        assert len(a) == len(b) == int(d['kind'][0])
    train = harness.arithmetic_train(3000, test, seed=3, per_doc=50)
    assert len(train) == 60
    problems = [p for doc in train for p in doc.split('\n\n')]
    held = {d['context'] + d['completion'] for d in test}
    assert len(problems) == 3000 and not held & set(problems)
    one_digit_sums = {p for p in problems if ' plus ' in p and len(p.split()[3]) == 1}
    assert 0 < len(one_digit_sums) <= 100 - 40  # the 60 that are not test problems


# --- lm-eval end to end -----------------------------------------------------------------------

def cli(*argv):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'harness.py'), *argv], capture_output=True, text=True, env=env,
                       timeout=600)
    return r.returncode, r.stdout, r.stderr


def test_lm_eval_end_to_end(ckpts, task_dir, tmp_path):
    lm_eval = lm_eval_or_skip()
    out = tmp_path / 'h.json'
    rc, so, se = cli(f'--out_dir={ckpts["lime1"]}', '--tasks=lime_cloze,lime_arithmetic,lime_arithmetic_ll',
                     f'--task_dir={task_dir}', '--tag_policy=causal,oracle', f'--out_json={out}', '--limit=3')
    assert rc == 0, se[-3000:]
    lines = so.splitlines()
    heads = [l for l in lines if 'tag policy:' in l]
    assert len(heads) == 2 and heads[0].endswith('tag policy: causal') and 'ORACLE' in heads[1]
    rows = [l for l in lines if '[tags:' in l]
    assert all(l.endswith('[tags: causal]') or l.endswith('[tags: oracle, ORACLE]') for l in rows)
    assert sum('ORACLE' in l for l in rows) == 4  # cloze acc, perplexity, mean ll; arithmetic_ll acc
    assert sum('lime_arithmetic ' in l for l in rows) == 1  # generation: causal only (oracle skips it)
    res = json.loads(out.read_text())['policies']
    assert res['oracle']['lime']['oracle'] and not res['causal']['lime']['oracle']
    assert res['oracle']['lime']['skipped_tasks'] == ['lime_arithmetic']
    r = res['causal']['results']
    assert 0 <= r['lime_cloze']['acc,none'] <= 1 and r['lime_cloze']['perplexity,none'] > 1
    assert 0 <= r['lime_arithmetic']['exact_match,strip'] <= 1 and 'acc,none' in r['lime_arithmetic_ll']
    # the same through lm_eval.simple_evaluate directly, and the registered name
    from lm_eval.tasks import TaskManager
    harness.lm_class()  # registers 'lime'
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    res2 = lm_eval.simple_evaluate(model='lime', model_args=f'out_dir={ckpts["lime1"]},tag_policy=causal',
                                   tasks=['lime_cloze'], task_manager=tm, limit=3, bootstrap_iters=0)
    assert res2['results']['lime_cloze']['acc,none'] == r['lime_cloze']['acc,none']
    assert res2['results']['lime_cloze']['perplexity,none'] == pytest.approx(r['lime_cloze']['perplexity,none'])


def test_cli_errors(ckpts, task_dir, tmp_path, capsys, monkeypatch):
    def err(*argv):
        assert harness.main(list(argv)) == 1
        e = capsys.readouterr().err.strip().splitlines()
        assert e[-1].startswith('harness.py: error: ')
        return e[-1]
    assert 'ckpt.pt: not found' in err(f'--out_dir={tmp_path}', '--tasks=lime_cloze', f'--task_dir={task_dir}')
    assert 'read the continuation' in err(f'--out_dir={ckpts["lime_full"]}', '--tag_policy=full', f'--task_dir={task_dir}')
    assert "does not apply" in err(f'--out_dir={ckpts["lime"]}', '--tag_policy=causal,oracle', f'--task_dir={task_dir}')
    assert "unknown key 'tag_polcy'" in err('--tag_polcy=x')
    assert '--tasks is empty' in err('--tasks=,')
    if HAVE_LM_EVAL:
        assert 'unknown task(s) lime_nope' in err(f'--out_dir={ckpts["lime"]}', '--tasks=lime_nope',
                                                  f'--task_dir={task_dir}')
    # lm-eval missing: one line naming the package
    monkeypatch.setitem(sys.modules, 'lm_eval', None)
    monkeypatch.setattr(harness, '_LM_CLASS', [])
    assert 'pip install lm-eval==' in err(f'--out_dir={ckpts["lime"]}', f'--task_dir={task_dir}')


def test_no_lm_eval_import_elsewhere():
    code = ("import sys; import harness, sample, train, bench, model, metadata, prepare; "
            "print('lm_eval' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith('False'), r.stderr


# --- options and the results file, checked before any work (issue 21) --------------------------

BAD_OPTIONS = [
    ('--limit=-3', 'limit must be an integer >= 0 (0: all examples), got -3'),
    ('--batch_size=0', 'batch_size must be an integer >= 1, got 0'),
    ('--batch_size=-4', 'batch_size must be an integer >= 1, got -4'),
    ('--num_fewshot=-2', "num_fewshot must be an integer >= 0, or -1 for the task's default, got -2"),
    ('--bootstrap_iters=-1', 'bootstrap_iters must be an integer >= 0 (0: no stderr), got -1'),
    ('--seed=-1', 'seed must be an integer >= 0, got -1'),
    ('--cloze_n=0', 'cloze_n must be an integer >= 1, got 0'),
    ('--arith_n=-5', 'arith_n must be an integer >= 1, got -5'),
    ('--cloze_max_words=10', 'cloze_max_words must be an integer >= cloze_min_words=30, got 10'),
    ('--device=gpu', "device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
    ('--marginal_k=-1', 'marginal_k must be an integer >= 0 (0: the exact marginal), got -1'),
]


@pytest.mark.parametrize('flag,msg', BAD_OPTIONS)
def test_bad_options_are_one_line_with_the_allowed_range(tmp_path, capsys, flag, msg):
    # no checkpoint there: the option is refused first, before anything is loaded or built
    assert harness.main([f'--out_dir={tmp_path}/nothing', f'--task_dir={tmp_path}/tasks', flag]) == 1
    assert capsys.readouterr().err == f'harness.py: error: {msg}\n'
    assert not (tmp_path / 'tasks').exists()


def test_scorer_refuses_a_batch_size_below_one(ckpts):
    for bs in (0, -4):  # was silently run as 1
        with pytest.raises(common.LimeError, match=f'batch_size must be an integer >= 1, got {bs}'):
            harness.Scorer(ckpts['baseline'], batch_size=bs)
    assert harness.Scorer(ckpts['baseline'], batch_size=np.int64(3)).batch_size == 3


def test_results_file_is_checked_before_the_evaluation(ckpts, tmp_path, capsys):
    ckpt = os.path.join(ckpts['baseline'], 'ckpt.pt')
    tasks = tmp_path / 'tasks'
    for out_json, msg in [(f'{ckpt}/h.json', f'{ckpt}/h.json: cannot write the results ({ckpt} is not a directory)'),
                          (str(tmp_path), f'{tmp_path}: cannot write the results (a directory)')]:
        assert harness.main([f'--out_dir={ckpts["baseline"]}', '--tasks=lime_cloze', f'--task_dir={tasks}',
                             f'--out_json={out_json}']) == 1
        assert capsys.readouterr().err == f'harness.py: error: {msg}\n'
        assert not tasks.exists()  # refused before the tasks were built, let alone evaluated
    # out_dir may be a checkpoint file (as in sample.py): its results go beside it, not into it
    assert harness.results_path(dict(out_json='', out_dir=ckpt)) == os.path.join(ckpts['baseline'], 'ckpt.harness.json')
    assert harness.results_path(dict(out_json='', out_dir=ckpts['baseline'])) == os.path.join(ckpts['baseline'],
                                                                                              'harness.json')


def test_a_checkpoint_file_as_out_dir_end_to_end(ckpts, task_dir, tmp_path, capsys):
    lm_eval_or_skip()
    import shutil
    ckpt = tmp_path / 'ckpt_000002.pt'
    shutil.copy(os.path.join(ckpts['baseline'], 'ckpt.pt'), ckpt)
    assert harness.main([f'--out_dir={ckpt}', '--tasks=lime_cloze', f'--task_dir={task_dir}', '--limit=2',
                         '--bootstrap_iters=0']) == 0
    res = json.loads((tmp_path / 'ckpt_000002.harness.json').read_text())
    assert 0 <= res['policies']['causal']['results']['lime_cloze']['acc,none'] <= 1
    assert f"wrote {tmp_path / 'ckpt_000002.harness.json'}" in capsys.readouterr().out


# --- BLiMP ----------------------------------------------------------------------------

BLIMP = {  # UID: (field, [(good, bad)]): the official format's fields, written here (no ties by construction)
    'determiner_noun_agreement_1': ('morphology', [
        ('Raymond is selling this sketch.', 'Raymond is selling this sketches.'),
        ('Carl cures those horses.', 'Carl cures that horses.'),
        ('The boys were walking to those schools.', 'The boys were walking to that schools.'),
        ('Sarah liked these books.', 'Sarah liked this books.'),
        ('A man fixed this car.', 'A man fixed these car.'),
        ('Those dogs ran away.', 'That dogs ran away.')]),
    'regular_plural_subject_verb_agreement_1': ('morphology', [
        ('The dogs are barking.', 'The dogs is barking.'),
        ('Paula references Robert.', 'Paula reference Robert.'),
        ('The cats were sleeping.', 'The cats was sleeping.'),
        ('Some teachers have left.', 'Some teachers has left.'),
        ('This girl is singing.', 'This girl are singing.')]),
    'wh_questions_object_gap': ('syntax', [
        ('Who did John see?', 'Who did John see Mary?'),
        ('What had the man bought?', 'What had the man bought a car?'),
        ('Which book did Alice read?', 'Which book did Alice read the paper?'),
        ('Who has Martha helped?', 'Who has Martha helped Tom?')]),
    'existential_there_quantifiers_1': ('semantics', [
        ('There was a cat in the garden.', 'There was every cat in the garden.'),
        ('There were some boys at the party.', 'There were all boys at the party.'),
        ('There is a book on the table.', 'There is each book on the table.')]),
}


def write_blimp(d, swap=False, keep=None, extra=True):
    """BLiMP's official format, one file per paradigm; keep: pairIDs to write (in that order)."""
    os.makedirs(d, exist_ok=True)
    for uid, (field, pairs) in BLIMP.items():
        rows = [dict(sentence_good=b if swap else g, sentence_bad=g if swap else b, field=field,
                     linguistics_term='x', UID=uid, simple_LM_method=True, pairID=str(i))
                for i, (g, b) in enumerate(pairs)]
        if keep is not None:
            rows = [rows[i] for i in keep if i < len(rows)]
        if not extra:
            rows = [{k: r[k] for k in ('sentence_good', 'sentence_bad', 'field', 'UID', 'pairID')} for r in rows]
        (d / f'{uid}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return d


@pytest.fixture(scope='module')
def blimp_ckpts(tmp_path_factory):
    """Models whose block holds a whole BLiMP sentence in gpt2-512 tokens."""
    d = tmp_path_factory.mktemp('blimp_models')
    return {k: make_ckpt(d / k, KINDS[k][0], KINDS[k][1], predict=KINDS[k][2], block_size=64, seed=20 + i)
            for i, k in enumerate(('baseline', 'lime', 'lime1', 'predict'))}


def run_blimp(out_dir, bdir, tmp_path, *flags):
    out = tmp_path / f'b{len(list(tmp_path.iterdir()))}.json'
    cfg = harness.configure([f'--out_dir={out_dir}', '--tasks=blimp', f'--blimp_dir={bdir}',
                             f'--blimp_task_dir={tmp_path / "tasks"}', f'--out_json={out}', '--batch_size=7', *flags])
    buf = io.StringIO()
    res = harness.run(cfg, out=buf)
    assert json.loads(out.read_text())['policies'].keys() == res.keys()
    return res, buf.getvalue()


@pytest.mark.parametrize('kind', ['baseline', 'lime', 'predict'])
def test_blimp_swapped_sentences_give_one_minus_the_accuracy(blimp_ckpts, tmp_path, kind):
    lm_eval_or_skip()
    a, _ = run_blimp(blimp_ckpts[kind], write_blimp(tmp_path / 'a'), tmp_path)
    b, _ = run_blimp(blimp_ckpts[kind], write_blimp(tmp_path / 'b', swap=True), tmp_path)
    (pa, ra), = a.items()
    rb = b[pa]['blimp']
    ra = ra['blimp']
    assert ra['n_pairs'] == rb['n_pairs'] == sum(len(p) for _, p in BLIMP.values())
    for uid in BLIMP:  # pair by pair: exactly the other sentence wins (a tie would count in both)
        assert {i: 1 - c for i, c in ra['correct'][uid].items()} == rb['correct'][uid]
        assert rb['paradigms'][uid] == pytest.approx(1 - ra['paradigms'][uid])
    assert rb['overall'] == pytest.approx(1 - ra['overall'])
    assert 0 < ra['overall'] < 1  # the test data separates the two (not all one way)
    mean = lambda f: np.mean([ra['paradigms'][u] for u, (g, _) in BLIMP.items() if g == f])
    assert ra['fields'] == pytest.approx({f: mean(f) for f in ('morphology', 'semantics', 'syntax')})
    assert ra['overall'] == pytest.approx(np.mean(list(ra['paradigms'].values())))  # paradigms weigh the same


def test_blimp_subset_of_pairs_equals_the_same_pairs_in_the_full_files(blimp_ckpts, tmp_path):
    lm_eval_or_skip()
    full, _ = run_blimp(blimp_ckpts['predict'], write_blimp(tmp_path / 'full'), tmp_path)
    part, _ = run_blimp(blimp_ckpts['predict'], write_blimp(tmp_path / 'part', keep=[4, 1, 3], extra=False), tmp_path)
    f, p = full['predict']['blimp'], part['predict']['blimp']
    assert p['n_pairs'] == sum(len([i for i in (4, 1, 3) if i < len(v[1])]) for v in BLIMP.values())
    for uid in BLIMP:
        assert p['correct'][uid] == {i: c for i, c in f['correct'][uid].items() if int(i) in (4, 1, 3)}


def test_blimp_sentence_score_is_the_log_probability_after_the_separator(blimp_ckpts, tmp_path):
    """The whole sentence, no leading space, after <|endoftext|>: for a self-predicting model the
    sum of its per-token marginals (next tags summed out exactly), for LIME with causal tags."""
    lm_eval_or_skip()
    from lm_eval.tasks import TaskManager
    info = harness.build_blimp_tasks(str(write_blimp(tmp_path / 'd')), str(tmp_path / 't'))
    uid = 'wh_questions_object_gap'
    for kind in ('predict', 'lime'):
        lm = harness.make_lm(out_dir=blimp_ckpts[kind])
        res = harness.evaluate(lm, [f'lime_blimp_{uid}'], str(tmp_path / 't'), log_samples=True)
        model, text = lm.scorer.model, lm.scorer.text
        for s in res['samples'][f'lime_blimp_{uid}']:
            lls = [ll for ll, _ in s['filtered_resps']]
            assert s['acc'] == float(lls[0] > lls[1])  # correct: the grammatical sentence is the likelier
            for sent, ll in zip((s['doc']['sentence_good'], s['doc']['sentence_bad']), lls):
                seq = [text.eot] + text.encode(sent)
                C = causal(seq)
                meta = {st: C[base(st)][:-1] for st in lm.scorer.streams}
                nxt = {st: C[base(st)][1:] for st in lm.scorer.streams}
                want = (direct_marginal(model, seq, len(seq) - 1, meta, nxt) if kind == 'predict'
                        else direct_ll(model, seq, len(seq) - 1, meta)[0])
                assert ll == pytest.approx(want, abs=1e-4), sent
    assert info[uid] == ('syntax', 4)


def test_blimp_policies_oracle_marked_and_full_refused(blimp_ckpts, tmp_path):
    lm_eval_or_skip()
    bdir = write_blimp(tmp_path / 'd')
    res, printed = run_blimp(blimp_ckpts['lime1'], bdir, tmp_path, '--tag_policy=causal,oracle')
    assert set(res) == {'causal', 'oracle'} and res['oracle']['lime']['oracle']
    assert 'ORACLE' in printed and printed.count('BLiMP overall') == 2
    res, printed = run_blimp(blimp_ckpts['predict'], bdir, tmp_path)
    assert res['predict']['lime']['likelihood'] == 'exact marginal' and 'exact marginal' in printed
    with pytest.raises(common.LimeError, match="'full' is refused"):
        run_blimp(blimp_ckpts['lime'], bdir, tmp_path, '--tag_policy=full')


def test_blimp_reads_official_files_and_refuses_broken_ones(tmp_path):
    d = write_blimp(tmp_path / 'd', keep=[2, 0])  # any subset of pairIDs, extra keys as in the official files
    info = harness.build_blimp_tasks(str(d), str(tmp_path / 't'))
    assert info == {u: (f, min(2, len(p))) for u, (f, p) in BLIMP.items()}
    assert sorted(os.listdir(tmp_path / 't')) == sorted([f'lime_blimp_{u}.yaml' for u in BLIMP] + ['lime_blimp.yaml'])
    uid = 'wh_questions_object_gap'
    good = (d / f'{uid}.jsonl').read_text().splitlines()
    cases = {'not JSON': '{"sentence_good": ', "'sentence_bad' missing": json.dumps(
        {k: v for k, v in json.loads(good[0]).items() if k != 'sentence_bad'}),
        'not the file': json.dumps({**json.loads(good[0]), 'UID': 'other'}), 'twice': good[0]}
    for msg, line in cases.items():
        (d / f'{uid}.jsonl').write_text('\n'.join(good + [line]) + '\n')
        with pytest.raises(common.LimeError, match=msg) as e:
            harness.build_blimp_tasks(str(d), str(tmp_path / 't'))
        assert str(d / f'{uid}.jsonl') in str(e.value) and '\n' not in str(e.value)
    (d / f'{uid}.jsonl').write_text('')
    with pytest.raises(common.LimeError, match='no pairs'):
        harness.build_blimp_tasks(str(d), str(tmp_path / 't'))
    with pytest.raises(common.LimeError, match='not a directory'):
        harness.resolve_blimp_dir(str(tmp_path / 'missing'))
    # a paradigm removed from the directory loses its task
    (d / f'{uid}.jsonl').unlink()
    harness.build_blimp_tasks(str(d), str(tmp_path / 't'))
    assert f'lime_blimp_{uid}.yaml' not in os.listdir(tmp_path / 't')


@pytest.mark.parametrize('kind,policy,k', [('baseline', '', 0), ('lime', 'causal', 0), ('lime1_causal', 'causal', 0),
                                           ('lime1', 'oracle', 0), ('predict', 'predict', 0), ('predict', 'predict', 2),
                                           ('predict_full', 'predict', 0)])
def test_requests_sharing_a_prefix_score_as_they_do_alone(ckpts, kind, policy, k):
    """Targets in a prefix two requests share are computed once: the results equal scoring each alone."""
    s = harness.Scorer(ckpts[kind], policy, batch_size=3, marginal_k=k)
    e = s.text.encode
    pairs = [([s.text.eot], e('The ship was late')), ([s.text.eot], e('The ship was early')),
             ([s.text.eot], e('The ship')), (e('He said'), e(' that the ship was late')),
             (e('He said that'), e(' the ship was late')), ([s.text.eot], e('The ship was late'))]
    together = s.loglikelihood(pairs)
    for p, (ll, g) in zip(pairs, together):
        (ll1, g1), = s.loglikelihood([p])
        assert ll == pytest.approx(ll1, abs=1e-5) and g == g1


def test_blimp_untrained_model_is_near_chance(tmp_path):
    """An untrained model (GPT-2 init, the full vocabulary) on the first 20 pairs of every paradigm."""
    lm_eval_or_skip()
    src = ROOT.parent / 'shared' / 'blimp' / 'data'
    if not src.is_dir():
        pytest.skip('../shared/blimp/data not present')
    d = tmp_path / 'blimp'
    d.mkdir()
    for f in sorted(src.glob('*.jsonl')):
        (d / f.name).write_text(''.join(f.read_text().splitlines(keepends=True)[:20]))
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, bias=False))
    os.makedirs(tmp_path / 'm')
    torch.save(dict(model=m.state_dict(), model_args=dict(vars(m.config)), config=dict(),
                    dataset=dict(vocab_size=50257, tokenizer='gpt2', tokenization='lime', ner='binary', eot_token=50256,
                                 streams={})), tmp_path / 'm' / 'ckpt.pt')
    res, _ = run_blimp(str(tmp_path / 'm'), d, tmp_path, '--batch_size=64')
    b = res['causal']['blimp']
    assert b['n_pairs'] == 20 * 67
    assert 0.4 < b['overall'] < 0.6, b['overall']


def test_a_token_classes_control_is_scored_with_its_classes(ckpts, tmp_path):
    """A meta_classes='token' model read each token's class, not its tags: the harness feeds it the same."""
    ck = torch.load(os.path.join(ckpts['predict'], 'ckpt.pt'), weights_only=True)
    g = torch.Generator().manual_seed(3)
    V, n_tags = ck['model_args']['vocab_size'], ck['model_args']['meta_n_tags']
    ck['classes'] = {s: torch.randint(0, n, (V,), generator=g) for s, n in zip(ck['model_args']['meta_streams'], n_tags)}
    ck['config']['meta_classes'] = 'token'
    os.makedirs(tmp_path / 'c')
    torch.save(ck, tmp_path / 'c' / 'ckpt.pt')
    s = harness.Scorer(str(tmp_path / 'c'))
    seq = [s.text.eot] + s.text.encode('The ship was late again')
    cl = {k: v.numpy()[np.array(seq)] for k, v in ck['classes'].items()}
    (ll, _), = s.loglikelihood([([s.text.eot], seq[1:])])
    want = direct_marginal(s.model, seq, len(seq) - 1, {k: v[:-1] for k, v in cl.items()}, {k: v[1:] for k, v in cl.items()})
    assert ll == pytest.approx(want, abs=1e-4)
    with pytest.raises(common.LimeError, match='no generation'):
        s.generate(seq[:3], max_new_tokens=2)


def test_tags_that_add_nothing_are_scored_exactly_at_any_k(tmp_path):
    """meta_weight 0 (the tag loss alone): every next tag gives the token the same probability, so
    the marginal is the plain log-probability, exact whatever marginal_k (a top-k sum would lose
    the tags outside the top k)."""
    d = make_ckpt(tmp_path / 'aux', KINDS['predict'][0], predict=True, block_size=24, meta_weight=(0.0, 0.0))
    s = harness.Scorer(d, marginal_k=2)
    assert s.ll_kind == 'exact marginal'
    seq = [s.text.eot] + s.text.encode('The ship was late again')
    (ll, _), = s.loglikelihood([([s.text.eot], seq[1:])])
    C = causal(seq)
    meta = {st: C[base(st)][:-1] for st in s.streams}
    nxt = {st: C[base(st)][1:] for st in s.streams}
    assert ll == pytest.approx(direct_marginal(s.model, seq, len(seq) - 1, meta, nxt), abs=1e-4)
    assert ll > direct_marginal(s.model, seq, len(seq) - 1, meta, nxt, top_k=2) + 1e-3
