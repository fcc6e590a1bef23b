"""metadata.py: spans, tags, alignment rules, losslessness, the CLI, resource errors.
Uses the real NLTK models and tiktoken (NLTK_DATA / TIKTOKEN_CACHE_DIR, see README)."""
import os
from pathlib import Path
import sys
import json
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metadata as md  # noqa: E402
import nltk_fast  # noqa: E402

TRICKY = [
    "Hello,\r\nworld.\r\nCRLF line endings\r\n",
    "\ttabs\tinside\t\tand  runs   of    spaces\n\n\n\nand newlines",
    'She said "yes" and \u201cno\u201d and \u2018maybe\u2019 \'ok\' -- ``odd\'\' quotes.',
    "I can't, won't, didn't; y'all'd've O'Neill's rock 'n' roll.",
    "See https://example.com/a?b=1&c=2#frag or mail me@x.org at 3:45pm.",
    "Numbers: 3.14, -2, 1,000,000, $20.50, 50%, 1e-9, 2024-01-01.",
    "Emoji \U0001F600\U0001F44D\U0001F3FD and CJK \u4e2d\u6587 and \u00e9l\u00e8ve caf\u00e9 na\u00efve \u00fc\u00df.",
    "no final newline",
    "   \n  leading whitespace and trailing   ",
    "Mr. Smith went to Washington D.C. on Jan. 5. He met Dr. Jones of the U.S. Army!",
    "\u00a0non\u00a0breaking\u2003spaces\u200b and zero width",
    "",
    "   ",
]

def nltk_reference(text, binary=True):
    """Words and tags computed directly with NLTK (punkt + span tokenizer + pos_tag + ne_chunk)."""
    import nltk
    from nltk.tokenize import PunktTokenizer, NLTKWordTokenizer
    from nltk.chunk import tree2conlltags
    words, pos, ner = [], [], []
    # the sentences first: NLTK's regex time limit (5 s) runs while punkt's lazy iterator is
    # suspended, and the first ne_chunk below loads the chunker (seconds on a loaded machine)
    for s, e in list(PunktTokenizer('english').span_tokenize(text)):
        ws = [text[s + a:s + b] for a, b in NLTKWordTokenizer().span_tokenize(text[s:e])]
        if not ws:
            continue
        tagged = nltk.pos_tag(ws)
        words += ws
        pos += [t for _, t in tagged]
        ner += [iob for _, _, iob in tree2conlltags(nltk.ne_chunk(tagged, binary=binary))]
    return words, pos, ner

@pytest.mark.parametrize('tokenization', md.TOKENIZATIONS)
@pytest.mark.parametrize('text', TRICKY)
def test_lossless_and_lengths(text, tokenization):
    ids, streams = md.annotate_text(text, tokenization, 'binary')
    assert md.encoding().decode_bytes(ids.tolist()) == text.encode('utf-8')
    assert set(streams) == {'pos', 'ner', 'word'}
    for v in streams.values():
        assert v.dtype == np.uint16 and len(v) == len(ids)
    if tokenization == 'plain':
        assert ids.tolist() == md.encoding().encode_ordinary(text)

def test_tags_equal_nltk():
    text = " ".join(TRICKY[2:7] + TRICKY[9:10]) + " Barack Obama visited New York and Paris with Angela Merkel."
    starts, ends, pos_ids, ner_ids = md.analyze(text, 'binary', reference=True)
    words, pos, ner = nltk_reference(text)
    assert [text[a:b] for a, b in zip(starts, ends)] == words
    names_pos, names_ner = md.stream_tags('pos', 'binary'), md.stream_tags('ner', 'binary')
    assert [names_pos[i] for i in pos_ids] == pos
    assert [names_ner[i] for i in ner_ids] == ner
    assert 'B-NE' in ner and 'I-NE' in ner
    # the default (fast) path gives the same tags as the reference
    s2, e2, p2, n2 = md.analyze(text, 'binary')
    assert (s2 == starts).all() and (p2 == pos_ids).all() and (n2 == ner_ids).all()

def test_lime_tokens_carry_their_words_tags():
    text = "The unbelievably antidisestablishmentarian Mr. O'Neill didn't visit New York."
    ids, st = md.annotate_text(text, 'lime', 'binary')
    starts, ends, pos_ids, ner_ids = md.analyze(text, 'binary')
    # rebuild per-token word index from the BPE pieces: every token lies inside one chunk
    enc = md.encoding()
    off, w = 0, []
    for t in ids.tolist():
        n = len(enc.decode_single_token_bytes(t).decode('utf-8'))
        mid = [i for i in range(len(starts)) if starts[i] < off + n and ends[i] > off]
        assert len(mid) <= 1, 'a lime token crosses a word boundary'
        w.append(mid[0] if mid else -1)
        off += n
    for i, wi in enumerate(w):
        exp_pos = md.SPACE if wi < 0 else pos_ids[wi]
        assert st['pos'][i] == exp_pos and st['ner'][i] == (md.SPACE if wi < 0 else ner_ids[wi])
    # repeat rule: a multi-token word gives every piece its tag; word stream is B then I...
    long = [i for i, wi in enumerate(w) if wi == 2]  # antidisestablishmentarian
    assert len(long) > 2
    assert st['word'][long[0]] == 3 and all(st['word'][i] == 4 for i in long[1:])
    tags = md.stream_tags('ner', 'binary')
    assert [tags[st['ner'][i]] for i, wi in enumerate(w) if text[starts[wi]:ends[wi]] in ('New', 'York')] \
        == ['B-NE', 'I-NE']

def test_whitespace_tokens_get_space():
    for tok in ('lime', 'plain'):
        ids, st = md.annotate_text("a\n\n\n\nb\t\t c", tok, 'binary')
        enc = md.encoding()
        for i, t in enumerate(ids.tolist()):
            if enc.decode_single_token_bytes(t).decode('utf-8').isspace():
                assert st['pos'][i] == md.SPACE and st['ner'][i] == md.SPACE and st['word'][i] == md.SPACE
                assert md.stream_tags('pos', 'binary')[md.SPACE] == '<space>'

def test_plain_alignment_largest_overlap():
    # "didn't" is one word chunk pair did|n't; plain BPE gives "didn" + "'t"
    text = "He didn't."
    ids, st = md.annotate_text(text, 'plain', 'binary')
    enc = md.encoding()
    pieces = [enc.decode_single_token_bytes(t).decode() for t in ids.tolist()]
    assert pieces == ['He', ' didn', "'t", '.']
    names = md.stream_tags('pos', 'binary')
    # ' didn' overlaps 'did' (3 chars) and "n't" (1 char): takes did's tag VBD; "'t" -> n't: RB
    assert [names[i] for i in st['pos']] == ['PRP', 'VBD', 'RB', '.']
    assert [st['word'][i] for i in range(4)] == [3, 3, 3, 3]  # "'t" starts the word n't

def test_align_rule_ties_and_no_word():
    starts, ends = np.array([0, 2, 10]), np.array([2, 4, 12])
    ts, te = np.array([0, 1, 5, 9, 11]), np.array([4, 3, 8, 11, 13])
    # (0,4): ties 2 vs 2 -> first; (1,3): 1 vs 1 -> first; (5,8): none; (9,11) -> word 2
    assert md.align(ts, te, starts, ends).tolist() == [0, 0, -1, 2, 2]
    assert md.align(np.array([1]), np.array([4]), starts, ends).tolist() == [1]  # 1 vs 2 -> second

@pytest.mark.parametrize('text', [t for t in TRICKY if t.strip()])
def test_annotate_ids_matches_lime(text):
    ids, st = md.annotate_text(text, 'lime', 'binary')
    st2 = md.annotate_ids(ids, 'binary')
    for k in st:
        assert (st[k] == st2[k]).all(), k

def test_annotate_ids_documents_and_partial_utf8():
    enc = md.encoding()
    a, b = enc.encode_ordinary("First doc here."), enc.encode_ordinary("Second \U0001F600 one")
    ids = np.array(a + [enc.eot_token] + b + [enc.eot_token], dtype=np.int64)
    st = md.annotate_ids(ids, 'binary')
    assert st['pos'][len(a)] == md.PAD and st['pos'][-1] == md.PAD and st['ner'][-1] == md.PAD
    assert (st['pos'][:len(a)] == md.annotate_ids(np.array(a), 'binary')['pos']).all()
    # a stream cut inside a multi-byte character still annotates (U+FFFD for the cut bytes)
    cut = np.array(b[:-2])
    text, _ = md.decode_text(cut)
    assert '\ufffd' in text
    st = md.annotate_ids(cut, 'binary')
    assert len(st['pos']) == len(cut) and (st['pos'] != md.PAD).all()

def test_tag_vocabularies_fixed():
    from nltk.tag import PerceptronTagger
    assert sorted(PerceptronTagger().classes) == md.POS_TAGS
    pos = md.stream_tags('pos', 'typed')
    assert pos[:3] == ['<pad>', '<space>', '<unk>'] and len(pos) == 48
    assert md.stream_tags('ner', 'binary') == ['<pad>', '<space>', '<unk>', 'O', 'B-NE', 'I-NE']
    assert len(md.stream_tags('ner', 'typed')) == 3 + 1 + 12
    assert md.stream_tags('pos_causal', 'binary') == md.stream_tags('pos', 'binary')
    with pytest.raises(md.MetadataError):
        md.stream_tags('lemma', 'binary')

def run_cli(args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'metadata.py')] + args, input=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout)

def test_cli_text_and_ids(tmp_path):
    text = "The old man the boat. Mr. O'Neill didn't visit New York in 2024!"
    r = run_cli(['--ner', 'binary'], stdin=text)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert set(rows[0]) == {'id', 'text', 'pos', 'ner'}
    assert ''.join(x['text'] for x in rows) == text
    assert [x['ner'] for x in rows if x['text'] in (' New', ' York')] == ['B-NE', 'I-NE']
    assert [x['pos'] for x in rows if x['text'] == ' 2024'] == ['CD']
    # --ids on the same tokens gives the same rows; FILE argument works too
    f = tmp_path / 'ids.txt'
    f.write_text(' '.join(str(x['id']) for x in rows))
    r2 = run_cli([str(f), '--ids', '--ner', 'binary'])
    assert r2.returncode == 0, r2.stderr
    assert [json.loads(l) for l in r2.stdout.splitlines()] == rows
    r3 = run_cli(['--tokenization', 'plain', '--ner', 'none'], stdin=text)
    assert r3.returncode == 0 and json.loads(r3.stdout.splitlines()[0])['ner'] is None

def test_cli_errors(tmp_path):
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'caf\xe9 latin-1')
    r = run_cli([str(bad), '--ner', 'binary'])
    assert r.returncode != 0 and 'bad.txt' in r.stderr and 'UTF-8' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(['--ids', '--ner', 'binary'], stdin='1 2 x')
    assert r.returncode != 0 and 'integers' in r.stderr
    r = run_cli(['--ner', 'fancy'], stdin='x')
    assert r.returncode != 0 and 'typed' in r.stderr and 'binary' in r.stderr

def test_cli_input_errors_are_one_line(tmp_path, capsys):
    # a missing file, a directory, token ids that are no numbers or out of range: one line naming
    # the file (and option) and the problem, exit 1
    (tmp_path / 'somedir').mkdir()
    ids = tmp_path / 'ids.txt'
    cases = [([str(tmp_path / 'missing.txt')], 'missing.txt: No such file or directory'),
             ([str(tmp_path / 'somedir') + '/'], 'somedir/: is a directory'),
             ([str(ids), '--ids'], 'ids.txt: --ids: token id 12345678901234567890 out of range 0..50256', '1 12345678901234567890'),
             ([str(ids), '--ids'], 'ids.txt: --ids: token id 50257 out of range 0..50256', '50257'),
             ([str(ids), '--ids'], "ids.txt: --ids expects whitespace-separated integers, got 'x'", '1 2 x'),
             ([str(ids), '--ids'], "ids.txt: --ids expects whitespace-separated integers, got '-1'", '-1'),
             ([str(ids), '--ids'], "ids.txt: --ids expects whitespace-separated integers, got '1_0'", '1_0')]
    for args, msg, *data in cases:
        if data:
            ids.write_text(data[0])
        assert md.main(args + ['--ner', 'none']) == 1, args
        err = capsys.readouterr().err
        assert err.startswith('metadata.py: error: ') and err.endswith(msg + '\n') and err.count('\n') == 1, err

def test_cli_refuses_a_fifo(tmp_path):
    # a FIFO is not read (it would block until someone writes): one line, exit 1
    os.mkfifo(tmp_path / 'fifo')
    r = run_cli([str(tmp_path / 'fifo'), '--ner', 'none'], timeout=60)   # a hang fails
    assert r.returncode == 1 and r.stderr == f"metadata.py: error: {tmp_path / 'fifo'}: not a regular file\n"

def test_missing_resources_clear_error(tmp_path):
    env = dict(os.environ, NLTK_DATA=str(tmp_path), LIME_NO_DOWNLOAD='1')
    r = run_cli(['--ner', 'binary'], stdin='Hello.', env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'punkt_tab' in lines[0] and 'nltk.downloader' in lines[0]

def test_downloads_allowed_reads_one_variable(monkeypatch):
    # one rule for every script: unset, empty or 0 allows downloads; anything else forbids them
    for value, allowed in ((None, True), ('', True), ('0', True), ('1', False), ('yes', False)):
        if value is None:
            monkeypatch.delenv('LIME_NO_DOWNLOAD', raising=False)
        else:
            monkeypatch.setenv('LIME_NO_DOWNLOAD', value)
        assert md.downloads_allowed() is allowed, value

def test_missing_gutenberg_is_a_resource_error(tmp_path, monkeypatch):
    import nltk
    monkeypatch.setenv('LIME_NO_DOWNLOAD', '1')
    # a data directory with the tokenizers and taggers but no corpora
    for sub in ('tokenizers', 'taggers'):
        (tmp_path / sub).symlink_to(Path(nltk.data.find('tokenizers/punkt_tab')).parents[1] / sub)
    monkeypatch.setattr(nltk.data, 'path', [str(tmp_path)])
    with pytest.raises(md.MetadataError, match=r"corpora/gutenberg.*nltk.downloader gutenberg"):
        md.ensure_resources('none', extra=('gutenberg',))

def test_typed_chunker_missing_points_to_binary():
    import nltk
    try:
        nltk.data.find('chunkers/maxent_ne_chunker_tab/english_ace_multiclass/')
        pytest.skip('typed NE chunker is installed here')
    except LookupError:
        pass
    r = run_cli(['--ner', 'typed'], stdin='Hello.', env=dict(os.environ, LIME_NO_DOWNLOAD='1'))
    assert r.returncode == 1 and '--ner binary' in r.stderr and 'multiclass' in r.stderr

# -----------------------------------------------------------------------------
# fast taggers == NLTK on real corpora. CI checks every 25th sentence of every document;
# the full check (all of Gutenberg and Brown, ~2.75M words, a few minutes on 2 cores):
#   LIME_FULL_CHECK=1 python -m pytest -q tests/test_metadata.py -k corpora

def _corpus_check(job):
    corpus, fid, every = job
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.chunk import tree2conlltags
    if corpus == 'gutenberg':
        from nltk.corpus import gutenberg
        from nltk.tokenize import PunktTokenizer
        text = gutenberg.raw(fid)
        # sentences: the memoised punkt (canonical contexts) == a fresh NLTK punkt
        part = text if every == 1 else text[:150_000]
        bad_sents = list(md._sentence_tokenizer().span_tokenize(part)) != list(PunktTokenizer('english').span_tokenize(part))
        sent_texts = [text[a:b] for a, b in md._sentence_tokenizer().span_tokenize(text)][::every]
        ref_spans = [list(NLTKWordTokenizer().span_tokenize(s)) for s in sent_texts]
        fast_spans = [md._fast_word_spans()(s) for s in sent_texts]
        bad_spans = sum(a != b for a, b in zip(ref_spans, fast_spans))
        sents = [[s[a:b] for a, b in sp] for s, sp in zip(sent_texts, ref_spans)]
    else:
        from nltk.corpus import brown
        sents, bad_spans, bad_sents = [list(s) for s in brown.sents(fid)][::every], 0, 0
    ref_pos = md.pos_tag_sents(sents, reference=True)
    fast_pos = md.pos_tag_sents(sents)
    chunker = md._ne_chunker('binary', True)
    ref_ner = [[iob for _, _, iob in tree2conlltags(chunker.parse(list(zip(w, t))))] if w else []
               for w, t in zip(sents, ref_pos)]
    fast_ner = md.ner_tag_sents(sents, ref_pos, 'binary')  # NLTK's POS in: NE is checked on its own
    nw = sum(map(len, sents))
    bad_pos = sum(a != b for x, y in zip(ref_pos, fast_pos) for a, b in zip(x, y)) + \
        sum(len(x) != len(y) for x, y in zip(ref_pos, fast_pos))
    bad_ner = sum(a != b for x, y in zip(ref_ner, fast_ner) for a, b in zip(x, y)) + \
        sum(len(x) != len(y) for x, y in zip(ref_ner, fast_ner))
    return nw, bad_spans, bad_pos, bad_ner, int(bad_sents)

def test_fast_taggers_equal_nltk_on_corpora():
    import multiprocessing as mp
    from nltk.corpus import gutenberg, brown
    every = 1 if os.environ.get('LIME_FULL_CHECK') else 25
    jobs = [('gutenberg', f, every) for f in gutenberg.fileids()] + [('brown', f, every) for f in brown.fileids()]
    with mp.get_context('fork').Pool(2) as pool:
        res = pool.map(_corpus_check, jobs, chunksize=4)
    words = sum(r[0] for r in res)
    print(f'compared {words} words (every {every}th sentence)')
    assert words > (2_500_000 if every == 1 else 100_000)
    assert sum(r[1] for r in res) == 0, 'word spans differ from NLTKWordTokenizer'
    assert sum(r[2] for r in res) == 0, 'POS tags differ from nltk.pos_tag'
    assert sum(r[3] for r in res) == 0, 'NE tags differ from the NLTK chunker'
    assert sum(r[4] for r in res) == 0, 'sentence spans differ from NLTK punkt'

def test_punkt_memo_equals_nltk():
    # contexts whose word is an abbreviation, an initial, a number or a collocation's first half
    # must not take the canonical shortcut; ordinary words must give punkt's own answer
    from nltk.tokenize import PunktTokenizer
    ref = PunktTokenizer('english')
    memo = md._sentence_tokenizer().text_contains_sentbreak
    ctxs = ['Mr. Smith', 'etc. The', 'Dr. Jones', 'U.S. The', 'vs. him', 'boat. The', 'boat. the', 'Boat. THE',
            'J. Bach', 'no. 5', 'Jan. 5', 'pp. 12', 'ca. 1900', 'Inc. He', 'dog! Then', 'dog? then', 'hmm.\nAnd',
            'st. Louis', 'ft. tall', 'sept. The', 'co. Ltd', 'ordinary.  "Quoted']
    special = set(ref._params.abbrev_types) | {a for a, _ in ref._params.collocations}
    ctxs += [f'{w}. {n}' for w in sorted(special)[:300] for n in ('The', 'the', 'Smith')]
    for c in ctxs:
        assert memo(c) == ref.text_contains_sentbreak(c), c

def test_fast_shape_equals_nltk_shape():
    # the NE chunker's word-shape feature, compiled once, must answer exactly as NLTK's shape()
    from nltk.chunk.named_entity import shape
    from nltk.corpus import brown
    fast = md._ne_chunker('binary', False)._shape
    assert fast is not shape   # the compiled copy is in use (else this checks nothing)
    words = set(brown.words()[:100000]) | {'e\u0301', 'café', 'x\u0301y', '3.14', '.5', '5.', '_', '__init__',
                                           'Ab_c', '٣٤', 'ǅungla', 'ABC', 'aBC', '--', '', 'Ⅻ', '²', "O'Neill"}
    assert [w for w in words if fast(w) != shape(w)] == []

def test_copies_of_nltk_functions_are_checked_and_equal():
    # the fast taggers use copies of three small NLTK functions (no nltk.tag / nltk.chunk import at
    # start-up) only where NLTK's source is the one copied; they answer as NLTK's on many words
    from nltk.chunk import named_entity
    from nltk.corpus import brown
    from nltk.tag import PerceptronTagger
    pos, ne = md._pos_tagger(False), md._ne_chunker('binary', False)
    assert pos.normalize is nltk_fast.perceptron_normalize and ne._simplify_pos is nltk_fast.ne_simplify_pos
    assert (pos.START, pos.END) == (PerceptronTagger.START, PerceptronTagger.END)
    words = list(set(brown.words()[:100000])) + ['', '-', '-x', 'a-b', '1999', '19999', '٣٤٥٦', '²', 'Ⅻ']
    ref = PerceptronTagger(load=False).normalize
    assert [w for w in words if pos.normalize(w) != ref(w)] == []
    tags = md.POS_TAGS + ['VB-X', 'NN-TL', 'V', '-', '']
    assert [t for t in tags if ne._simplify_pos(t) != named_entity.simplify_pos(t)] == []
    # a changed NLTK function is not copied: its hash is not a known one
    assert nltk_fast.source_hash(named_entity.shape) in nltk_fast.FastNEChunker.KNOWN_CODE
    assert nltk_fast.source_hash(lambda w: w) not in nltk_fast.FastPOSTagger.KNOWN_NORMALIZE
    tables = nltk_fast.FastNEChunker.tables(md._ne_chunker('binary', True))
    slow = nltk_fast.FastNEChunker(dict(tables, nltk_code_known=False), None)
    assert slow._simplify_pos is named_entity.simplify_pos and slow._shape is named_entity.shape

def test_token_byte_lengths_from_the_cache():
    # byte lengths of every token, from the cached ranks, for GPT-2 and a truncated vocabulary
    try:
        for name in ('gpt2', 'gpt2-1000'):
            md.set_tokenizer(name)
            enc = md.encoding()
            want = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
            assert md._token_bytes_len().tolist() == want and len(want) == enc.n_vocab
    finally:
        md.set_tokenizer('gpt2')

def test_canonical_word_pieces_equal_nltk():
    # FastWordSpans tokenizes a piece in canonical form (letter runs -> 'a' * length, except
    # the letter-only contractions and runs next to an apostrophe): same spans as NLTK
    from nltk.tokenize import NLTKWordTokenizer
    ref = NLTKWordTokenizer()
    fast = nltk_fast.FastWordSpans()
    sents = ["He said: \"Don't go there, cannot you see?\" (It was 3.14 p.m.)", "Gimme that; gonna wanna gotta.",
             "'Tis the d'ye more'n 'twas rock'n'roll.", "Mr. O'Neill's dogs' bones... end.", "Hello,world:x --y",
             "CANNOT Cannot cannotx xcannot can-not.", "\"Quoted\" ``tex'' and 'single' quotes.'", "Ends with U.S.",
             "1:1 In the beginning, 3,000 men; 1,2,3 and 4:5. Also 12:30, '99 and 1,a 2:b"]
    for s in sents:
        assert fast(s) == list(ref.span_tokenize(s)), s
    assert any('aaa' in k[1] for k in fast.cache)   # the canonical keys were used

def test_truncated_gpt2_tokenizer():
    try:
        md.set_tokenizer('gpt2-1024')
        enc = md.encoding()
        assert enc.n_vocab == 1025 and enc.eot_token == 1024
        for text in TRICKY:
            ids, st = md.annotate_text(text, 'lime', 'binary')
            assert enc.decode_bytes(ids.tolist()) == text.encode('utf-8')
            assert len(ids) == 0 or ids.max() < 1024
            assert all(len(v) == len(ids) for v in st.values())
        # fewer merges, more tokens than full GPT-2 on the same text
        text = TRICKY[9]
        n_small = len(md.annotate_text(text, 'plain', 'none')[0])
        with pytest.raises(md.MetadataError):
            md.set_tokenizer('gpt3-1000')
    finally:
        md.set_tokenizer('gpt2')
    assert n_small > len(md.annotate_text(text, 'plain', 'none')[0])
    assert md.encoding().n_vocab == 50257

# -----------------------------------------------------------------------------
# start-up: the models' tables come from a disk cache; nltk is imported without scipy/sklearn

def _assert_same_tables(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert isinstance(b[k], np.ndarray) and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert type(a[k]) is type(b[k]) and a[k] == b[k], k

def test_cached_tables_equal_fresh_ones():
    # what a process reads from the cache equals what NLTK's models give now
    import tiktoken
    from nltk.tokenize import PunktTokenizer
    md._sentence_tokenizer(), md._pos_tagger(False), md._ne_chunker('binary', False)   # the files exist
    fresh = {'pos': nltk_fast.FastPOSTagger.tables(md._pos_tagger(True)),
             'ne_binary': nltk_fast.FastNEChunker.tables(md._ne_chunker('binary', True)),
             'punkt': nltk_fast.punkt_tables(PunktTokenizer('english')._params)}
    for name, tables in fresh.items():
        cached = md._read_tables(os.path.join(md.cache_dir(), name + '.tables'))
        if name != 'punkt':   # the fast taggers passed their self-check against NLTK's own models
            assert cached.pop('self_check') is True, name
        _assert_same_tables(cached, tables)
    ours, ref = md._sentence_tokenizer()._params, PunktTokenizer('english')._params   # the tokenizer in use
    assert (ours.abbrev_types, ours.collocations, ours.sent_starters, dict(ours.ortho_context)) == \
        (ref.abbrev_types, ref.collocations, ref.sent_starters, dict(ref.ortho_context))
    # GPT-2 from its cached ranks is tiktoken's GPT-2
    ours, ref = md._gpt2(), tiktoken.get_encoding('gpt2')
    assert ours is not ref and os.path.exists(os.path.join(md.cache_dir(), 'gpt2.tables'))
    assert (ours.name, ours.n_vocab, ours._pat_str, ours._special_tokens, ours._mergeable_ranks) == \
        (ref.name, ref.n_vocab, ref._pat_str, ref._special_tokens, ref._mergeable_ranks)
    text = ''.join(TRICKY) + '<|endoftext|>'
    assert ours.encode(text, allowed_special='all') == ref.encode(text, allowed_special='all')
    # the cache key covers the model files and the code that builds the tables
    files = md._nltk_files([md._RESOURCES['pos'][0]])
    assert len(files) == 3 and all(f.endswith('.json') for f in files)

def _split_table_file(data):
    # (header, the bytes after the header's 64-byte aligned end) of a table file
    n0 = len(md._TABLES_MAGIC)
    n = int.from_bytes(data[n0:n0 + 8], 'little')
    return json.loads(data[n0 + 16:n0 + 16 + n]), data[-(-(n0 + 16 + n) // 64) * 64:]

def _table_file(header, body):
    # a table file with this header and data and a right CRC: what passes the checksum, so that
    # the checks of the structure are tested
    import zlib
    n0, head = len(md._TABLES_MAGIC), json.dumps(header).encode()
    rest = head + b'\0' * (-(n0 + 16 + len(head)) % 64) + body
    return md._TABLES_MAGIC + len(head).to_bytes(8, 'little') + zlib.crc32(rest).to_bytes(8, 'little') + rest

def test_cache_rebuilds_stale_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'cache'))
    model = tmp_path / 'model.txt'
    model.write_text('one')
    builds = []

    def build():
        builds.append(1)
        return {'w': np.arange(3.0), 'words': ['a', None, True], 'model': model.read_text()}

    def get(version='v1'):
        return md._cached('toy', version, [str(model)], build, lambda t: (t['model'], t['w'].tolist(), t['words']))

    f = tmp_path / 'cache' / 'toy.tables'
    f.parent.mkdir()
    (f.parent / 'toy.npz').write_bytes(b'the format before')   # replaced, not kept beside
    assert get() == ('one', [0.0, 1.0, 2.0], ['a', None, True]) and len(builds) == 1 and f.exists()
    assert not (f.parent / 'toy.npz').exists()
    assert get() == ('one', [0.0, 1.0, 2.0], ['a', None, True]) and len(builds) == 1   # read back
    model.write_text('two')   # a model file changed: stale
    assert get()[0] == 'two' and len(builds) == 2
    assert get()[0] == 'two' and len(builds) == 2
    assert get('v2')[0] == 'two' and len(builds) == 3   # another version of the code
    good = f.read_bytes()
    n0 = len(md._TABLES_MAGIC)
    head_end = n0 + 16 + int.from_bytes(good[n0:n0 + 8], 'little')
    header, body = _split_table_file(good)
    assert _table_file(header, body) == good and header['arrays']['w'][2:] == [len(body) - 24, 24]
    w = header['arrays']['w']
    crafted = [dict(header, arrays={'w': w[:2] + [-64, 24]}),               # header bytes as weights
               dict(header, arrays={'w': w[:2] + [len(body) - 16, 24]}),    # past the end
               dict(header, arrays={'w': w[:2] + [len(body) + 64, 0]}),     # outside, empty
               dict(header, arrays={'w': ['<f8', [-3], w[2], 24]}),         # a negative dimension
               dict(header, arrays={'w': ['|S8'] + w[1:]}),                 # not numeric
               dict(header, arrays={'w': ['no such dtype'] + w[1:]}),
               dict(header, arrays={'w': [['<f8', 3]] + w[1:]}),            # a dtype that is not a string
               dict(header, strings={'s': [0, 0, -1]}),                     # a negative count
               dict(header, strings={'s': [-8, 8, 1]})]
    for junk in (b'', b'not a table file', good[:n0 + 4], good[:head_end - 1], good[:len(good) - 8],
                 good[:n0] + (10 ** 9).to_bytes(8, 'little') + good[n0 + 8:],
                 good.replace(b'"float64"', b'"object"').replace(b'<f8', b'|O8'),
                 good.replace(b'"json"', b'"jsno"'),
                 good[:-24] + bytes(range(24)),                          # the data changed in place: bad CRC
                 good.replace(b'LIME tables v2', b'LIME tables v1'),      # the format before
                 *(_table_file(h, body) for h in crafted)):
        f.write_bytes(junk)
        n = len(builds)
        assert get('v2')[0] == 'two' and len(builds) == n + 1, junk[:40]   # corrupt: rebuilt ...
        assert get('v2')[0] == 'two' and len(builds) == n + 1   # ... and written again
    assert sorted(p.name for p in f.parent.iterdir()) == ['file-hashes.json', 'toy.tables']   # no temp files


_TOY_CACHE = r'''
import os, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import metadata as md
if sys.argv[3] == 'killed':   # killed while it writes the table file (kill -9 during a build)
    def write(f, key, tables):
        f.write(b'partial')
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    md._write_tables = write
print(md._cached('pos', 'v', [sys.argv[2]], lambda: {'w': np.arange(3.0)}, lambda t: t['w'].tolist()))
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10, 'MB')   # peak memory
'''

def _toy_cache(tmp_path, how='run'):
    # a fresh process that reads (or builds) the table file pos.tables of a toy model in tmp_path/cache
    model = tmp_path / 'model.txt'
    model.write_text('m')
    env = dict(os.environ, LIME_CACHE_DIR=str(tmp_path / 'cache'))
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))   # an endless read stops
    return subprocess.run([sys.executable, '-c', _TOY_CACHE, ROOT, str(model), how], capture_output=True,
                          text=True, env=env, timeout=60, preexec_fn=limit)   # a hang (a FIFO read) fails

@pytest.mark.parametrize('entry', ['file-hashes.json', 'pos.tables'])
@pytest.mark.parametrize('kind', ['fifo', 'dev-zero'])
def test_cache_reads_only_regular_files(tmp_path, entry, kind):
    # a FIFO or a link to a device in the cache is never read (no hang, no endless read): it is a
    # corrupt entry, replaced by a regular file (the link itself, not /dev/zero)
    import stat
    (tmp_path / 'cache').mkdir()
    p = tmp_path / 'cache' / entry
    if kind == 'fifo':
        os.mkfifo(p)
    else:
        p.symlink_to('/dev/zero')
    r = _toy_cache(tmp_path)
    assert r.returncode == 0 and r.stdout.split()[:3] == ['[0.0,', '1.0,', '2.0]'] and r.stderr == '', r.stderr
    assert int(r.stdout.split()[3]) < 1000   # MB: /dev/zero was not read (until memory ran out)
    assert stat.S_ISREG(os.lstat(p).st_mode) and stat.S_ISCHR(os.stat('/dev/zero').st_mode)
    assert _toy_cache(tmp_path).stdout.split()[:3] == ['[0.0,', '1.0,', '2.0]']

def test_cache_ignores_a_large_hash_memo(tmp_path, monkeypatch):
    # file-hashes.json is a few KB; a larger one is not read (not even its valid entries), and is rewritten
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'cache'))
    model = tmp_path / 'model.txt'
    model.write_text('m')
    get = lambda: md._cached('toy', 'v', [str(model)], lambda: {'w': np.ones(2)}, lambda t: t['w'].sum())
    assert get() == 2.0
    memo = tmp_path / 'cache' / 'file-hashes.json'
    entry = json.loads(memo.read_text())
    big = {f'{tmp_path}/gone{k}.txt': entry[str(model)] for k in range(30000)}   # 3 MB (the valid entry kept)
    memo.write_text(json.dumps(dict(big, **entry)))
    assert memo.stat().st_size > 2 << 20
    assert get() == 2.0 and json.loads(memo.read_text()).keys() == entry.keys()

def test_cache_removes_temp_files_of_killed_builds_only(tmp_path, monkeypatch):
    # a build killed while writing leaves its temp file; the next write removes it: only the temp
    # files of our naming (.NAME.PID.XXXXXXXX.tmp) whose process is gone
    r = _toy_cache(tmp_path, 'killed')
    assert r.returncode == -9
    cache = tmp_path / 'cache'
    left = [p.name for p in cache.iterdir() if p.name.startswith('.pos.tables.')]
    assert len(left) == 1 and left[0].endswith('.tmp') and len(left[0].split('.')) == 6
    dead = left[0].split('.')[3]   # its pid
    assert dead.isdigit()
    keep = [f'.pos.tables.{os.getpid()}.abcd_123.tmp',     # a live build's
            '.pos.tables.abcd_123.tmp',                    # no pid (another naming)
            f'.pos.tables.{dead}.abcd_123.tmp.bak', f'pos.tables.{dead}.abcd_123.tmp',
            f'.pos.tables.{dead}.abcd_1234.tmp', f'.toy.tables.{dead}.abcd_123.tmp',   # not pos.tables' temp
            'notes.txt']
    for k in keep:
        (cache / k).write_text('mine')
    (cache / f'.pos.tables.{dead}.dir_0000.tmp').mkdir()   # not a regular file
    r = _toy_cache(tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (cache / left[0]).exists()
    assert all((cache / k).read_text() == 'mine' for k in keep) and (cache / f'.pos.tables.{dead}.dir_0000.tmp').is_dir()

_TRUNCATED = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import metadata as md
tg = md._pos_tagger(False)
assert not tg.W.flags.owndata   # read from the table file, not built
os.truncate(os.path.join(md.cache_dir(), 'pos.tables'), 64)   # truncated while in use
print(' '.join(md.pos_tag_sents([sys.argv[2].split()])[0]))
'''

def _copy_of_the_cache(tmp_path, names):
    # tmp_path/cache with copies of the default cache's files (built first): nothing to rebuild there
    import shutil
    md._pos_tagger(False)
    (tmp_path / 'cache').mkdir()
    for name in names + ['file-hashes.json']:
        shutil.copy(os.path.join(md.cache_dir(), name), tmp_path / 'cache' / name)
    return tmp_path / 'cache'

def test_table_file_truncated_while_in_use(tmp_path):
    # the tables are a copy in memory: a table file truncated under a running process cannot
    # crash it (an mmap would: SIGBUS)
    cache = _copy_of_the_cache(tmp_path, ['pos.tables'])
    words = "The old man the boat , said Mr. Smith .".split()
    env = dict(os.environ, LIME_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, '-c', _TRUNCATED, ROOT, ' '.join(words)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == md.pos_tag_sents([words], reference=True)[0]

def test_cache_rebuilds_tables_the_tagger_refuses(tmp_path, monkeypatch):
    # a table file that is sound as a file (right CRC, every piece inside) but not what the tagger's
    # tables are (a tag of the tag dictionary that is no tag, weights of another dtype) is rebuilt
    # at load, not an error at every tagging
    cache = _copy_of_the_cache(tmp_path, ['pos.tables'])
    monkeypatch.setenv('LIME_CACHE_DIR', str(cache))
    path = cache / 'pos.tables'
    header, body = _split_table_file(path.read_bytes())
    js, W = header['json'], header['arrays']['W']
    bad = [dict(header, json=dict(js, tagdict=dict(js['tagdict'], the='NOT-A-TAG'))),
           dict(header, arrays=dict(header['arrays'], W=['<f4', [W[1][0], 2 * W[1][1]]] + W[2:]))]
    words = "The old man the boat .".split()
    try:
        for h in bad:
            path.write_bytes(_table_file(h, body))
            md._pos_tagger.cache_clear()
            assert md.pos_tag_sents([words])[0] == md.pos_tag_sents([words], reference=True)[0]
            t = md._read_tables(str(path))   # rebuilt
            assert t['tagdict']['the'] == 'DT' and t['W'].dtype == np.float64 and t['self_check'] is True
    finally:
        md._pos_tagger.cache_clear()

def test_fast_tagger_unlike_nltk_falls_back_to_nltk(tmp_path, monkeypatch, capsys):
    # each fast tagger is compared with NLTK's own model on a sample when its tables are built; one
    # that differs (here: one weight changed) is replaced by NLTK's model with one warning line, in
    # this process and in every later one that reads its tables
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'cache'))
    pos_tables, ne_tables = nltk_fast.FastPOSTagger.tables, nltk_fast.FastNEChunker.tables

    def bad_pos(tagger):   # every word not in the tag dictionary: UH
        t = pos_tables(tagger)
        t['W'] = t['W'].copy()
        t['W'][t['features'].index('bias') + 1, t['classes'].index('UH')] += 100
        return t

    def bad_ne(chunker):   # every word: B-NE
        t = ne_tables(chunker)
        t['aon'] = t['aon'].copy()
        t['aon'][t['labels'].index('B-NE')] += 100
        return t
    monkeypatch.setattr(nltk_fast.FastPOSTagger, 'tables', staticmethod(bad_pos))
    monkeypatch.setattr(nltk_fast.FastNEChunker, 'tables', staticmethod(bad_ne))
    text = ''.join(TRICKY) + ' Mr. John Smith of Acme Corp. met Ms. Garcia in New York on Jan. 5.'
    ids = md.annotate_text(text, 'lime', 'binary', reference=True)[0]

    def clear():
        for f in (md._pos_tagger, md._ne_chunker, md._iob_id_table, md._pos_id_of_tag, md._long_run_checks):
            f.cache_clear()
        md._ANALYSIS_CACHE.clear()
        md._ANALYSIS_HELD[0] = 0
    try:
        for run in ('built', 'read back'):
            clear()
            got, want = md.analyze(text, 'binary'), md.analyze(text, 'binary', reference=True)
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), run
            assert md._pos_tagger(False).eps == md._ne_chunker('binary', False).eps == float('inf')
            causal = md.annotate_ids(ids[:40], 'binary', 'causal')
            ref = md.annotate_ids(ids[:40], 'binary', 'causal', reference=True)
            assert all(np.array_equal(causal[k], ref[k]) for k in ref), run
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 2 and all(l.startswith('metadata.py: warning: the fast ') for l in err), err
            assert 'POS tagger' in err[0] and 'binary NE chunker' in err[1]
        assert md._read_tables(str(tmp_path / 'cache' / 'pos.tables'))['self_check'] is False
    finally:
        clear()

def test_cache_reads_arrays_in_place_and_hashes_a_file_once(tmp_path, monkeypatch):
    # the arrays are read-only views of the file's bytes (read once, no copy per array), and a
    # model file is hashed again only when its stat changes
    import hashlib
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'cache'))
    model = tmp_path / 'model.txt'
    model.write_text('one')
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(data=b''):
        hashed.append(data)
        return real_sha256(data)
    monkeypatch.setattr(hashlib, 'sha256', counting_sha256)
    build = lambda: {'w': np.arange(1000.0), 's': ['x y', 'é', '']}
    get = lambda: md._cached('toy', 'v', [str(model)], build, lambda t: t)
    get()
    assert b'one' in hashed
    hashed.clear()
    t = get()
    assert b'one' not in hashed   # remembered by its stat
    assert t['s'] == ['x y', 'é', ''] and t['w'].tolist() == list(range(1000)) and not t['w'].flags.writeable
    assert not t['w'].flags.owndata and t['w'].base is not None
    os.utime(model, ns=(1, 1))   # any change of its stat: hashed again (same contents: no rebuild)
    hashed.clear()
    get()
    assert b'one' in hashed
    model.write_text('six')   # same size, new contents
    hashed.clear()
    assert get()['w'] is not t['w'] and b'six' in hashed


def test_cache_unwritable_or_failing_is_not_an_error(tmp_path, monkeypatch):
    model = tmp_path / 'model.txt'
    model.write_text('m')
    build = lambda: {'w': np.ones(2)}
    make = lambda t: t['w'].sum()
    (tmp_path / 'file').write_text('x')
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'file' / 'cache'))   # cannot be created
    assert md._cached('toy', 'v', [str(model)], build, make) == 2.0
    # a write that fails halfway: no file, no temp file, the tables still used
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'c'))

    def failing_write(f, key, tables):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(md, '_write_tables', failing_write)
    assert md._cached('toy', 'v', [str(model)], build, make) == 2.0
    assert [p.name for p in (tmp_path / 'c').iterdir()] == ['file-hashes.json']

def test_cache_dir_default_locations(monkeypatch, tmp_path):
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'a'))
    assert md.cache_dir() == str(tmp_path / 'a')
    monkeypatch.delenv('LIME_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert md.cache_dir() == str(tmp_path / 'xdg' / 'lime')
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert md.cache_dir() == str(tmp_path / 'home' / '.cache' / 'lime')

_NLTK_FINGERPRINT = r'''
import json, sys, types
sys.path.insert(0, sys.argv[1])
import nltk_fast
if sys.argv[2] == 'plain':
    import nltk
nltk_fast.import_nltk()
import metadata as md   # tagging, fast path: loads neither scipy nor sklearn, nor most of NLTK
md.ensure_resources('binary')
ids, _ = md.annotate_text('The old man the boat. Mr. Smith went to Washington.', 'lime', 'binary')
md.annotate_causal(md.annotate_text('He said "Stop!" Then', 'lime', 'binary')[0], 'binary')
md.annotate_causal(ids, 'binary')
deferred = '__getattr__' in vars(sys.modules['nltk'])
n_tagging = sum(m.split('.')[0] == 'nltk' for m in sys.modules)
import nltk   # then NLTK as a user would use it
tags = nltk.pos_tag(['The', 'old', 'man', 'the', 'boat', '.'])
from nltk.tokenize import word_tokenize
from nltk.corpus import words
same = (nltk.tokenize.punkt.PunktSentenceTokenizer is type(md._sentence_tokenizer())
        and nltk.data is sys.modules['nltk.data'] and nltk.tokenize is sys.modules['nltk.tokenize']
        and word_tokenize('a b.') == ['a', 'b', '.'] and len(words.words('en-basic')) == 850
        and sys.modules['nltk.data'].grammar is nltk.grammar and sys.modules['nltk.data'].sem is nltk.sem
        and len(nltk.data.grammar.CFG.fromstring("S -> 'a' S | 'b'").productions()) == 2
        and str(nltk.data.sem.Expression.fromstring('all x.P(x)')) == 'all x.P(x)')
def fp(v):   # what a module's global is, not its value
    if isinstance(v, types.ModuleType):
        return 'module ' + v.__name__
    return f"{type(v).__name__} {getattr(v, '__module__', '')} {getattr(v, '__qualname__', '')}"
mods = {name: {k: fp(v) for k, v in sorted(vars(m).items()) if not k.startswith('__')}
        for name, m in list(sys.modules.items()) if m is not None and name.split('.')[0] == 'nltk'}
blocked = [m for m, v in sys.modules.items() if v is None]
loaded = sorted(m for m in ('scipy', 'sklearn') if m in sys.modules)
print(json.dumps(dict(loaded=loaded, mods=mods, blocked=blocked, deferred=deferred, n_tagging=n_tagging,
                      tags=tags, same=same, finder=any(type(f).__name__ == '_NLTKInit' for f in sys.meta_path))))
'''

def test_import_nltk_defers_nltk_and_skips_only_scipy_and_sklearn():
    # tagging through metadata.py (nltk_fast.import_nltk) runs neither nltk's __init__ nor
    # scipy's; then NLTK used as a user would is the package a plain `import nltk` gives: the only
    # NLTK modules that differ are those whose optional scipy / scikit-learn parts LIME never uses
    runs = {}
    for how in ('plain', 'lime'):
        r = subprocess.run([sys.executable, '-c', _NLTK_FINGERPRINT, ROOT, how], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        runs[how] = json.loads(r.stdout)
    plain, lime = runs['plain']['mods'], runs['lime']['mods']
    differ = {m for m in set(plain) | set(lime) if plain.get(m) != lime.get(m)}
    optional = {'nltk.metrics.association', 'nltk.metrics.scores', 'nltk.classify.scikitlearn',
                'nltk.translate.gale_church', 'nltk.parse.transitionparser'}
    assert differ <= optional, differ - optional
    assert runs['lime']['loaded'] == [] and runs['lime']['blocked'] == []
    assert runs['lime']['deferred'] and not runs['plain']['deferred']
    assert runs['lime']['n_tagging'] < 40 < runs['plain']['n_tagging']
    assert runs['lime']['tags'] == runs['plain']['tags'] and runs['lime']['same'] and runs['plain']['same']
    assert not runs['lime']['finder']
    try:
        import scipy  # noqa: F401
        assert differ, 'scipy is installed: some optional part should differ (else this test checks nothing)'
    except ImportError:
        pass

@pytest.mark.parametrize('ner', ['binary', 'none'])
def test_cli_lines_are_json_dumps(tmp_path, capsys, ner):
    # the CLI's output loop (pieces quoted once, lines written in blocks) writes the bytes of
    # json.dumps per token, on more tokens than one block
    text = ''.join(TRICKY) + ' back\\slash "q" \x00\x1f\x7f \u2028 \U0001F600 end. ' + 'Mr. Ab went. ' * 14000
    f = tmp_path / 'in.txt'
    f.write_bytes(text.encode('utf-8'))
    assert md.main([str(f), '--ner', ner]) == 0
    out = capsys.readouterr().out
    ids, st = md.annotate_text(text, 'lime', ner)
    assert len(ids) > 1 << 16
    enc, pos_names = md.encoding(), md.stream_tags('pos', ner)
    ner_names = md.stream_tags('ner', ner) if ner != 'none' else None
    want = ''.join(json.dumps({'id': t, 'text': enc.decode_single_token_bytes(t).decode('utf-8', errors='replace'),
                               'pos': pos_names[st['pos'][i]], 'ner': ner_names[st['ner'][i]] if ner_names else None},
                              ensure_ascii=False) + '\n' for i, t in enumerate(ids.tolist()))
    assert out == want
