"""Causal metadata (issue 4): annotate_causal must equal the definition
causal(ids)[t] = full(ids[d:t+1])[t-d], implemented by annotate_causal_reference (quadratic)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
import metadata as md  # noqa: E402  (conftest puts the repo root on sys.path)

pytest.importorskip('nltk')
try:
    md.ensure_resources('binary')
    md.encoding()
except Exception as e:  # no NLTK data / tiktoken cache here
    pytest.skip(f'metadata resources unavailable: {e}', allow_module_level=True)

NER = 'binary'
EOT = 50256

TRICKY = [
    "The old man the boat. Mr. Smith went to Washington. He said \"Stop!\" Then he left.\n",
    "  Leading spaces.\r\nCRLF line.\tTab here...  \"Quoted.\" 'Single.' It's U.S. policy; don't.\n\nNew para",
    "Emoji 😀 test. Café naïve résumé — “curly quotes.” Visit http://example.com/a.b?c=1 now! 3.14 is pi.",
    "Dr. J. R. R. Tolkien wrote it. (Really.) [Yes!] He asked: why? No... Maybe.\"\n\"Next.",
    "I can't believe it's not butter. John Smith and Mary Jones met in New York City on Jan. 5, 2020.",
    "Ends with a quote.\" She smiled.' And 'tis done!!  Wow?!   What    about   runs\n\n\n\nof space",
    "日本語のテキスト。 Mixed 中文 text 🤖🤖 with 👍🏽 and e\u0301 combining. Cost: $5.00 (approx.)",
    "cannot gonna 'em o'clock ''double'' ``tex quotes'' -- dashes -- and... ellipses . . . end",
]


def _ids(text, how):
    if how == 'lime':
        return md.annotate_text(text, 'lime', NER)[0].tolist()
    return md.encoding().encode_ordinary(text)


def _assert_equal(ids):
    ref = md.annotate_causal_reference(ids, NER)
    got = md.annotate_causal(ids, NER)
    assert set(ref) == set(got) == {'pos_causal', 'ner_causal'}
    for k in ref:
        bad = np.nonzero(ref[k] != got[k])[0]
        assert len(bad) == 0, (k, int(bad[0]), md.encoding().decode(list(ids[:bad[0] + 1]))[-60:])


@pytest.mark.parametrize('how', ['lime', 'plain'])
def test_tricky_texts_equal_reference(how):
    for text in TRICKY:
        _assert_equal(_ids(text, how))


def _corpus_docs(rng, n, lo=40, hi=300):
    from nltk.corpus import gutenberg
    fids = gutenberg.fileids()
    docs = []
    for _ in range(n):
        raw = gutenberg.raw(rng.choice(fids))
        a = rng.randrange(len(raw) - 2000)
        docs.append(raw[a:a + rng.randrange(lo, hi)])
    return docs


def _joined_sentence_docs(rng, n):
    """Documents made of corpus sentences joined with varied whitespace."""
    from nltk.corpus import treebank, brown
    pools = []
    for corpus in (treebank, brown):
        try:
            pools.append(corpus.sents()[:3000])
        except LookupError:
            pass
    if not pools:
        return []
    docs = []
    for _ in range(n):
        pool = rng.choice(pools)
        parts = []
        for _ in range(rng.randrange(1, 4)):
            s = pool[rng.randrange(len(pool))]
            parts.append(' '.join(w for w in s if not w.startswith('*') and w not in ('0', '-NONE-'))[:200])
            parts.append(rng.choice([' ', '  ', '\n', '\n\n', '\r\n', '\t', ' \n ']))
        text = ''.join(parts)
        if rng.random() < 0.5:
            text = text.rstrip()
        docs.append(text)
    return docs


def test_random_corpus_documents_equal_reference():
    rng = random.Random(1234)
    for text in _corpus_docs(rng, 12) + _joined_sentence_docs(rng, 8):
        _assert_equal(_ids(text, rng.choice(['lime', 'plain'])))


def test_simple_token_path_equals_general_path(monkeypatch):
    # _causal_doc handles most tokens by a short path (prefix ending in a letters-only word);
    # on real text it must give exactly what the general path gives for the same tokens
    # CI: 120k characters of two books; LIME_FULL_CHECK=1: all of Gutenberg in 20k-character
    # documents (about 4M tokens, a few minutes)
    from nltk.corpus import gutenberg
    if os.environ.get('LIME_FULL_CHECK'):
        texts = [t[k:k + 20000] for t in map(gutenberg.raw, gutenberg.fileids()) for k in range(0, len(t), 20000)]
    else:
        texts = [gutenberg.raw('austen-persuasion.txt')[:60000] + gutenberg.raw('chesterton-thursday.txt')[:60000]]
    for text in texts:
        for how in ('lime', 'plain'):
            ids = _ids(text, how)
            got = md.annotate_causal(np.array(ids), NER)
            # the short path does take most tokens (else this test would check little)
            assert md._CAUSAL_STATS['simple'] > 0.5 * md._CAUSAL_STATS['tokens'], md._CAUSAL_STATS
            monkeypatch.setattr(md, '_CAUSAL_SIMPLE_TOKENS', False)
            general = md.annotate_causal(np.array(ids), NER)
            monkeypatch.setattr(md, '_CAUSAL_SIMPLE_TOKENS', True)
            for k in got:
                assert np.array_equal(got[k], general[k]), (how, k, np.nonzero(got[k] != general[k])[0][:5])


def test_reference_causal_path_equals_fast():
    # --reference: the same causal bookkeeping with NLTK's own taggers (one token at a time)
    from nltk.corpus import gutenberg
    text = TRICKY[0] + TRICKY[4] + gutenberg.raw('chesterton-thursday.txt')[20000:26000]
    ids = np.array(_ids(text, 'lime'))
    fast = md.annotate_causal(ids, NER)
    ref = md.annotate_causal(ids, NER, reference=True)
    for k in fast:
        assert np.array_equal(fast[k], ref[k]), k


def test_multi_document_stream_and_random_cuts():
    rng = random.Random(7)
    docs = [_ids(t, 'plain') for t in TRICKY[:3] + _corpus_docs(rng, 2)]
    stream = []
    for d in docs:
        stream += d + [EOT]
    stream = [EOT, EOT] + stream
    ids = np.array(stream)
    ref = md.annotate_causal_reference(ids, NER)
    got = md.annotate_causal(ids, NER)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
        assert np.all(got[k][ids == EOT] == md.PAD)
    # a stream cut anywhere (also mid-character: emoji are split over several tokens)
    for cut in rng.sample(range(1, len(ids)), 6):
        part = md.annotate_causal(ids[:cut], NER)
        for k in got:
            assert np.array_equal(part[k], got[k][:cut]), (k, cut)


def test_invariance_to_future_tokens():
    rng = np.random.default_rng(0)
    base = np.array(_ids(TRICKY[0] + TRICKY[4], 'lime'))
    full = md.annotate_causal(base, NER)
    vocab = np.array(_ids(' the boat. Mr. 😀 "quoted" Washington ! \n', 'plain'))
    for _ in range(6):
        t = int(rng.integers(1, len(base) - 1))
        changed = base.copy()
        changed[t + 1:] = rng.choice(vocab, len(base) - t - 1)
        got = md.annotate_causal(changed, NER)
        for k in full:
            assert np.array_equal(got[k][:t + 1], full[k][:t + 1]), (k, t)


def test_garden_path_full_and_causal_differ():
    # NLTK tags 'The old man the boat.' identically either way; here full tagging reads
    # 'houses' after 'complex' (JJ) while the prefix 'The complex' ends in a noun (NN)
    text = 'The complex houses married and single soldiers.'
    ids, full = md.annotate_text(text, 'lime', NER)
    causal = md.annotate_causal(ids, NER)
    assert np.array_equal(causal['pos_causal'], md.annotate_causal_reference(ids, NER)['pos_causal'])
    names = md.stream_tags('pos', NER)
    toks = [md.encoding().decode([i]) for i in ids.tolist()]
    diff = [(toks[t], names[full['pos'][t]], names[causal['pos_causal'][t]])
            for t in range(len(ids)) if full['pos'][t] != causal['pos_causal'][t]]
    assert (' complex', 'JJ', 'NN') in diff, diff
    # the last token sees the whole text: causal = full there
    assert causal['pos_causal'][-1] == full['pos'][-1]


def _run(args, **kw):
    env = dict(os.environ)
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, **kw)


def test_prepare_causal_streams_equal_cli(tmp_path):
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'a.txt').write_text(TRICKY[0] + TRICKY[2], encoding='utf-8')
    (inp / 'b.txt').write_text(TRICKY[3], encoding='utf-8')
    out = tmp_path / 'out'
    r = _run([str(ROOT / 'prepare.py'), '--input', str(inp), '--ner', NER, '--out_dir', str(out),
              '--val_fraction', '0', '--workers', '1', '--no_progress'], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    ids = np.fromfile(out / 'train.bin', dtype=np.uint16)
    pos_c = np.fromfile(out / 'train.pos_causal.bin', dtype=np.uint16)
    ner_c = np.fromfile(out / 'train.ner_causal.bin', dtype=np.uint16)
    assert len(ids) == len(pos_c) == len(ner_c)
    (tmp_path / 'ids.txt').write_text(' '.join(map(str, ids.tolist())))
    r = _run([str(ROOT / 'metadata.py'), str(tmp_path / 'ids.txt'), '--ids', '--tags', 'causal',
              '--ner', NER], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row['id'] for row in rows] == ids.tolist()
    pos_names, ner_names = md.stream_tags('pos', NER), md.stream_tags('ner', NER)
    assert [row['pos'] for row in rows] == [pos_names[i] for i in pos_c.tolist()]
    assert [row['ner'] for row in rows] == [ner_names[i] for i in ner_c.tolist()]


def test_fast_resume_equals_nltk():
    """The fast resumption (batched numpy taggers) equals NLTK's per-word continuation on
    random jobs: corpus sentences, random start (0, 1, 2, near the end, anywhere) and stop,
    with the true previous tags / NE history and with arbitrary ones."""
    from nltk.corpus import gutenberg
    rng = random.Random(99)
    fids = gutenberg.fileids()
    sents = []
    for fid in rng.sample(fids, 6):
        ss = gutenberg.sents(fid)
        for _ in range(60):
            s = list(ss[rng.randrange(min(len(ss), 3000))])
            if s:
                sents.append(s)
    sents += [list(s) for s in ([w for w in "Mr. John Smith of New York met Mary .".split()],
                                ['Stop', '!'], ['x'], ['The'])]
    pos = md.pos_tag_sents(sents, reference=True)
    tagged = [list(zip(w, p)) for w, p in zip(sents, pos)]
    raw = md.ner_raw_resume([(t, 0, [], len(t)) for t in tagged], NER, reference=True)
    # the full raw pass
    assert md.ner_raw_resume([(t, 0, [], len(t)) for t in tagged], NER) == raw
    assert md._ne_chunker(NER, False).raw_sents(tagged) == raw

    def start_stop(n):
        a = rng.choice([0, 0, 1, 2, n - 1, n - 2, n - 3, rng.randrange(n)])
        a = min(max(a, 0), n - 1)
        b = rng.choice([n, n, a + 1, rng.randrange(a + 1, n + 1)])
        return a, b

    pjobs, njobs = [], []
    labels = sorted({r for rs in raw for r in rs} | {'O', 'B-NE', 'I-NE'})
    for _ in range(800):
        k = rng.randrange(len(sents))
        n = len(sents[k])
        a, b = start_stop(n)
        prev = pos[k][max(0, a - 2):a]
        if rng.random() < 0.3:
            prev = [rng.choice(md.POS_TAGS) for _ in prev]
        pjobs.append((sents[k], a, prev, b))
        a, b = start_stop(n)
        hist = raw[k][:a]
        if rng.random() < 0.3:
            hist = [rng.choice(labels) for _ in hist]
        toks = tagged[k] if rng.random() < 0.7 else [(w, rng.choice(md.POS_TAGS)) for w, _ in tagged[k]]
        njobs.append((toks, a, hist, b))
    assert md.pos_tag_resume(pjobs, reference=False) == md.pos_tag_resume(pjobs, reference=True)
    assert md.ner_raw_resume(njobs, NER, reference=False) == md.ner_raw_resume(njobs, NER, reference=True)
    # resuming at 0 with no history is plain tagging
    assert md.pos_tag_resume([(s, 0, [], len(s)) for s in sents]) == pos
