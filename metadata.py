"""
Linguistic metadata for LIME: annotate text with NLTK and align it to GPT-2 BPE tokens.

    text -> sentences (punkt) -> words with character spans (NLTK's Treebank-style
    word tokenizer) -> POS (averaged perceptron, Penn Treebank) and NER (maxent
    chunker, as IOB) per word -> BPE tokens, each carrying the tags of its word.

Every metadata stream has a fixed tag vocabulary (see stream_tags): id 0 = <pad>
(used for <|endoftext|>), 1 = <space> (whitespace-only tokens and tokens that
overlap no word), 2 = <unk> (metadata dropout / missing hints), then the tags.

This file, top to bottom: tag vocabularies; the text-to-tags path (annotate_text: words and
tags, BPE tokens, alignment; annotate_ids for any token stream); causal tags (annotate_causal,
the online CausalStream); NLTK resources, models (kept in a disk cache, cache_dir()) and the BPE
tokenizer; the CLI. The exact fast re-implementations of the NLTK models, and the facts about
NLTK that the causal path relies on, are in nltk_fast.py.

Library use:
    ids, streams = annotate_text(text, tokenization='lime', ner='binary')
    streams = annotate_ids(ids, ner='binary')          # any token-id stream
    streams = annotate_ids(ids, ner='binary', tags='causal')
CLI (prints one JSON object per token):
    python metadata.py [FILE] [--tokenization lime|plain] [--ner typed|binary|none]
                       [--ids] [--tags full|causal] [--reference]
"""
import os
import re
import sys
import json
import bisect
import argparse
from dataclasses import dataclass
from functools import lru_cache, wraps
from collections import OrderedDict

import numpy as np

import nltk_fast
from common import NER_MODES, TOKENIZATIONS, LimeError, read_regular, tokenizer_size, write_atomic
from nltk_fast import (FastPOSTagger, FastNEChunker, FastWordSpans, punkt_memo, iob as _iob, import_nltk,
                       POS_WINDOW, NE_WINDOW, NE_START, TextIndex, sync_point, MiddleSummary, rep_middle,
                       SYNC_G, REP_H, LONG_WORD, PUNKT_LONG)

# -----------------------------------------------------------------------------
# fixed tag vocabularies: identical on every machine, independent of the data

SPECIAL = ['<pad>', '<space>', '<unk>']
PAD, SPACE, UNK = 0, 1, 2   # the same ids in every stream
# the 45 classes of NLTK's averaged-perceptron English tagger (sorted)
POS_TAGS = ['#', '$', "''", '(', ')', ',', '.', ':', 'CC', 'CD', 'DT', 'EX', 'FW', 'IN',
            'JJ', 'JJR', 'JJS', 'LS', 'MD', 'NN', 'NNP', 'NNPS', 'NNS', 'PDT', 'POS', 'PRP',
            'PRP$', 'RB', 'RBR', 'RBS', 'RP', 'SYM', 'TO', 'UH', 'VB', 'VBD', 'VBG', 'VBN',
            'VBP', 'VBZ', 'WDT', 'WP', 'WP$', 'WRB', '``']
# entity types of NLTK's maxent NE chunkers ('typed' is ne_chunk's default multiclass model)
NE_TYPES = {'typed': ['PERSON', 'ORGANIZATION', 'GPE', 'LOCATION', 'FACILITY', 'GSP'],
            'binary': ['NE'],
            'none': []}
TAG_KINDS = ('full', 'causal')
WORD_TAGS = ['B', 'I']  # the 'word' stream: token starts a word / continues one
WORD_B, WORD_I = len(SPECIAL), len(SPECIAL) + 1  # their ids (3, 4)

def ner_tags(ner):
    return ['O'] + [f'{p}-{t}' for t in NE_TYPES[ner] for p in 'BI']

def is_causal(stream):
    """The one rule of stream names: NAME_causal holds NAME's tags computed causally (of token t
    from tokens <= t)."""
    return stream.endswith('_causal')

def base_stream(stream):
    """The tagger a stream comes from: pos for pos and pos_causal."""
    return stream[:-len('_causal')] if is_causal(stream) else stream

def stream_tags(stream, ner):
    """Tag names (index = id) of a stream: pos, ner, word, pos_causal, ner_causal."""
    base = base_stream(stream)
    tags = {'pos': POS_TAGS, 'ner': ner_tags(ner), 'word': WORD_TAGS}.get(base)
    if tags is None or (base == 'ner' and ner == 'none'):
        raise MetadataError(f"unknown metadata stream '{stream}' (ner={ner})")
    return SPECIAL + tags

def stream_names(ner, tags=('full',)):
    """The streams a dataset holds: full pos/ner (+ the word-boundary stream), then causal."""
    base = ['pos'] + (['ner'] if ner != 'none' else [])
    names = []
    if 'full' in tags:
        names += base + ['word']
    if 'causal' in tags:
        names += [b + '_causal' for b in base]
    return names

POS_ID = {t: i for i, t in enumerate(SPECIAL + POS_TAGS)}

class MetadataError(Exception):
    """Bad input or a missing resource: the CLIs print it as one line and exit 1."""

def _gc_paused(fn):
    """Run fn with Python's cyclic garbage collector off. Annotation allocates many small
    containers (freed by reference counting; no cycles), and each full collection would
    rescan the loaded NLTK models and the word caches: up to half the run time otherwise."""
    import gc

    @wraps(fn)
    def run(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return run

def _memo(maxsize):
    """Memoise a one-argument function in a plain dict, emptied when it holds maxsize entries.
    Unlike lru_cache (a linked list of Python lists, which the garbage collector scans at
    every full collection), a dict of tuples is almost free for the collector."""
    def wrap(fn):
        cache = {}

        @wraps(fn)
        def run(arg):
            r = cache.get(arg)
            if r is None:
                if len(cache) >= maxsize:
                    cache.clear()
                r = cache[arg] = fn(arg)
            return r
        run.cache_clear = cache.clear
        run.cache = cache   # for hot loops: cache.get first, run() on a miss
        return run
    return wrap

# -----------------------------------------------------------------------------
# text -> tags: words and their tags, BPE tokens, alignment

@_gc_paused
def annotate_text(text, tokenization='lime', ner='binary', reference=False):
    """Tokens and full metadata of one document.
    Returns (ids int64 array, {'pos', 'ner' (unless ner='none'), 'word'}: uint16 arrays)."""
    starts, ends, pos_ids, ner_ids = analyze(text, ner, reference)
    ids = tokenize(text, starts, ends, tokenization)
    cs, ce = _token_char_spans(ids, _char_of_byte(text))
    return ids, _streams_from_alignment(align(cs, ce, starts, ends), pos_ids, ner_ids)

@_gc_paused
def analyze(text, ner='binary', reference=False):
    """Words of a text with their tags.
    Returns (starts, ends, pos_ids, ner_ids): int64 character spans and uint16 tag ids
    (ner_ids is None when ner='none')."""
    if reference:
        return _analyze_reference(text, ner)
    from itertools import chain
    sents, spans, _, _, pos, raw = _doc_analysis(text, ner, False)
    lens = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))
    n = int(lens.sum())
    se = np.array(list(chain.from_iterable(spans)), dtype=np.int64).reshape(n, 2)
    off = np.repeat(np.array([a for a, _ in sents], dtype=np.int64), lens)
    starts, ends = se[:, 0] + off, se[:, 1] + off
    pos_ids = np.array(list(map(POS_ID.__getitem__, chain.from_iterable(pos))), dtype=np.uint16)
    ner_ids = None
    if ner != 'none':
        # the chunker's IOB fixup of the raw labels (as in FastNEChunker.iob_sents), by table:
        # [previous raw label (none at a sentence start), raw label] -> NER stream id
        ch = _ne_chunker(ner, False)
        lab = np.array(list(map(ch.label_idx.__getitem__, chain.from_iterable(raw))), dtype=np.int64)
        prev = np.full(n, len(ch.labels), dtype=np.int64)
        if n:
            prev[1:] = lab[:-1]
            first = np.cumsum(lens)[:-1]
            prev[first[first < n]] = len(ch.labels)   # sentence starts
        ner_ids = _iob_id_table(ch, ner)[prev, lab].astype(np.uint16)
    return starts, ends, pos_ids, ner_ids

_ANALYSIS_CACHE = OrderedDict()   # (ner, reference, text) -> analysis, most recent last
_ANALYSIS_CACHE_CHARS = 1 << 20    # keep recent documents up to this many characters in all
_ANALYSIS_HELD = [0]               # characters of the documents in _ANALYSIS_CACHE

def _doc_analysis(text, ner, reference):
    """Sentences, words and tags of a whole document:
    (sents, spans, fb, words, pos, raw): sentence char spans, word spans within each sentence,
    whether the word regex fallback ran, word strings, POS tags, raw NE tagger labels (None when
    ner='none'). Recent results are kept (the last one always, older ones up to
    _ANALYSIS_CACHE_CHARS characters), so the causal path of a document just annotated by
    annotate_text (prepare.py) does not redo it; a pure function of its arguments (the
    callers only read the lists)."""
    key = (ner, bool(reference), text)
    hit = _ANALYSIS_CACHE.get(key)
    if hit is not None:
        _ANALYSIS_CACHE.move_to_end(key)
        return hit
    sents = list(_sentence_tokenizer().span_tokenize(text))
    spans, fb, words = [], [], []
    for s, e in sents:
        sp, f = _word_spans(text[s:e], reference)
        spans.append(sp); fb.append(f); words.append([text[s + a:s + b] for a, b in sp])
    pos = pos_tag_sents(words, reference)
    raw = None
    if ner != 'none':
        raw = ner_raw_resume([(list(zip(w, p)), 0, [], len(w)) for w, p in zip(words, pos)], ner, reference)
    res = (sents, spans, fb, words, pos, raw)
    _ANALYSIS_CACHE[key] = res
    _ANALYSIS_HELD[0] += len(text)
    while len(_ANALYSIS_CACHE) > 1 and _ANALYSIS_HELD[0] > _ANALYSIS_CACHE_CHARS:
        _ANALYSIS_HELD[0] -= len(_ANALYSIS_CACHE.popitem(last=False)[0][2])
    return res

def _word_spans(sentence, reference=False):
    """(character spans of the words of one sentence, whether the regex fallback made them).
    Treebank-style tokens; span_tokenize keeps the original characters (word_tokenize
    rewrites quotes). The causal path needs to know whether the fallback ran."""
    try:
        return list(_word_tokenizer().span_tokenize(sentence) if reference else _fast_word_spans()(sentence)), False
    except ValueError:
        # align_tokens fails on a few quote patterns; fall back to a plain regex split
        return [m.span() for m in re.finditer(r"\w+|[^\w\s]+", sentence)], True

@_memo(1 << 18)
def _word_spans_memo(key):
    # _word_spans(*key) with the spans as a tuple, memoised (the causal path re-tokenizes the
    # same chunks again and again); key = (text, reference)
    sp, f = _word_spans(*key)
    return tuple(sp), f

def pos_tag_sents(sents, reference=False):
    """POS tag names for each sentence (list of word lists); same as nltk.pos_tag."""
    tagger = _pos_tagger(reference)
    if not reference:
        return tagger.tag_sents(sents)
    return [[t for _, t in tagger.tag(words)] if words else [] for words in sents]

def ner_tag_sents(sents, pos, ner, reference=False):
    """IOB NER tag names for each sentence; same as tree2conlltags(ne_chunk(...))."""
    from nltk.chunk import tree2conlltags
    chunker = _ne_chunker(ner, reference)
    if not reference:
        return chunker.iob_sents([list(zip(words, tags)) for words, tags in zip(sents, pos)])
    out = []
    for words, tags in zip(sents, pos):
        out.append([iob for _, _, iob in tree2conlltags(chunker.parse(list(zip(words, tags))))]
                   if words else [])
    return out

def _analyze_reference(text, ner='binary'):
    """analyze with NLTK's own tokenizers and taggers (what the fast path must equal)."""
    sents, offsets = [], []
    for s, e in list(_sentence_tokenizer().span_tokenize(text)):   # whole: NLTK's regex time limit runs while it waits
        spans = _word_spans(text[s:e], reference=True)[0]
        sents.append([text[s + a:s + b] for a, b in spans])
        offsets.append([(s + a, s + b) for a, b in spans])
    flat = [sp for o in offsets for sp in o]
    n = len(flat)
    starts = np.fromiter((a for a, _ in flat), dtype=np.int64, count=n)
    ends = np.fromiter((b for _, b in flat), dtype=np.int64, count=n)
    pos = pos_tag_sents(sents, reference=True)
    pos_ids = np.fromiter((POS_ID[t] for tags in pos for t in tags), dtype=np.uint16, count=n)
    ner_ids = None
    if ner != 'none':
        ner_id = {t: i for i, t in enumerate(stream_tags('ner', ner))}
        iob = ner_tag_sents(sents, pos, ner, reference=True)
        ner_ids = np.fromiter((ner_id[t] for tags in iob for t in tags), dtype=np.uint16, count=n)
    return starts, ends, pos_ids, ner_ids

@lru_cache(maxsize=None)
def _iob_id_table(ch, ner):
    # [previous raw label index (len(labels): none), raw label index] -> NER stream id
    ner_id = {tg: i for i, tg in enumerate(stream_tags('ner', ner))}
    L = len(ch.labels)
    tab = np.zeros((L + 1, L), dtype=np.uint16)
    for a in range(L + 1):
        for b in range(L):
            tab[a, b] = ner_id[_iob(ch.labels[b], ch.labels[a] if a < L else None)]
    return tab

@lru_cache(maxsize=None)
def _pos_id_of_tag(tg):
    # tag index of the fast POS tagger -> POS stream id
    return np.array([POS_ID.get(t, UNK) for t in tg.tags], dtype=np.uint16)

# ---- BPE tokens and alignment

@_memo(1 << 20)
def _encode_chunk(chunk):
    # Zipf: most word chunks (' the', ',', ...) repeat, so the cache hits most of the time
    return tuple(encoding().encode_ordinary(chunk))

def tokenize(text, starts, ends, tokenization='lime'):
    """GPT-2 token ids of a text. 'lime': each word chunk (the whitespace and any
    untokenized characters before a word, plus the word) is encoded on its own, so no
    token crosses a word boundary; 'plain': encode_ordinary over the whole text."""
    if tokenization == 'plain':
        return np.array(encoding().encode_ordinary(text), dtype=np.int64)
    from itertools import chain
    cuts = ends.tolist()
    if not cuts or cuts[-1] < len(text):
        cuts.append(len(text))                        # the text after the last word
    chunks = list(map(text.__getitem__, map(slice, [0] + cuts[:-1], cuts)))
    got = list(map(_encode_chunk.cache.get, chunks))
    if None in got:
        got = [g if g is not None else _encode_chunk(c) for g, c in zip(got, chunks)]
    return np.fromiter(chain.from_iterable(got), dtype=np.int64)

@lru_cache(maxsize=None)
def _token_bytes_len():
    """Byte length of every token of encoding() (to turn token ids into byte offsets)."""
    enc, t = encoding(), _gpt2_tables()
    out = np.zeros(enc.n_vocab, dtype=np.int64)
    keep = t['ranks'] < enc.n_vocab   # gpt2-N: its first N ranks (and rank N, overwritten next)
    out[t['ranks'][keep]] = t['lens'][keep]
    for s, i in enc._special_tokens.items():
        out[i] = len(s.encode('utf-8'))
    return out

def _char_of_byte(text):
    """Index of the character each UTF-8 byte of text belongs to."""
    data = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
    return np.cumsum((data & 0xC0) != 0x80) - 1  # non-continuation bytes start a character

def decode_text(ids):
    """Text of a token stream with invalid UTF-8 (e.g. a cut multi-byte character)
    replaced by U+FFFD, one per invalid byte, plus the byte -> char map it implies."""
    data = encoding().decode_bytes(list(ids))
    try:
        return data.decode('utf-8'), None
    except UnicodeDecodeError:
        s = data.decode('utf-8', errors='surrogateescape')
        return ''.join('\ufffd' if '\udc80' <= c <= '\udcff' else c for c in s), s

def _decode_with_char_map(ids):
    """(text, char_of_byte) of any token stream, valid UTF-8 or not: decode_text's text and
    the index of the character each byte of the stream belongs to."""
    text, escaped = decode_text(ids)
    if escaped is None:
        return text, _char_of_byte(text)
    # invalid UTF-8 (rare): each escaped byte is one character
    nb = [1 if '\udc80' <= c <= '\udcff' else len(c.encode('utf-8')) for c in escaped]
    return text, np.repeat(np.arange(len(nb)), nb)

def _token_char_spans(ids, char_of_byte):
    """Character span (start, end) of each token; a token that splits a multi-byte
    character covers that character; an empty token is an empty span."""
    blen = _token_bytes_len()[ids]
    bend = np.cumsum(blen)
    if len(char_of_byte) == 0:
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    ce = char_of_byte[np.maximum(bend - 1, 0)] + 1
    cs = np.where(blen == 0, ce, char_of_byte[np.minimum(bend - blen, len(char_of_byte) - 1)])
    return cs, ce

def _char_offsets_any(ids):
    """(text, token char starts, token char ends) for any token stream, valid UTF-8 or not."""
    text, char_of_byte = _decode_with_char_map(ids)
    return (text,) + _token_char_spans(ids, char_of_byte)

def align(tok_start, tok_end, starts, ends):
    """Word index of each token: the word with the largest character overlap (ties: the
    first), -1 for a token that overlaps no word (whitespace). Words do not overlap and
    are sorted, so candidates are a contiguous range found by binary search."""
    lo = np.searchsorted(ends, tok_start, side='right')   # first word ending after token start
    hi = np.searchsorted(starts, tok_end, side='left')    # words starting before token end
    out = np.where(hi > lo, lo, -1).astype(np.int64)
    for t in np.nonzero(hi - lo > 1)[0].tolist():         # token spans several words: rare
        a, b = int(lo[t]), int(hi[t])
        out[t] = a + _largest_overlap(int(tok_start[t]), int(tok_end[t]),
                                      zip(starts[a:b].tolist(), ends[a:b].tolist()))
    return out

def _largest_overlap(ts, te, spans):
    """The alignment rule: index in spans (sorted, disjoint words) of the one with the largest
    character overlap with the token [ts, te), the first on ties; -1 if none overlaps."""
    best, most = -1, 0
    for i, (x, y) in enumerate(spans):
        ov = min(y, te) - max(x, ts)
        if ov > most:
            best, most = i, ov
    return best

def _streams_from_alignment(widx, pos_ids, ner_ids):
    """Per-token streams from the word index of each token (-1 = no word -> <space>)."""
    streams = {}
    none = widx < 0
    safe = np.where(none, 0, widx)
    streams['pos'] = np.where(none, SPACE, pos_ids[safe] if len(pos_ids) else SPACE).astype(np.uint16)
    if ner_ids is not None:
        streams['ner'] = np.where(none, SPACE, ner_ids[safe] if len(ner_ids) else SPACE).astype(np.uint16)
    # word boundary: the first token of each word starts it
    first = np.ones(len(widx), dtype=bool)
    first[1:] = widx[1:] != widx[:-1]
    streams['word'] = np.where(none, SPACE, np.where(first, WORD_B, WORD_I)).astype(np.uint16)
    return streams

@_gc_paused
def annotate_ids(ids, ner='binary', tags='full', reference=False):
    """Metadata of a token-id stream: decode, annotate, align by overlap.
    <|endoftext|> positions get <pad> and separate documents.
    tags='causal': the metadata of token t is computed from the tokens <= t only."""
    ids = np.asarray(ids, dtype=np.int64)
    if tags == 'causal':
        return annotate_causal(ids, ner, reference)
    names = stream_names(ner, ('full',))
    out = {k: np.full(len(ids), PAD, dtype=np.uint16) for k in names}
    for a, b in split_documents(ids):
        for k, v in _annotate_doc_ids(ids[a:b], ner, reference).items():
            out[k][a:b] = v
    return out

def _annotate_doc_ids(ids, ner, reference):
    text, cs, ce = _char_offsets_any(ids)
    starts, ends, pos_ids, ner_ids = analyze(text, ner, reference)
    return _streams_from_alignment(align(cs, ce, starts, ends), pos_ids, ner_ids)

def split_documents(ids):
    """(start, end) of each document of a token stream; <|endoftext|> separates them."""
    eot = np.nonzero(ids == encoding().eot_token)[0]
    bounds = np.concatenate([[-1], eot, [len(ids)]])
    return [(int(a) + 1, int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]

# -----------------------------------------------------------------------------
# causal metadata: the tags of token t may depend on tokens <= t only

def annotate_causal_reference(ids, ner='binary', reference=False):
    """The definition, quadratic: causal(ids)[t] = full(ids[d:t+1])[t-d], d = start of t's
    document. Used by tests; annotate_causal is the efficient equivalent."""
    ids = np.asarray(ids, dtype=np.int64)
    names = [n + '_causal' for n in stream_names(ner, ('full',)) if n != 'word']
    out = {k: np.full(len(ids), PAD, dtype=np.uint16) for k in names}
    for a, b in split_documents(ids):
        for t in range(a, b):
            full = _annotate_doc_ids(ids[a:t + 1], ner, reference)
            for k in names:
                out[k][t] = full[base_stream(k)][t - a]
    return out

@_gc_paused
def annotate_causal(ids, ner='binary', reference=False):
    """Causal metadata, equal to annotate_causal_reference (the definition) but near-linear:
    each prefix reuses the annotation of the whole document except near its end (see
    _causal_doc)."""
    ids = np.asarray(ids, dtype=np.int64)
    names = [n + '_causal' for n in stream_names(ner, ('full',)) if n != 'word']
    out = {k: np.full(len(ids), PAD, dtype=np.uint16) for k in names}
    for a, b in split_documents(ids):
        for k, v in _causal_doc(ids[a:b], ner, reference).items():
            out[k + '_causal'][a:b] = v
    return out

_CAUSAL_SIMPLE_TOKENS = True  # False: every token takes the general path (tests compare the two)
# tokens, simple: of the last _causal_doc call; chars (the characters handed to punkt, the word
# tokenizer and the taggers on the general path and in the stream) and how often each long-run
# shortcut was taken (sync, rep, punkt_cut, extra: _CausalDoc.ref_sentence, adopt: _StreamDoc.adopt):
# counted on, the tests reset them
_CAUSAL_STATS = {'tokens': 0, 'simple': 0, 'chars': 0, 'sync': 0, 'rep': 0, 'punkt_cut': 0, 'extra': 0, 'adopt': 0}
_CAUSAL_BLOCK = 8192          # general-path tokens handled together (bounds memory on long documents)
_STASH = 8                    # sentences of earlier texts a CausalStream keeps (_StreamDoc.adopt)
# words kept before the first re-tagged one, so that both resumed taggers start mid-sentence:
# POS reads POS_WINDOW words back; NE starts at most NE_WINDOW words before the first re-tagged
# one and needs NE_START tokens before its start
_KEEP = max(POS_WINDOW, NE_WINDOW + NE_START)

def _causal_doc(ids, ner, reference):
    """Causal tags of one document (no <|endoftext|> inside): for every token t, the tags that
    full(ids[:t+1]) gives token t (the definition), without annotating every prefix anew.

    The prefix ids[:t+1] decodes to the document's text cut after C[t] characters (plus one
    U+FFFD per byte of a character the cut splits). Its annotation differs from the
    document's only near its end, and three facts bound what has to be redone:
    1. Sentences. punkt decides a candidate break (at . ? !) from a few words around it; a
       break whose decision is settled in the prefix (the prefix holds all that punkt reads
       for it) is the document's break. So the prefix's sentences are the document's up to
       the last settled break, and punkt is rerun from there only while a decision is open.
    2. Words. The Treebank word tokenizer acts within whitespace-separated chunks (plus the
       sentence's first characters and its tail: a final period before closing brackets, quotes
       and spaces), so the words of the prefix's last sentence are the document's words up to
       the chunk that holds the token's start (or either sentence's tail, if earlier), and
       that chunk on is re-tokenized (as the end of the text).
    3. Tags. Both taggers are greedy, left to right, with bounded windows (nltk_fast: a POS
       tag reads words i-2..i+2 and the two previous tags; a raw NE label the (word, pos)
       tokens i-1..i+1 and the previous label). So every word before the first word whose
       window holds a changed item keeps the document's tag, and tagging resumes from that
       word after the document's tags, which is exactly what the greedy loop would do.
    The token then takes the tags of the prefix word it overlaps most (_largest_overlap,
    align's rule), <space> when it overlaps none. Inside a long run without whitespace three
    more facts keep the work per token bounded (see "long runs without whitespace" below).

    Steps: _prefix_spans (each prefix's end and the token's span in it), _CausalDoc (the
    document annotated once), _punkt_settlement (open decisions), _simple_tokens (most tokens:
    the prefix ends in a letters-only word that starts a chunk; all tagged at once by
    _causal_simple_tags), then for the other tokens, in blocks: _prefix_words (the prefix's
    words near its end), _retag_pos and _retag_ne (the greedy taggers resumed, all prefixes
    of a block in one batch), _best_word_tags. tests/test_metadata_causal.py compares the
    result with the definition and the simple path with the general one."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    text, C, M, CS, CE = _prefix_spans(ids)
    doc = _CausalDoc(text, ner, reference)
    open_at, sent_of = _punkt_settlement(doc, C)
    # a token with no characters, or of whitespace only (no cut character), overlaps no word
    # of any prefix: <space>
    blank = (CE <= CS) | ((M == 0) & doc.only_space(CS, CE))
    pos_out = np.full(n, SPACE, dtype=np.uint16)
    ner_out = np.full(n, SPACE, dtype=np.uint16) if ner != 'none' else None

    # most tokens: all at once
    simple = None
    if _CAUSAL_SIMPLE_TOKENS and not reference:
        simple = _simple_tokens(doc, C, M, CS, CE, open_at, sent_of, blank)
    general = ~blank
    if simple is not None:
        general[simple.t] = False
        pos_out[simple.t], ner_ids = _causal_simple_tags(doc, simple, ner)
        if ner_out is not None:
            ner_out[simple.t] = ner_ids
    _CAUSAL_STATS.update(tokens=n, simple=0 if simple is None else len(simple.t))

    # the others: the general steps, a block of tokens at a time
    ner_id = {tg: i for i, tg in enumerate(stream_tags('ner', ner))} if ner != 'none' else None
    todo = np.nonzero(general)[0]
    for b in range(0, len(todo), _CAUSAL_BLOCK):
        block = todo[b:b + _CAUSAL_BLOCK]
        rows = list(zip(*(a[block].tolist() for a in (C, M, CS, CE, open_at, sent_of))))
        near = [_prefix_words(doc, c, m, cs, ce, o, st, reference) for c, m, cs, ce, o, st in rows]
        found = [d for _, ds in near for d in ds]
        _retag_pos(doc, found, reference)
        if ner != 'none':
            _retag_ne(doc, found, ner, reference)
        for t, (c, m, cs, ce, _, _), (old, ds) in zip(block.tolist(), rows, near):
            tags = _best_word_tags(doc, cs, ce, old, ds, ner_id)
            if tags is not None:
                pos_out[t] = tags[0]
                if ner_out is not None:
                    ner_out[t] = tags[1]
    res = {'pos': pos_out}
    if ner_out is not None:
        res['ner'] = ner_out
    return res

def _prefix_spans(ids):
    """(text, C, M, CS, CE): the document's text, and per token t: the prefix ids[:t+1] decodes
    to text[:C[t]] plus M[t] U+FFFD (one per byte of a character the prefix cuts, as
    decode_text does), and the token's characters in that prefix are [CS[t], CE[t])."""
    text, cob = _decode_with_char_map(ids)
    cstart = np.append(np.flatnonzero(np.diff(cob, prepend=-1)), len(cob))   # byte start of each char (+ end)
    blen = _token_bytes_len()[ids]
    bend = np.cumsum(blen)
    C = np.searchsorted(cstart[1:], bend, side='right')      # complete chars in each prefix
    M = bend - cstart[C]                                      # bytes of a cut char (-> U+FFFD each)
    bs = bend - blen
    CS = np.where(bs < cstart[C], cob[np.minimum(bs, max(len(cob) - 1, 0))] if len(cob) else 0,
                  C + (bs - cstart[C]))
    return text, C, M, CS, C + M

class _CausalDoc:
    """A document on the causal path: its text, its full annotation (_doc_analysis: sents,
    spans, fb, words, pos, raw, per sentence), flat word arrays, and lookups by character
    (TextIndex: whitespace, separators, candidate sentence ends) that do not scan the text.
    The online stream has the same interface (_StreamDoc)."""

    def __init__(self, text, ner, reference):
        self.text, self.L, self.ner, self.reference = text, len(text), ner, reference
        self.sents, self.spans, self.fb, self.words, self.pos, self.raw = _doc_analysis(text, ner, reference)
        spans, sents = self.spans, self.sents
        self.nsent = len(sents)
        self.start_of = {s: j for j, (s, _) in enumerate(sents)}
        self.sstarts = np.array([s for s, _ in sents], dtype=np.int64)
        self.rstarts = [[x for x, _ in sp] for sp in spans]    # word starts within each sentence
        # the flat words of the document: first word of each sentence, spans, sentence
        self.wfirst = np.cumsum([0] + [len(sp) for sp in spans])
        self.wstart = np.array([sents[j][0] + a for j, sp in enumerate(spans) for a, _ in sp], dtype=np.int64)
        self.wend = np.array([sents[j][0] + b for j, sp in enumerate(spans) for _, b in sp], dtype=np.int64)
        self.wsent = [j for j, sp in enumerate(spans) for _ in sp]
        self.sstarts_l, self.wfirst_l = self.sstarts.tolist(), self.wfirst.tolist()
        self.wstart_l, self.wend_l = self.wstart.tolist(), self.wend.tolist()
        # characters: whitespace positions and, for each, where its run of whitespace ends
        self.index = TextIndex(text)
        self.ws = ws = np.frombuffer(self.index.pos['ws'], dtype=np.int64)
        self.sep = np.frombuffer(self.index.pos['sep'], dtype=np.int64)
        self.ws_run_end = np.zeros(0, dtype=np.int64)
        if len(ws):
            new_run = np.diff(ws, prepend=-2) != 1
            last = np.append(np.flatnonzero(new_run)[1:] - 1, len(ws) - 1)   # last position of each run
            self.ws_run_end = ws[last][np.cumsum(new_run) - 1] + 1
        self.isws = np.zeros(self.L, dtype=bool)
        self.isws[ws] = True
        self.brk = []        # set by _punkt_settlement
        self.middles = {}    # long words' middles (_word_str)
        self.sentence_ends = {}   # stretch start -> what _sentence_ends has read
        self.extra = {}      # (start, end) -> index of an extra reference sentence (ref_sentence)

    def ref_sentence(self, s, e, c, j):
        """The sentence that the prefix sentence [s, e) (its text: text[:c], then U+FFFD) is
        compared with: the document's sentence j that starts there, or, where that leaves more
        than _SYNC_MIN characters of it uncovered (no document sentence starts at s, or the one
        there ends long before: a break that only some prefixes make, as after 'Mr. ' before a
        run 'x.,x.,'), text[s:E] annotated as one sentence, E the end of the document's
        sentence that holds the prefix's end. The steps only use that the reference's text is
        the prefix's before c and starts at s, so they stay exact; this saves the prefix
        sentence's re-tokenization and re-tagging from its start. Extra sentences get indices
        from nsent on (after the simple path has read doc.pos)."""
        end = min(e, c)
        if end - (self.sents[j][1] if j is not None else s) <= _SYNC_MIN:
            return j
        k = bisect.bisect_right(self.sstarts_l, end - 1) - 1
        E = max(end, self.sents[k][1] if k >= 0 else end)
        x = self.extra.get((s, E))
        if x is None:
            if not self.extra:   # own lists (the analysis is a shared, read-only cache entry)
                self.sents, self.spans, self.fb, self.pos = map(list, (self.sents, self.spans, self.fb, self.pos))
                self.raw = list(self.raw) if self.raw is not None else None
            _CAUSAL_STATS['chars'] += E - s
            _CAUSAL_STATS['extra'] += 1
            sp, f = _word_spans(self.text[s:E], self.reference)
            words = [self.text[s + a:s + b] for a, b in sp]
            pos = pos_tag_sents([words], self.reference)[0]
            x = self.extra[(s, E)] = len(self.sents)
            self.sents.append((s, E)); self.spans.append(sp); self.fb.append(f); self.pos.append(pos)
            self.rstarts.append([a for a, _ in sp])
            if self.raw is not None:
                self.raw.append(ner_raw_resume([(list(zip(words, pos)), 0, [], len(words))], self.ner, self.reference)[0])
        return x

    def sep_before(self, x):
        """The last ' ', '\\n', '\\r' or '\\t' at or before x (-1: none)."""
        return self.index.last_before('sep', x)

    def sep_before_all(self, x):
        k = np.searchsorted(self.sep, x, side='right') - 1
        return np.where(k >= 0, self.sep[np.maximum(k, 0)] if len(self.sep) else -1, -1)

    def rstrip_end(self, c):
        return self.index.rstrip_end(c)

    def next_space(self, x):
        """The first whitespace at or after each x (L: none)."""
        ws, L = self.ws, self.L
        if not len(ws):
            return np.full_like(x, L)
        k = np.searchsorted(ws, x)
        return np.where(k < len(ws), ws[np.minimum(k, len(ws) - 1)], L)

    def next_nonspace(self, x):
        """The first non-whitespace at or after each x (L: none), x <= L."""
        ws = self.ws
        if not len(ws):
            return x
        k = np.minimum(np.searchsorted(ws, x), len(ws) - 1)
        return np.where(ws[k] == x, self.ws_run_end[k], x)

    def only_space(self, a, b):
        """Whether text[a:b] is non-empty whitespace (arrays of spans)."""
        ws = self.ws
        if not len(ws):
            return np.zeros(len(a), dtype=bool)
        k = np.minimum(np.searchsorted(ws, a), len(ws) - 1)
        return (b > a) & (ws[k] == a) & (self.ws_run_end[k] >= b)

def _punkt_settlement(doc, C):
    """Which punkt decisions are still open at the end of each prefix (C: its complete chars).
    punkt decides a candidate break at a [.?!] from the character's word, the next word and
    the whitespace after it (and the closing quotes realigned after it), so the decision is
    final (settled) in a prefix that holds all of that plus the next non-space character:
    settle(p) = end of (word, spaces, word, spaces) after p, + 1.
    Returns per token (open_at, sent_of): the first candidate before the prefix end whose
    decision is open (-1: none), and the sentence whose start was created by the last
    candidate before the prefix end (-1: the first). Sets doc.brk: per sentence, whether
    re-segmenting may start there (whitespace lies between its start and its first [.?!])."""
    L = doc.L
    P = np.frombuffer(doc.index.pos[_cand_kind(doc)], dtype=np.int64)
    sp, nsp = doc.next_space, doc.next_nonspace
    settle = nsp(sp(nsp(sp(P)))) + 1
    settle = np.where(settle > L, L + 2, settle)                     # never settled inside the text
    settle = np.maximum.accumulate(settle) if len(settle) else settle
    n_settled = np.searchsorted(settle, C, side='right')
    n_before = np.searchsorted(P, C, side='left')
    open_at = np.where(n_settled < n_before, P[np.minimum(n_settled, max(len(P) - 1, 0))] if len(P) else -1, -1)
    # the candidate before each sentence start that created it (-1: the first sentence)
    sstarts = doc.sstarts
    kP = np.searchsorted(P, sstarts) - 1
    creator = np.where(kP >= 0, P[np.maximum(kP, 0)] if len(P) else -1, -1)
    sent_of = (np.searchsorted(creator, C, side='left') - 1 if doc.nsent
               else np.full(len(C), -1, dtype=np.int64))
    k2 = np.searchsorted(P, sstarts)
    p2 = np.where(k2 < len(P), P[np.minimum(k2, len(P) - 1)], L) if len(P) else np.full(len(sstarts), L)
    doc.brk = (sp(sstarts) < p2).tolist()
    return open_at, sent_of

# ---- the general path, one token at a time

@dataclass
class _PrefixSentence:
    """One sentence of a token's prefix that the token reaches, from word o on: the words that
    the resumed taggers read (o .. nw-1), the words the token overlaps (lo .. hi), and the
    re-tagged ones (i0 .. stop-1); words before i0 keep the document's tags."""
    j: object          # the document's sentence that starts at s (None: none starts there)
    s: int             # its first character
    c: int             # the prefix's text is the document's before c (a word ending after c differs)
    o: int             # first word kept
    spans: list        # spans of words o .. nw-1, relative to s
    words: list        # their strings (long words: representatives, _word_str)
    lo: int            # first word the token overlaps
    hi: int            # last word the token overlaps
    nw: int            # words of this sentence in the prefix
    i0: int            # first re-tagged word
    stop: int          # re-tagged up to (not including) stop: the NE tagger reads the POS of hi + 1
    fb: bool = False   # the words came from the regex fallback
    pos: list = None   # POS tags of words o .. stop-1
    jcut: int = 0      # the raw NE labels of words before jcut are the document's
    raw: list = None   # the raw NE labels of words jcut .. hi

def _prefix_words(doc, c, m, cs, ce, open_at, sent, reference):
    """The words of a prefix (text[:c] + m U+FFFD) that its last token [cs, ce) may overlap:
    (old, found): flat indices of the document's words in settled sentences, and the prefix's
    own last sentences that the token reaches (_PrefixSentence)."""
    jfirst, new = _prefix_sentences(doc, c, m, open_at, sent)
    old = []
    if jfirst > 0:   # a token can reach back into earlier sentences (plain BPE: ' .' and the like)
        lim = doc.wfirst_l[jfirst]
        for w in range(bisect.bisect_right(doc.wend_l, cs, 0, lim), lim):
            if doc.wstart_l[w] < ce:
                old.append(w)
    found = []
    for s, e in new:
        if e > cs and s < ce:
            d = _prefix_sentence(doc, s, e, c, cs, ce, reference)
            if d is not None:
                found.append(d)
    return old, found

def _prefix_sentences(doc, c, m, open_at, sent):
    """(jfirst, [(start, end)]): the prefix's sentences are the document's sentences before
    jfirst, then these."""
    if open_at >= 0:   # an open punkt decision: re-segment from a settled sentence start
        jw = bisect.bisect_right(doc.sstarts_l, open_at) - 1
        while jw > 0 and not doc.brk[jw]:
            jw -= 1
        jw = max(jw, 0)
        W = doc.sstarts_l[jw] if doc.nsent else 0
        ptext, back = _punkt_input(doc, W, c, m)   # long stretches shortened (same sentences)
        _CAUSAL_STATS['chars'] += len(ptext)
        new = [(back(a), back(b)) for a, b in _sentence_tokenizer().span_tokenize(ptext)]
        if any(a is None or b is None for a, b in new):   # (never: punkt does not break there)
            ptext = doc.text[W:c] + '\ufffd' * m
            new = [(W + a, W + b) for a, b in _sentence_tokenizer().span_tokenize(ptext)]
        return jw, new
    # all settled: the last sentence starts where the document's does and ends at the prefix's
    # last non-space character (or its cut character)
    j = max(sent, 0)
    s0 = doc.sstarts_l[j] if doc.nsent else 0
    e0 = c + m if m else doc.rstrip_end(c)
    return j, ([(s0, e0)] if e0 > s0 else [])

def _prefix_sentence(doc, s, e, c, cs, ce, reference, whole=False, same_end=None):
    """The prefix's sentence [s, e) around the token [cs, ce) (_PrefixSentence), or None if the
    token overlaps none of its words. whole: the words from the one that holds cs (or the first
    re-tokenized one) to the sentence's end count as overlapped (the stream's update).
    same_end: the prefix's text equals the document's before it (default c; the stream: the
    characters its annotation was made from)."""
    same_end = c if same_end is None else same_end
    j = doc.ref_sentence(s, e, c, doc.start_of.get(s))
    ref = doc.spans[j] if j is not None else []          # the document's words of sentence j
    q, tail, fb = _sentence_tail(doc, s, e, j, ref, c, cs, reference, same_end)
    nw = q + len(tail)
    if whole:
        if not nw:
            return None
        lo = q
        for i, (x, y) in enumerate(tail):
            if y > cs - s:
                lo = q + i
                break
        lo, hi = min(lo, nw - 1), nw - 1
    else:
        # the words the token overlaps (words before q end before the token starts)
        lo = hi = -1
        for i, (x, y) in enumerate(tail):
            if x >= ce - s:
                break
            if y > cs - s:
                if lo < 0:
                    lo = i
                hi = i
        if lo < 0:
            return None
        lo, hi = lo + q, hi + q
    # meq: the first word that differs from the document's (or ends past the prefix)
    lim = min(nw, len(ref))
    meq = q
    while meq < lim and tail[meq - q] == ref[meq] and s + tail[meq - q][1] <= same_end:
        meq += 1
    stop = min(hi + 1 + NE_WINDOW, nw)
    same = meq == nw == len(ref)
    # the first word whose POS window holds a changed word; the words from o on are the ones
    # the resumed taggers read
    i0 = min(stop if same else max(0, meq - POS_WINDOW), stop)
    o = max(0, min(lo, i0 - _KEEP))
    spo = (ref[o:q] + tail) if o < q else tail[o - q:]
    return _PrefixSentence(j=j, s=s, c=same_end, o=o, spans=spo, words=[_word_str(doc, s + x, s + y, c) for x, y in spo],
                           lo=lo, hi=hi, nw=nw, i0=i0, stop=stop, fb=fb)

def _sentence_tail(doc, s, e, j, ref, c, cs, reference, same_end):
    """Word spans of the prefix sentence [s, e) (its text: text[s:c], then U+FFFD up to e):
    (q, tail, fb), its words are ref[:q] + tail (relative to s); fb: the regex fallback made
    them. The Treebank rules act within a whitespace-separated chunk (plus the sentence's first
    characters and its tail), so the words before the chunk holding the token's start (cs) are the
    document's, and the rest is the chunk on, tokenized as the end of a text; in a long chunk,
    from its last sync point before the token (fact 1 of the long-run notes), whose window must
    lie where the prefix's text is the document's (before same_end)."""
    text = doc.text
    mcut = max(0, e - c)

    def part(a):   # the prefix sentence's text from s + a on
        return text[s + a:min(e, c)] + '\ufffd' * (e - max(c, s + a)) if e > c else text[s + a:e]
    if j is not None and not doc.fb[j] and ref:
        cut = doc.sep_before(min(cs, c, doc.L - 1))
        chunk = max(cut + 1, s)
        end = min(e, c)   # the sentence's complete characters
        if min(cs, end) - chunk > _SYNC_MIN and _long_run_checks(doc.ner)[0]:
            m = sync_point(text, chunk, min(cs, min(end, same_end) - SYNC_G))
            if m >= 0:
                r = _sync_tail(doc, s, j, ref, m, end, mcut, reference)
                if r is not None:
                    _CAUSAL_STATS['sync'] += 1
                    return r + (False,)
        # the rules also read a sentence's tail (from its last character that is no closing
        # bracket or quote nor space, to its end: 'Mr. )' ends in Mr . ), FastWordSpans): where
        # the prefix sentence's or the reference's tail starts before the chunk, from there
        for x in ((e,) if e <= c else ()) + (doc.sents[j][1],):
            p = min(x, doc.L) - 1   # (the stream: an old sentence may end past the new text)
            while p >= s and (text[p] in FastWordSpans.CLOSERS or text[p].isspace()):
                p -= 1
            if s <= p < cut:
                cut = doc.sep_before(p)
        q = bisect.bisect_left(doc.rstarts[j], cut + 1 - s) if cut >= s else 0
        q = min(q, len(ref) - 1)
        while q > 0 and not text[s + ref[q][0] - 1].isspace():
            q -= 1
        if q > 0 and s + ref[q][0] < c:
            a = ref[q][0]
            _CAUSAL_STATS['chars'] += e - s - a
            wsp, f = _word_spans_memo((part(a), reference))
            if not f and wsp:
                return q, [(a + x, a + y) for x, y in wsp], False
    _CAUSAL_STATS['chars'] += e - s
    sp, f = _word_spans(part(0), reference)
    return 0, sp, f

def _retag_pos(doc, found, reference):
    """POS tags of the prefix sentences' words o .. stop-1: the document's before i0, then the
    greedy tagger resumed at i0 after the document's tags (all prefixes in one batch)."""
    jobs, todo = [], []
    for d in found:
        rp = doc.pos[d.j] if d.j is not None else []
        d.pos = rp[d.o:d.i0]
        if d.i0 < d.stop:
            jobs.append((d.words, d.i0 - d.o, rp[max(0, d.i0 - POS_WINDOW):d.i0], d.stop - d.o))
            todo.append(d)
    for d, tags in zip(todo, pos_tag_resume(jobs, reference)):
        d.pos = d.pos + tags

def _retag_ne(doc, found, ner, reference):
    """Raw NE labels of the prefix sentences' words up to hi: the document's before the word
    that reads the first changed (word, pos) token, then the greedy tagger resumed there."""
    jobs, todo = [], []
    for d in found:
        ref = doc.spans[d.j] if d.j is not None else []
        rp = doc.pos[d.j] if d.j is not None else []
        rr = doc.raw[d.j] if d.j is not None else []
        # f: the first word whose (word, pos) differs (the words before i0 are the document's)
        lim = min(d.nw, len(ref), d.stop)
        f = d.i0
        while (f < lim and d.spans[f - d.o] == ref[f] and d.s + d.spans[f - d.o][1] <= d.c
               and d.pos[f - d.o] == rp[f]):
            f += 1
        if f == lim and lim == d.stop and (d.stop < d.nw or len(ref) == d.nw):
            f = 1 << 62                  # every item the NE tagger reads is unchanged
        j0 = max(0, f - NE_WINDOW)       # the first label that reads a changed token
        d.jcut = min(j0, d.hi + 1)
        d.raw = []
        if j0 <= d.hi:
            o2 = max(d.o, j0 - NE_START)  # the job starts mid-sentence (or at the sentence start)
            wl = d.words[o2 - d.o:]
            pw = d.pos[o2 - d.o:]
            if len(pw) < len(wl):
                pw = pw + ['NN'] * (len(wl) - len(pw))   # past stop: never read
            jobs.append((list(zip(wl, pw)), j0 - o2, rr[o2:j0], d.hi + 1 - o2))
            todo.append(d)
    for d, labs in zip(todo, ner_raw_resume(jobs, ner, reference)):
        d.raw = labs

def _best_word_tags(doc, cs, ce, old, found, ner_id):
    """(POS id, NER id or None) of the prefix word that the token [cs, ce) overlaps most
    (align's rule), None if it overlaps none."""
    spans = [(doc.wstart_l[w], doc.wend_l[w]) for w in old]
    where = [(None, w) for w in old]
    for d in found:
        for i in range(d.lo, d.hi + 1):
            x, y = d.spans[i - d.o]
            spans.append((d.s + x, d.s + y))
            where.append((d, i))
    k = _largest_overlap(cs, ce, spans)
    if k < 0:
        return None
    d, i = where[k]
    if d is None:   # a word of a settled sentence: the document's tags
        j = doc.wsent[i]
        i -= doc.wfirst_l[j]
        if ner_id is None:
            return POS_ID[doc.pos[j][i]], None
        rr = doc.raw[j]
        return POS_ID[doc.pos[j][i]], ner_id[_iob(rr[i], rr[i - 1] if i else None)]
    if ner_id is None:
        return POS_ID[d.pos[i - d.o]], None
    # raw labels: the document's before jcut, the recomputed ones from jcut on
    rr, jc = doc.raw[d.j] if d.j is not None else [], d.jcut
    r = rr[i] if i < jc else d.raw[i - jc]
    rprev = None if i == 0 else (rr[i - 1] if i - 1 < jc else d.raw[i - 1 - jc])
    return POS_ID[d.pos[i - d.o]], ner_id[_iob(r, rprev)]

# ---- long runs without whitespace
# A prefix that ends inside a long whitespace-free run (a base64 blob, minified JSON, 'a' * n)
# would make the steps above cost the run's length per token. Four facts about NLTK keep the
# work per token bounded, each exact (nltk_fast.py, "long runs without whitespace", states and
# checks them): sync points (a prefix's words right of a sync point are those of a short window
# tokenized alone: _sync_tail), long-word representatives (a long word goes to the taggers as a
# short string with the same features: _word_str), shortened punkt input (_punkt_input), and
# only punkt's own candidate breaks keep a decision open (_cand_kind: not the periods of 'x.,').
# Each is used only where _long_run_checks says it holds for the installed NLTK. A break before
# the run whose decision flips with the prefix's last characters (after 'Mr. ', a run 'x.,x.,'
# breaks only where the prefix ends in ',') makes most prefixes' sentences differ from the
# document's: such a prefix sentence is compared with the run's text annotated once as one
# sentence (_CausalDoc.ref_sentence), and the stream with its own last annotation of that split
# (_StreamDoc.adopt), so the steps above again redo only the end.

_SYNC_MIN = 4 * SYNC_G      # chunk prefixes up to this long are re-tokenized whole (normal text)

def _sync_tail(doc, s, j, ref, m, end, mcut, reference):
    """The words of the prefix sentence at s (the document's sentence j, whose words are ref;
    the prefix sentence's text: text[s:end], then mcut U+FFFD) from the sync point m on: (q, tail)
    as _sentence_tail gives, or None."""
    G = SYNC_G
    if doc.sents[j][1] < m + G:   # the document's sentence must hold the whole window
        return None
    _CAUSAL_STATS['chars'] += end - m + G + mcut
    sp, f = _word_spans_memo((doc.text[m - G:end] + '\ufffd' * mcut, reference))
    if f or not sp:
        return None
    rel = m - s
    k = bisect.bisect_right(doc.rstarts[j], rel) - 1   # the last document word starting by m
    if k < 0 or ref[k][1] <= rel:
        k += 1                                          # ... ends by m: the first after it
    t = 0
    while t < len(sp) and sp[t][1] <= G:                # the first word of the window text ending after m
        t += 1
    if t == len(sp):
        return None
    across = k < len(ref) and ref[k][0] < rel           # a document word holds m
    if across != (sp[t][0] < G):                        # the lemma says they agree; stay exact
        return None
    off = m - G - s
    tail = [(off + a, off + b) for a, b in sp[t:]]
    if across:
        tail[0] = (ref[k][0], tail[0][1])
    return k, tail

def _word_str(doc, a, b, c):
    """The string the taggers get for the prefix word [a, b) (the prefix: text[:c], then U+FFFD):
    the word itself, or for a long word a representative with the same features (fact 2)."""
    text = doc.text
    if b - a >= LONG_WORD and _long_run_checks(doc.ner)[1]:
        H = REP_H
        head = text[a:a + H]
        tail = text[b - H:min(b, c)] + '\ufffd' * (b - max(c, b - H))
        if 'Σ' not in head and 'Σ' not in tail:
            summ = doc.middles.get(a + H)
            if summ is None or summ.end > b - H:
                summ = doc.middles[a + H] = MiddleSummary(a + H)
            if summ.extend(text, b - H).ok:
                _CAUSAL_STATS['rep'] += 1
                return head + rep_middle(summ.key()) + tail
    _CAUSAL_STATS['chars'] += b - a
    if b <= c:
        return text[a:b]
    return text[a:c] + '\ufffd' * (b - max(a, c))

@lru_cache(maxsize=None)
def _long_run_checks(ner):
    """(sync points, long-word representatives, punkt shortening): whether each holds here."""
    models = [_pos_tagger(False)] + ([_ne_chunker(ner, False)] if ner != 'none' else [])
    return nltk_fast.long_run_checks(_fast_word_spans(), _sentence_tokenizer(), models)

def _cand_kind(doc):
    """The kind of doc.index that holds the candidate sentence breaks: only those punkt's pattern
    may match (fact 4: a period before ',' '-' '.' or a letter is none) where that holds here,
    else every . ? ! (a run of such periods would keep a decision open, rerunning punkt per token)."""
    if _long_run_checks(doc.ner)[2]:
        doc.index.candidates()
        return 'pcand'
    return 'cand'

def _punkt_input(doc, W, c, mcut):
    """(text, back): the prefix from W (text[W:c] + mcut U+FFFD) for punkt, long stretches
    shortened when that holds here (nltk_fast.punkt_input); back maps its positions to doc's."""
    if c - W >= PUNKT_LONG and _long_run_checks(doc.ner)[2]:
        r = nltk_fast.punkt_input(_sentence_tokenizer(), doc.text, doc.index, doc.sentence_ends, W, c, mcut)
        if r is not None:
            _CAUSAL_STATS['punkt_cut'] += 1
            return r
    return doc.text[W:c] + '\ufffd' * mcut, lambda p: W + p

@dataclass
class _SimpleTokens:
    """The simple tokens (arrays over them): token t's prefix holds the words 0..q-1 of
    sentence j unchanged and ends in word q, whose text in the prefix is text[A:c] (the
    document's word q when comp). base: the flat index of sentence j's word 0; nwj: its words;
    i0: the first re-tagged word (q + 1: none)."""
    t: np.ndarray
    j: np.ndarray
    q: np.ndarray
    A: np.ndarray
    c: np.ndarray
    comp: np.ndarray
    base: np.ndarray
    nwj: np.ndarray
    i0: np.ndarray

def _simple_tokens(doc, C, M, CS, CE, open_at, sent_of, blank):
    """The tokens (most of them) whose prefix has no open punkt decision and ends inside or at
    the end of word q > 0 of its sentence j, where word q starts a whitespace-separated chunk
    and the text from its start to the prefix end is ASCII letters only: that text is then
    one word of the prefix whatever follows (FastWordSpans; the letter-only contractions go
    the general way), and the words before q are unchanged. A second kind: the prefix ends
    exactly at the end of word k >= q, the token overlaps word k only, and the chunk from
    word q re-tokenized as the text's end gives words q..k again. None if there are none."""
    text, L, n = doc.text, doc.L, len(C)
    if not (doc.nsent and L and n):
        return None
    wstart, wend, wfirst = doc.wstart, doc.wend, doc.wfirst
    j = np.maximum(sent_of, 0)
    cut = doc.sep_before_all(np.minimum(np.minimum(CS, C), L - 1))
    g = np.searchsorted(wstart, cut + 1)                  # first word starting after the cut
    nwj = wfirst[j + 1] - wfirst[j]                        # words of sentence j
    ql = g - wfirst[j]
    gg = np.minimum(g, max(len(wstart) - 1, 0))
    A = wstart[gg] if len(wstart) else np.zeros(n, np.int64)
    E = wend[gg] if len(wstart) else np.zeros(n, np.int64)
    cp = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
    asc = ((cp >= 65) & (cp <= 90)) | ((cp >= 97) & (cp <= 122))
    del cp
    acum = np.zeros(L + 1, dtype=np.int32 if L < 1 << 31 else np.int64)
    acum[1:] = np.cumsum(asc)
    fbv = np.asarray(doc.fb, dtype=bool)[j]
    base = ((M == 0) & ~blank & (open_at < 0) & ~fbv & (cut >= doc.sstarts[j]) & (ql > 0)
            & (ql < nwj) & (A < C) & doc.isws[np.maximum(A - 1, 0)])
    first = base & (C <= E) & (acum[np.minimum(C, L)] - acum[np.minimum(A, L)] == C - A)
    ke = np.minimum(np.searchsorted(wend, C), max(len(wend) - 1, 0))
    kl = ke - wfirst[j]
    second = (base & ~first & (wend[ke] == C) & (kl >= ql) & (kl < nwj)
              & (CS >= wend[np.maximum(ke - 1, 0)]) & (C - A < LONG_WORD))   # (a long chunk: the general path)
    q, Aq = np.where(second, kl, ql), np.where(second, wstart[ke], A)
    simple = first | second
    # first kind: the letter-only contractions (cannot -> can not, ...) go the general way
    n_splits = sorted({len(w) for w in FastWordSpans.LETTER_SPLITS})
    for t in np.nonzero(first & np.isin(C - Aq, n_splits))[0].tolist():
        if text[int(Aq[t]):int(C[t])].lower() in FastWordSpans.LETTER_SPLITS:
            simple[t] = False
    # second kind: the chunk re-tokenized as the text's end gives the document's words q..k
    wstart_l, wend_l, wfirst_l = doc.wstart_l, doc.wend_l, doc.wfirst_l
    for t in np.nonzero(second)[0].tolist():
        A0, c = int(A[t]), int(C[t])
        sp, f = _word_spans_memo((text[A0:c], False))
        g0 = wfirst_l[int(j[t])] + int(q[t]) - len(sp) + 1   # flat index of word q
        simple[t] = bool(sp and not f and 0 <= g0 and wstart_l[g0] == A0
                         and all(x == wstart_l[g0 + i] - A0 and y == wend_l[g0 + i] - A0
                                 for i, (x, y) in enumerate(sp)))
    tk = np.nonzero(simple)[0]
    if not len(tk):
        return None
    jj, qq = j[tk], q[tk]
    base = wfirst[jj]
    comp = C[tk] == wend[base + qq]
    nwj = wfirst[jj + 1] - base
    # the first changed word is q (cut) or q + 1 (complete: the word after it is gone), none
    # when q is complete and the sentence's last word; the POS windows reach POS_WINDOW back
    i0 = np.where(comp & (qq == nwj - 1), qq + 1, np.maximum(0, qq + comp - POS_WINDOW))
    return _SimpleTokens(t=tk, j=jj, q=qq, A=Aq[tk], c=C[tk], comp=comp, base=base, nwj=nwj, i0=i0)

# the windows of the simple tokens: POS re-tags words q-POS_WINDOW .. q, reading words
# q-2*POS_WINDOW .. q+POS_WINDOW; NE labels from at most NE_WINDOW words before those, reading
# NE_WINDOW more before (and nothing after q: the prefix ends in word q)
_POS_SLOTS = 3 * POS_WINDOW + 1             # slot x - (q - 2 * POS_WINDOW) holds word x
_NE_SLOTS = POS_WINDOW + 2 * NE_WINDOW + 1  # slot x - (q - _NE_SLOTS + 1) holds word x

def _causal_simple_tags(doc, sm, ner):
    """Causal (POS ids, NER ids or None) of the simple tokens, all at once: POS re-tagged from
    meq - POS_WINDOW (meq, the first changed word: q if cut, else q + 1: the word after q is
    gone from the prefix; nothing if q is the sentence's last word and complete), NE from the
    first word whose (word, pos) changed, each token in a window of fixed width of the flat
    layouts the fast taggers score. Same result as the general path (tests)."""
    tg = _pos_tagger(False)
    wflat = [w for ws in doc.words for w in ws]
    pflat = [t for ts in doc.pos for t in ts]
    ptag = np.fromiter((tg.tag_idx[t] for t in pflat), dtype=np.int64, count=len(pflat))
    newt, pos_ids = _simple_pos(doc, sm, tg, wflat, ptag)
    if ner == 'none':
        return pos_ids, None
    return pos_ids, _simple_ne(doc, sm, ner, tg, wflat, pflat, ptag, newt)

def _clip(arr, x):
    # arr[x] with x clipped into range (the slots outside a sentence hold any valid id: unread)
    return arr[np.clip(x, 0, max(len(arr) - 1, 0))]

def _simple_pos(doc, sm, tg, wflat, ptag):
    """(newt, pos_ids): the new tag indices of words q-POS_WINDOW .. q (-1: not re-tagged)
    and the POS stream id of word q."""
    q, comp, n, base, i0 = sm.q, sm.comp, len(sm.q), sm.base, sm.i0
    # word ids: the document's words, and word q as cut in the prefix
    wid = tg.ids(wflat)
    lid = _clip(wid, base + q).copy()
    cut = np.nonzero(~comp)[0]
    if len(cut):
        lid[cut] = tg.ids([_word_str(doc, a, b, b) for a, b in zip(sm.A[cut].tolist(), sm.c[cut].tolist())])
    need = np.nonzero(i0 <= q)[0]
    qn, i0n = q[need], i0[need]
    # the windows: -START- -START2- (ids 0, 1) before word 0, -END- -END2- (ids 2, 3) after q
    X = qn[:, None] - 2 * POS_WINDOW + np.arange(_POS_SLOTS)[None, :]
    Q = qn[:, None]
    win = np.where(X > Q, np.minimum(X - Q + 1, 3),
          np.where(X == Q, lid[need, None],
          np.where(X >= 0, _clip(wid, base[need, None] + X), np.clip(X + 2, 0, 1))))
    starts = np.arange(len(need)) * _POS_SLOTS + 2 * POS_WINDOW - (qn - i0n)
    lens = qn - i0n + 1
    t_s0, t_s1 = tg.tag_idx[tg.START[0]], tg.tag_idx[tg.START[1]]

    def hist(x):   # the document's tag of word x of the sentence (START tags before word 0)
        return np.where(x >= 0, _clip(ptag, base[need] + x), np.where(x == -1, t_s0, t_s1))

    def job(k):    # for a near-tie only: the prefix sentence's words and the first tagged one
        r = int(need[k])
        jj, qq = int(sm.j[r]), int(q[r])
        last = doc.words[jj][qq] if comp[r] else _word_str(doc, int(sm.A[r]), int(sm.c[r]), int(sm.c[r]))
        return (doc.words[jj][:qq] + [last], int(i0[r]))
    tags = tg.tag_windows(win.reshape(-1), starts, lens, hist(i0n - 1).tolist(), hist(i0n - 2).tolist(), job)
    newt = np.full((n, POS_WINDOW + 1), -1, dtype=np.int64)
    for s_ in range(POS_WINDOW + 1):
        x = qn - POS_WINDOW + s_                          # sentence index of this column
        ok = x >= i0n
        newt[need[ok], s_] = tags[(np.arange(len(need)) * _POS_SLOTS + POS_WINDOW + s_)[ok]]
    qtag = np.where(newt[:, -1] >= 0, newt[:, -1], _clip(ptag, base + q))
    return newt, _pos_id_of_tag(tg)[qtag]

def _simple_ne(doc, sm, ner, tg, wflat, pflat, ptag, newt):
    """The NER stream ids of word q: raw labels recomputed from the first word whose NE
    tagger input changed, then the IOB fixup with the previous word's label."""
    ch = _ne_chunker(ner, False)
    q, comp, n, base, i0 = sm.q, sm.comp, len(sm.q), sm.base, sm.i0
    # f: the first word whose (word, pos) changed: a new tag, or the cut word q; f advances
    # over a re-tagged word only while every one so far kept its tag
    f = i0.copy()
    for s_ in range(POS_WINDOW + 1):
        x = q - POS_WINDOW + s_
        col = newt[:, s_]
        same = (col < 0) | (col == _clip(ptag, base + x))
        if s_ == POS_WINDOW:
            same &= comp
        f = np.where((f == x) & (x >= i0) & same, x + 1, f)
    done = (f == q + 1) & (q == sm.nwj - 1)                  # every input the tagger reads unchanged
    j0 = np.maximum(0, f - NE_WINDOW)
    jcut = np.minimum(j0, q + 1)
    nj = np.nonzero(~done & (j0 <= q))[0]
    rflat = [lab for rs in doc.raw for lab in rs]
    rlab = np.fromiter((ch.label_idx[x] for x in rflat), dtype=np.int64, count=len(rflat))
    # the windows: the document's (word, pos) tokens, and the changed ones (new POS, word q cut)
    nid = ch.ids(list(zip(wflat, pflat)))
    qj, j0n = q[nj], j0[nj]
    first_slot = qj - _NE_SLOTS + 1
    win = _clip(nid, base[nj, None] + first_slot[:, None] + np.arange(_NE_SLOTS)[None, :]).copy()
    for s_ in range(POS_WINDOW + 1):
        col = newt[nj, s_]
        xs = qj - POS_WINDOW + s_
        last = s_ == POS_WINDOW
        chg = (col >= 0) & ((col != _clip(ptag, base[nj] + xs)) | (last & ~comp[nj]))
        rows = np.nonzero(chg)[0]
        if len(rows):
            r_all = nj[rows]
            wl = [doc.words[jj][xx] if (not last or comp[rr]) else _word_str(doc, aa, cc, cc)
                  for rr, jj, xx, aa, cc in zip(r_all.tolist(), sm.j[r_all].tolist(), xs[rows].tolist(),
                                                sm.A[r_all].tolist(), sm.c[r_all].tolist())]
            win[rows, _NE_SLOTS - 1 - POS_WINDOW + s_] = ch.ids(list(zip(wl, tg.tags_obj[col[rows]].tolist())))
    starts = np.arange(len(nj)) * _NE_SLOTS + (j0n - first_slot)
    lens = qj - j0n + 1
    lpos = np.arange(len(nj)) * _NE_SLOTS + _NE_SLOTS - 1      # word q ends the prefix sentence
    hp = np.nonzero(j0n > 0)[0]

    def job(k):    # for a near-tie only: the prefix sentence's tokens, start, history
        r = int(nj[k])
        jj, qq = int(sm.j[r]), int(q[r])
        ws = doc.words[jj][:qq] + [doc.words[jj][qq] if comp[r] else _word_str(doc, int(sm.A[r]), int(sm.c[r]), int(sm.c[r]))]
        ps = list(doc.pos[jj][:qq + 1])
        for s_ in range(POS_WINDOW + 1):
            if newt[r, s_] >= 0:
                ps[qq - POS_WINDOW + s_] = tg.tags[newt[r, s_]]
        return (list(zip(ws, ps)), int(j0[r]), doc.raw[jj][:int(j0[r])])
    labs = ch.label_windows(win.reshape(-1), starts, lens, j0n, starts[j0n == 0].tolist(), lpos.tolist(),
                            (starts[hp] - 1).tolist(), rlab[base[nj][hp] + j0n[hp] - 1].tolist(), job)
    # raw labels of words q-1 and q: recomputed from jcut on, else the document's
    newl = np.full((n, 2), -1, dtype=np.int64)
    for s_ in range(2):
        x = qj - 1 + s_
        ok = x >= j0n
        newl[nj[ok], s_] = labs[(np.arange(len(nj)) * _NE_SLOTS + _NE_SLOTS - 2 + s_)[ok]]
    r_q = np.where((q >= jcut) & (newl[:, 1] >= 0), newl[:, 1], _clip(rlab, base + q))
    r_p = np.where((q - 1 >= jcut) & (newl[:, 0] >= 0), newl[:, 0], _clip(rlab, base + q - 1))
    return _iob_id_table(ch, ner)[np.where(q > 0, r_p, len(ch.labels)), r_q]

# ---- greedy continuation of the taggers (the causal path's only use of the models)
# Both taggers are greedy left to right, so tagging can resume mid-sentence from the tags
# already chosen. reference=True: NLTK's own models, one word at a time; else the fast
# taggers, all jobs of a call batched (same outputs; tests/test_metadata_causal.py).

def pos_tag_resume(jobs, reference=False):
    """jobs: (words, start, prev, stop) -> the tags of words[start:stop] of
    pos_tag_sents([words])[0], given prev = the tags of words[start-2:start] (the
    perceptron sees words i-2..i+2 and the two previous tags only)."""
    if not reference:
        return _pos_tagger(False).tag_resume(jobs)
    tg = _pos_tagger(True)
    out = []
    for words, start, prev, stop in jobs:
        n = len(words)
        seq = list(tg.START[::-1]) + list(prev)
        p1, p2 = seq[-1], seq[-2]
        ctx = [tg.START[x] if x < 2 else (tg.normalize(words[x - 2]) if x < n + 2 else tg.END[x - n - 2])
               for x in range(start, stop + 4)]
        tags = []
        for i in range(start, stop):
            w = words[i]
            tag = tg.tagdict.get(w)
            if not tag:
                tag, _ = tg.model.predict(tg._get_features(i - start, w, ctx, p1, p2), False)
            tags.append(tag)
            p2, p1 = p1, tag
        out.append(tags)
    return out

def ner_raw_resume(jobs, ner, reference=False):
    """jobs: (tokens, start, history, stop) -> the raw (pre-chunk) tags of the NE tagger for
    tokens[start:stop] ((word, pos) pairs; pos is read only up to stop), given history =
    its raw tags of tokens[:start] (it reads the previous one or two)."""
    if not reference:
        return _ne_chunker(ner, False).raw_resume(jobs)
    tagger = _ne_chunker(ner, True)._tagger   # the NLTK chunker's greedy raw-label tagger
    out = []
    for tokens, start, history, stop in jobs:
        hist = list(history)
        for i in range(start, stop):
            hist.append(tagger.tag_one(tokens, i, hist))
        out.append(hist[start:stop])
    return out

class CausalStream:
    """Online causal metadata for a growing token stream (generation): extend(new_ids) returns
    the causal tags of the new tokens, equal to annotate_causal of the whole stream, without
    re-annotating the whole document per token.

    The taggers work sentence by sentence and punkt decides each sentence break from the words
    around it only, so once a break is settled (text after it exists: a full sentence follows)
    nothing before it can change the tags after it. The stream keeps a window that starts at
    such a break, at a token boundary: the start of the second-to-last sentence, so the window
    stays about two sentences long. It also keeps the full annotation of the window's text
    (_StreamDoc). Many tokens at once (a prompt) are tagged in one batch by the causal path
    (_causal_doc); a single new token updates the window's annotation in place with the same
    steps: punkt re-run from the first sentence whose decision may change, words re-tokenized from
    the chunk (or sync point) that holds the change, taggers resumed from the first word whose
    window changed. So one token costs about the same whatever the window's length, also in a
    long run without whitespace, where the window cannot move on.
    Tags: {'pos': uint16 array, 'ner': ... (unless ner='none')}, ids of stream_tags."""

    def __init__(self, ner='binary', reference=False):
        self.ner, self.reference = ner, reference
        self.keys = [n for n in stream_names(ner, ('full',)) if n != 'word']
        self._new_document()

    def _new_document(self):
        self.doc = []     # token ids of the current document (since the last <|endoftext|>)
        self.w = 0        # window start: index into doc at a settled sentence break
        self.win = None   # the window's text and annotation (_StreamDoc); None: build it from the tokens
        self.pending = b''          # the window's trailing bytes of an unfinished UTF-8 character
        self.tok_cs, self.tok_ce = [], []   # each window token's characters in the window text

    def extend(self, new_ids):
        new_ids = [int(i) for i in new_ids]
        out = {k: np.full(len(new_ids), PAD, dtype=np.uint16) for k in self.keys}
        eot = encoding().eot_token
        i = 0
        while i < len(new_ids):
            if new_ids[i] == eot:   # <pad> tags; a new document starts after it
                self._new_document()
                i += 1
                continue
            j = i
            while j < len(new_ids) and new_ids[j] != eot:
                j += 1
            if j - i == 1 and self.win is not None:
                self.doc.append(new_ids[i])
                tags = self._step(new_ids[i])
                for k in self.keys:
                    out[k][i] = tags[k]
            else:        # many (a prompt): the causal path over the window, then its annotation
                self.doc.extend(new_ids[i:j])
                win = np.array(self.doc[self.w:], dtype=np.int64)
                tags = _causal_doc(win, self.ner, self.reference)
                for k in self.keys:
                    out[k][i:j] = tags[k][len(win) - (j - i):]
                self._rebuild()
            self._advance()
            i = j
        return out

    def _rebuild(self):
        """The window's annotation from its tokens (a prompt, or a moved window)."""
        import codecs
        win = self.doc[self.w:]
        text, cs, ce = _char_offsets_any(np.array(win, dtype=np.int64))
        self.win = _StreamDoc(text, self.ner, _doc_analysis(text, self.ner, self.reference))
        self.tok_cs, self.tok_ce = cs.tolist(), ce.tolist()
        dec = codecs.getincrementaldecoder('utf-8')('surrogateescape')
        dec.decode(encoding().decode_bytes(win))
        self.pending = dec.getstate()[0]

    def _step(self, tok):
        """Append one token: update the window's annotation, return its tags {'pos', 'ner'}."""
        import codecs
        wd = self.win
        raw = encoding().decode_single_token_bytes(tok)
        data = self.pending + raw
        dec = codecs.getincrementaldecoder('utf-8')('surrogateescape')
        dec.decode(data)
        pend = dec.getstate()[0]
        chunk, cob = _bytes_char_map(data)             # the new characters (U+FFFD for bad bytes)
        kappa = wd.L - len(self.pending)               # characters that stay (the old cut ones go)
        c, m = kappa + len(chunk) - len(pend), len(pend)
        cs = kappa + int(cob[len(self.pending)]) if len(raw) else kappa + len(chunk)
        ce = c + m
        self.tok_cs.append(cs)
        self.tok_ce.append(kappa + int(cob[-1]) + 1 if len(raw) else cs)
        self.pending = pend
        wd.set_text(wd.text[:kappa] + chunk, kappa)
        # the sentences that may change: from the first candidate break not settled before kappa
        jfirst, new = _prefix_sentences(wd, c, m, wd.open_candidate(kappa, c), wd.nsent - 1)
        recs = []
        for s, e in new:
            j, valid = wd.adopt(s, e, kappa)            # (an earlier text's sentence at s may cover more)
            old_end = wd.sents[j][1] if j is not None else e
            if j is not None and old_end == e and e <= valid:
                recs.append((s, e, j, None))            # the same sentence: its annotation stays
                continue
            change = max(s, min(valid, e, old_end) - 1)  # the first character that may differ (from here)
            recs.append((s, e, j, _prefix_sentence(wd, s, e, c, change, e, self.reference, whole=True, same_end=valid)))
        found = [d for *_, d in recs if d is not None]
        _retag_pos(wd, found, self.reference)
        if self.ner != 'none':
            _retag_ne(wd, found, self.ner, self.reference)
        wd.replace_sentences(jfirst, recs)
        return wd.token_tags(cs, ce)

    def _advance(self):
        """Move the window start to the second-to-last sentence start, if a token starts there
        (and re-segmenting from there gives the same sentences: whitespace before its first . ? !)."""
        wd = self.win
        n = len(self.doc) - self.w
        if wd is None or n < 2 or wd.nsent < 3:
            return
        prev_end, start = wd.sents[-3][1], wd.sents[-2][0]
        cs, ce = self.tok_cs, self.tok_ce
        # the first token after the end of the sentence before; it must not reach into that
        # sentence, start inside the new one, or begin with a UTF-8 continuation byte
        k = bisect.bisect_left(cs, prev_end)
        if k == 0 or k >= n or cs[k] > start or ce[k - 1] > prev_end or not wd.brk[wd.nsent - 2]:
            return
        first = encoding().decode_single_token_bytes(self.doc[self.w + k])
        if first and (first[0] & 0xC0) == 0x80:
            return
        self.w += k
        self._rebuild()

def _bytes_char_map(data):
    """(text, char_of_byte) of raw bytes as decode_text decodes them (U+FFFD per bad byte)."""
    try:
        text = data.decode('utf-8')
        return text, _char_of_byte(text)
    except UnicodeDecodeError:
        s = data.decode('utf-8', errors='surrogateescape')
        nb = [1 if '\udc80' <= ch <= '\udcff' else len(ch.encode('utf-8')) for ch in s]
        return ''.join('\ufffd' if '\udc80' <= ch <= '\udcff' else ch for ch in s), np.repeat(np.arange(len(nb)), nb)

class _StreamDoc:
    """The window of a CausalStream: its text and full annotation (as _doc_analysis gives),
    with the interface of _CausalDoc that the causal steps read, updated in place as the text
    grows (set_text, replace_sentences)."""

    def __init__(self, text, ner, analysis):
        self.text, self.L, self.ner = text, len(text), ner
        sents, spans, fb, _, pos, raw = analysis
        self.sents = [tuple(x) for x in sents]
        self.spans = [list(x) for x in spans]       # copies: the annotation cache is read-only
        self.fb = list(fb)
        self.pos = [list(x) for x in pos]
        self.raw = [list(x) for x in raw] if raw is not None else [[] for _ in sents]
        self.rstarts = [[a for a, _ in sp] for sp in self.spans]
        self.index = TextIndex(text)
        self.middles = {}
        self.sentence_ends = {}
        self.brk = [self._brk(s) for s, _ in self.sents]
        self._starts()
        # sentences of earlier texts that a later one dropped or cut short, by start: [end, valid,
        # spans, fb, pos, raw, rstarts], the text being the current one before valid. A break
        # that only some prefixes make (after 'Mr. ' before a run 'x.,x.,': only where the text
        # ends in ',') flips the sentences back and forth; each split then resumes from its own
        # last annotation instead of re-tokenizing and re-tagging the run (adopt)
        self.stash = {}
        self.kappa, self.valid = self.L, {}   # (valid: of the sentences adopted in this step)

    def _starts(self):
        self.nsent = len(self.sents)
        self.sstarts_l = [s for s, _ in self.sents]
        self.start_of = {s: j for j, s in enumerate(self.sstarts_l)}

    def _brk(self, s):
        # whitespace lies between the sentence start s and its first . ? ! (see _punkt_settlement)
        return self.index.first_from('ws', s, self.L) < self.index.first_from(_cand_kind(self), s, self.L)

    def ref_sentence(self, s, e, c, j):
        return j

    def adopt(self, s, e, kappa):
        """(j, valid) for the new sentence [s, e): the sentence j (None: none) that starts at s,
        whose text is the current one before valid; a stashed sentence takes the place of the
        window's own there (which goes to the stash) where it covers more of [s, e), or as much
        and ends at e."""
        j = self.start_of.get(s)
        alt = self.stash.get(s)
        if alt is None:
            return j, kappa
        old = min(self.sents[j][1], kappa, e) if j is not None else s
        new = min(alt[0], alt[1], e)
        if j is not None and (new, alt[0] == e) <= (old, self.sents[j][1] == e):
            return j, kappa
        del self.stash[s]
        _CAUSAL_STATS['adopt'] += 1
        if j is None:    # a new index past nsent (replace_sentences drops it or makes it a sentence)
            j = len(self.sents)
            self.sents.append(None); self.spans.append(None); self.fb.append(None)
            self.pos.append(None); self.raw.append(None); self.rstarts.append(None)
            self.start_of[s] = j
        else:
            self._stash(j)
        (end, valid, self.spans[j], self.fb[j], self.pos[j], self.raw[j], self.rstarts[j]) = alt
        self.sents[j] = (s, end)
        self.valid[j] = min(valid, kappa)
        return j, self.valid[j]

    def _stash(self, j):
        s, e = self.sents[j]
        self.stash[s] = [e, self.valid.get(j, self.kappa), self.spans[j], self.fb[j], self.pos[j], self.raw[j], self.rstarts[j]]
        while len(self.stash) > _STASH:   # the oldest go
            del self.stash[next(iter(self.stash))]

    def sep_before(self, x):
        return self.index.last_before('sep', x)

    def rstrip_end(self, c):
        return self.index.rstrip_end(c)

    def set_text(self, text, kappa):
        """The text is now text; its first kappa characters are the old ones."""
        self.kappa, self.valid = kappa, {}
        self.index.truncate(kappa)
        self.index.extend(text)
        self.text, self.L = text, len(text)
        for k in [k for k, v in self.middles.items() if v.end > kappa]:
            del self.middles[k]
        for k in [k for k, v in self.sentence_ends.items() if v[0] >= kappa or v[1] >= kappa]:
            del self.sentence_ends[k]

    def open_candidate(self, kappa, c):
        """The first candidate break before c whose decision may differ from the old text's: one
        with fewer than two word starts after it before kappa (-1: none)."""
        ws, text = self.index.pos['ws'], self.text
        k = bisect.bisect_left(ws, kappa) - 1
        starts = []
        while k >= 0 and len(starts) < 2:
            p = ws[k] + 1
            if p < kappa and not text[p].isspace():
                starts.append(p)
            k -= 1
        t1 = starts[1] if len(starts) == 2 else 0
        p = self.index.first_from(_cand_kind(self), t1, c)
        return p if p < c else -1

    def replace_sentences(self, jfirst, recs):
        """The sentences from jfirst on are now recs: (start, end, old index or None, record or
        None); a record holds the words from its o on (the ones before are the old sentence's)."""
        sents, spans, fb, pos, raw, rst = [], [], [], [], [], []
        used = {j for _, _, j, _ in recs}
        for j in range(jfirst, self.nsent):   # dropped: kept for a later text that splits as this one did
            if j not in used:
                self._stash(j)
        for s, e, j, d in recs:
            if d is None and j is not None and self.sents[j] == (s, e):
                sp, f, p, r, rs = self.spans[j], self.fb[j], self.pos[j], self.raw[j], self.rstarts[j]
            elif d is None:   # no words
                sp, f, p, r, rs = [], False, [], [], []
            else:
                sp, p, r, rs = (self.spans[j], self.pos[j], self.raw[j], self.rstarts[j]) if j is not None else ([], [], [], [])
                if j is not None and self.sents[j][1] - e > e - s:
                    # cut to less than half: keep the old one too (the copy costs less than it holds)
                    self._stash(j)
                    sp, p, r, rs = sp[:d.o], p[:d.o], r[:d.jcut], rs[:d.o]
                del sp[d.o:], p[d.o:], r[d.jcut:], rs[d.o:]   # in place: a long sentence costs its change only
                sp += d.spans
                p += d.pos
                r += d.raw or []
                rs += [a for a, _ in d.spans]
                f = d.fb
            sents.append((s, e)); spans.append(sp); fb.append(f); pos.append(p); raw.append(r); rst.append(rs)
        for name, new in (('sents', sents), ('spans', spans), ('fb', fb), ('pos', pos), ('raw', raw), ('rstarts', rst)):
            getattr(self, name)[jfirst:] = new
        self.brk[jfirst:] = [self._brk(s) for s, _ in sents]
        self._starts()

    def token_tags(self, cs, ce):
        """{'pos': id, 'ner': id} of the word the token [cs, ce) overlaps most (align's rule)."""
        cand, where = [], []
        for j in range(self.nsent - 1, -1, -1):   # the last sentences: those the token reaches
            s, e = self.sents[j]
            if e <= cs:
                break
            sp = self.spans[j]
            i = bisect.bisect_left(self.rstarts[j], ce - s)   # words from i on start after the token
            while i > 0 and s + sp[i - 1][1] > cs:            # (a long sentence: its words near the token only)
                i -= 1
                cand.append((s + sp[i][0], s + sp[i][1]))
                where.append((j, i))
        order = sorted(range(len(cand)), key=cand.__getitem__)
        k = _largest_overlap(cs, ce, [cand[x] for x in order])
        out = {'pos': SPACE, 'ner': SPACE}
        if k >= 0:
            j, i = where[order[k]]
            out['pos'] = POS_ID[self.pos[j][i]]
            if self.ner != 'none':
                r = self.raw[j]
                out['ner'] = _ner_ids(self.ner)[_iob(r[i], r[i - 1] if i else None)]
        return out

@lru_cache(maxsize=None)
def _ner_ids(ner):
    return {t: n for n, t in enumerate(stream_tags('ner', ner))}

# -----------------------------------------------------------------------------
# NLTK resources and models, the BPE tokenizer

# resource key -> (path for nltk.data.find, nltk.download package name)
_RESOURCES = {
    'punkt': ('tokenizers/punkt_tab/english/', 'punkt_tab'),
    'pos': ('taggers/averaged_perceptron_tagger_eng/', 'averaged_perceptron_tagger_eng'),
    'words': ('corpora/words', 'words'),  # the NE chunker's feature extractor reads it
    'ne_binary': ('chunkers/maxent_ne_chunker_tab/english_ace_binary/', 'maxent_ne_chunker_tab'),
    'ne_typed': ('chunkers/maxent_ne_chunker_tab/english_ace_multiclass/', 'maxent_ne_chunker_tab'),
    'gutenberg': ('corpora/gutenberg', 'gutenberg'),  # prepare.py's default corpus
}

def downloads_allowed():
    """The one place that reads LIME_NO_DOWNLOAD: unset, empty or '0' allows downloads."""
    return os.environ.get('LIME_NO_DOWNLOAD', '') in ('', '0')

def ensure_resources(ner='binary', extra=()):
    """Make sure the NLTK data for this NER mode (and the resources named in extra, e.g.
    'gutenberg') exists; download it if allowed. Call it in the main process before
    starting workers (downloads must not race)."""
    if not _read_ahead:   # the first call of the process
        _read_tables_ahead(ner)
    nltk = import_nltk()
    needed = ['punkt', 'pos'] + ([] if ner == 'none' else ['words', 'ne_' + ner]) + list(extra)
    for key in needed:
        path, package = _RESOURCES[key]
        try:
            nltk.data.find(path)
            continue
        except LookupError:
            pass
        ok = False
        if downloads_allowed():
            try:
                ok = nltk.download(package, quiet=True, raise_on_error=False)
                nltk.data.find(path)
            except Exception:
                ok = False
        if not ok:
            hint = (" The typed (multiclass) NE chunker is missing: use --ner binary, or get it"
                    " with python -m nltk.downloader maxent_ne_chunker_tab on a machine with internet."
                    if key == 'ne_typed' else
                    f" Get it with: python -m nltk.downloader {package} (or point NLTK_DATA at a copy).")
            raise MetadataError(f"NLTK resource '{path}' not found (NLTK_DATA="
                                f"{os.environ.get('NLTK_DATA', 'unset')}).{hint}")

def _frozen(obj):
    # the models live for the whole process: move them (and everything alive now) out of the
    # collector's generations, so later collections do not rescan them
    import gc
    gc.freeze()
    return obj

# The fast taggers are built from tables (numpy arrays and lists) that take ~1 s to compute from
# NLTK's model files, so they are kept on disk: one file per model in cache_dir(), keyed by a hash
# of the model files, of nltk_fast.py (the code that builds and reads them) and of the nltk and
# numpy versions. Written atomically (temp file + rename), read without pickle in one read() and
# checked by a CRC (the arrays are read-only views of that copy); a missing, stale or corrupt file
# (or anything not a regular file) is rebuilt, and where the directory cannot be written the tables
# are just built in memory. Each fast tagger is compared with NLTK's own model on a sample text
# when its tables are built (_self_checked). A start must not re-read the 13 MB of model files to
# hash them, so each file's sha256 is remembered with its stat (size, mtime, ctime, inode), as
# git's index does: a file whose stat changed in any way is hashed again.

def cache_dir():
    """$LIME_CACHE_DIR, else $XDG_CACHE_HOME/lime, else ~/.cache/lime."""
    d = os.environ.get('LIME_CACHE_DIR')
    if not d:
        d = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'lime')
    return d

def _nltk_files(resources):
    """The files of NLTK resource paths (directories or files; a zipped resource: its zip file)."""
    nltk = import_nltk()
    files = []
    for res in resources:
        p = nltk.data.find(res)
        root = p.zipfile.filename if hasattr(p, 'zipfile') else p.path
        files += sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs) if os.path.isdir(root) else [root]
    return files

_MEMO_MAX = 1 << 20   # file-hashes.json: ~200 bytes a file

def _sha256_of_files(files):
    """{path: (size, sha256 of its contents)}; remembered in cache_dir()/file-hashes.json by stat."""
    import hashlib
    memo_path = os.path.join(cache_dir(), 'file-hashes.json')
    try:   # a few KB; a larger file, a FIFO or a device is not read
        memo = json.loads(read_regular(memo_path, _MEMO_MAX))
    except Exception:   # missing or corrupt: hash everything (and the memo is rewritten)
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    out, changed = {}, False
    for path in files:
        path = os.path.abspath(path)
        st = os.stat(path)
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        got = memo.get(path)
        if isinstance(got, list) and got[:-1] == sig:
            out[path] = st.st_size, got[-1]
            continue
        with open(path, 'rb') as f:
            out[path] = st.st_size, hashlib.sha256(f.read()).hexdigest()
        memo[path], changed = sig + [out[path][1]], True
    if changed:
        memo = {p: v for p, v in memo.items() if os.path.exists(p)}   # forget deleted files
        try:
            write_atomic(memo_path, json.dumps(memo, indent=0))
        except (OSError, LimeError):   # read-only or full: hash again next time
            pass
    return out

# A table file: _TABLES_MAGIC, the header's length (8 bytes, little-endian), the CRC-32 of all
# that follows (8 bytes), the header (JSON: the key, the JSON values, and where each array and each
# list of strings lies), then the data, each piece 64-byte aligned. A list of strings is one
# '\n'-joined UTF-8 piece (splitting it is several times faster than parsing JSON); any other value
# that is not an array is JSON. The reader reads the file whole (not mmap: a file truncated or
# rewritten while in use would kill the process with SIGBUS), checks the CRC (zlib.crc32: the
# fastest here, ~12 ms for the 44 MB of all tables, sha256 ~28 ms, adler32 ~14 ms) and every
# piece's place: any flaw raises, and _cached rebuilds the file.
_TABLES_MAGIC = b'LIME tables v2\n\0'
_TABLES_MAX = 1 << 30   # a larger file is not read (the largest real one is ~30 MB)

def _write_tables(f, key, tables):
    import zlib
    header, pieces, off = {'key': key, 'json': {}, 'arrays': {}, 'strings': {}}, [], 0

    def place(data):
        nonlocal off
        off = -(-off // 64) * 64
        pieces.append((off, data))
        off += len(data)
        return off - len(data)
    for name, v in tables.items():
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in 'biuf':
                raise ValueError(f'table {name}: dtype {v.dtype} is not numeric')
            data = np.ascontiguousarray(v).tobytes()
            header['arrays'][name] = [v.dtype.str, list(v.shape), place(data), len(data)]
        elif isinstance(v, list) and all(type(s) is str and '\n' not in s for s in v):
            data = '\n'.join(v).encode('utf-8', 'surrogatepass')
            header['strings'][name] = [place(data), len(data), len(v)]
        else:
            header['json'][name] = v
    if json.loads(json.dumps(header['json'])) != header['json']:   # tuples, non-string keys
        raise ValueError('model tables do not round-trip through JSON')
    head = json.dumps(header).encode()
    at = len(_TABLES_MAGIC) + 16 + len(head)
    start, body = -(-at // 64) * 64, [head]
    for a, data in pieces:
        body += [b'\0' * (start + a - at), data]
        at = start + a + len(data)
    crc = 0
    for b in body:
        crc = zlib.crc32(b, crc)
    f.write(_TABLES_MAGIC + len(head).to_bytes(8, 'little') + crc.to_bytes(8, 'little'))
    for b in body:
        f.write(b)

def _table_bytes(path):
    """The bytes of a table file, checked against its CRC-32. A private copy, not a mapping of the file:
    a file cut short while we use it cannot crash us (SIGBUS)."""
    import zlib
    data = read_regular(path, _TABLES_MAX)
    n0 = len(_TABLES_MAGIC)
    if data[:n0] != _TABLES_MAGIC or len(data) < n0 + 16:
        raise ValueError('not a table file')
    if zlib.crc32(memoryview(data)[n0 + 16:]) != int.from_bytes(data[n0 + 8:n0 + 16], 'little'):
        raise ValueError('bad checksum')
    return data

def _file_id(path):
    st = os.stat(path)
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns

_read_ahead = {}   # table path -> (file id, checked bytes): read on a second thread while NLTK imports

def _read_tables_ahead(ner):
    """Start reading (and checking) the table files this NER mode will load, on a thread: reading and
    zlib.crc32 release the GIL, so on a second core they overlap NLTK's import and the check costs
    the start-up almost nothing. _read_tables uses a result only if the file is still the same one."""
    import threading
    names = ['punkt', 'pos', 'gpt2'] + ([] if ner == 'none' else ['ne_' + ner])
    paths = [os.path.join(cache_dir(), n + '.tables') for n in names]

    def read():
        for p in paths:
            try:
                fid, data = _file_id(p), _table_bytes(p)
                if _file_id(p) == fid:
                    _read_ahead[p] = (fid, data)
            except (OSError, ValueError):
                pass   # read (and judged) again in the main thread
    t = threading.Thread(target=read, name='lime-tables', daemon=True)
    t.start()
    _read_ahead[None] = t

def _read_tables(path, key=None):
    """The tables stored in path if its key is key (or key is None), else None. Any flaw raises."""
    import math
    ahead = _read_ahead.get(None)
    if ahead is not None:
        ahead.join()
    fid, data = _read_ahead.pop(path, (None, None))
    if data is None or fid != _file_id(path):
        data = _table_bytes(path)
    n0 = len(_TABLES_MAGIC)
    n = int.from_bytes(data[n0:n0 + 8], 'little')
    if n0 + 16 + n > len(data):
        raise ValueError('truncated header')
    header = json.loads(data[n0 + 16:n0 + 16 + n])
    if key is not None and header['key'] != key:
        return None
    start = -(-(n0 + 16 + n) // 64) * 64

    def piece(at, size):   # where a piece lies: inside the file's data, else raise
        if not (type(at) is int and type(size) is int and at >= 0 and size >= 0 and start + at + size <= len(data)):
            raise ValueError('a piece outside the file')
        return start + at
    tables = dict(header['json'])
    for name, (at, size, count) in header['strings'].items():
        at = piece(at, size)
        v = data[at:at + size].decode('utf-8', 'surrogatepass').split('\n') if count else []
        if len(v) != count:
            raise ValueError('bad string list')
        tables[name] = v
    for name, (dtype, shape, at, size) in header['arrays'].items():
        at = piece(at, size)
        dtype = np.dtype(dtype) if type(dtype) is str else None
        if (dtype is None or dtype.kind not in 'biuf' or not all(type(d) is int and d >= 0 for d in shape)
                or size != dtype.itemsize * math.prod(shape)):
            raise ValueError('bad array')
        # read-only views of data (no copy)
        tables[name] = (np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=at).reshape(shape)
                        if size else np.zeros(shape, dtype))
    return tables

def _cached(name, versions, files, build, make):
    """make(tables) with the tables from cache_dir()/name.tables when its key matches, else from
    build() (then stored there). The key: sha256 of the versions string and of the files
    (names, sizes, contents)."""
    import hashlib
    h = hashlib.sha256(versions.encode() + b'\n')
    for f, (size, digest) in _sha256_of_files(files).items():
        h.update(f'{os.path.basename(f)} {size} {digest}\n'.encode())
    key = h.hexdigest()
    path = os.path.join(cache_dir(), name + '.tables')
    try:
        tables = _read_tables(path, key)
        if tables is not None:
            return make(tables)
    except Exception:   # missing, unreadable or corrupt (any error of reading or of make): rebuild
        pass
    tables = build()
    try:
        write_atomic(path, lambda f: _write_tables(f, key, tables))
        if os.path.exists(path[:-len('.tables')] + '.npz'):   # the format before this one
            os.unlink(path[:-len('.tables')] + '.npz')
    except (OSError, LimeError):   # read-only or full: use the tables built in memory
        pass
    return make(tables)

def _cached_model(name, resources, code, build, make):
    # a fast tagger's tables: keyed by NLTK's model files and the code that builds and reads them
    # (nltk_fast.py, and code: the NLTK source files whose models or functions it copies)
    nltk_dir = os.path.dirname(import_nltk().__spec__.origin)
    code = [nltk_fast.__file__] + [os.path.join(nltk_dir, *f.split('/')) for f in code]
    versions = f'nltk {nltk_fast.nltk_version()} numpy {np.__version__}'
    return _cached(name, versions, code + _nltk_files(resources), build, make)

# models are loaded once per process (nltk.ne_chunk would reload its chunker on every call);
# reference=True: plain NLTK, else the exact fast re-implementations of nltk_fast.py (NLTK's own
# models then load only if a near-tie needs them)
@lru_cache(maxsize=None)
def _sentence_tokenizer():
    def build():
        from nltk.tokenize import PunktTokenizer
        return nltk_fast.punkt_tables(PunktTokenizer('english')._params)
    tok = _cached_model('punkt', [_RESOURCES['punkt'][0]], ['tokenize/punkt.py'], build, nltk_fast.punkt_tokenizer)
    # punkt decides each candidate break by text_contains_sentbreak(context), a pure function
    # of the short context string (the fixed English parameters are never retrained):
    # memoise it (the causal path re-segments the same contexts again and again)
    tok.text_contains_sentbreak = punkt_memo(tok)
    return tok

@lru_cache(maxsize=None)
def _word_tokenizer():
    import_nltk()
    from nltk.tokenize import NLTKWordTokenizer
    return NLTKWordTokenizer()

@lru_cache(maxsize=None)
def _fast_word_spans():
    import_nltk()
    return FastWordSpans()

@lru_cache(maxsize=None)
def _pos_tagger(reference):
    import_nltk()
    if reference:
        from nltk.tag import PerceptronTagger
        return _frozen(PerceptronTagger())
    load = lambda: _pos_tagger(True)

    def build():
        t = FastPOSTagger.tables(load())
        sents = _self_check_sents()
        t['self_check'] = FastPOSTagger(t, load).tag_sents(sents) == pos_tag_sents(sents, reference=True)
        return t
    return _frozen(_cached_model('pos', [_RESOURCES['pos'][0]], ['tag/perceptron.py'], build,
                                 lambda t: _self_checked(FastPOSTagger(t, load), t['self_check'], 'POS tagger')))

@lru_cache(maxsize=None)
def _ne_chunker(ner, reference):
    import_nltk()
    if reference:
        from nltk.chunk import ne_chunker
        return _frozen(ne_chunker('binary' if ner == 'binary' else 'multiclass'))
    load = lambda: _ne_chunker(ner, True)

    def build():
        t = FastNEChunker.tables(load())
        sents = _self_check_sents()
        pos = pos_tag_sents(sents, reference=True)
        fast = FastNEChunker(t, load).iob_sents([list(zip(w, p)) for w, p in zip(sents, pos)])
        t['self_check'] = fast == ner_tag_sents(sents, pos, ner, reference=True)
        return t
    # the chunker's feature extractor also reads the words corpus (its 'en-basic' list)
    return _frozen(_cached_model('ne_' + ner, [_RESOURCES['ne_' + ner][0], 'corpora/words/en-basic'],
                                 ['chunk/named_entity.py', 'classify/maxent.py'], build,
                                 lambda t: _self_checked(FastNEChunker(t, load), t['self_check'], f'{ner} NE chunker')))

def _self_check_sents():
    # the words of nltk_fast.SELF_CHECK_TEXT, sentence by sentence (punkt, NLTK's word tokenizer)
    text = nltk_fast.SELF_CHECK_TEXT
    return [[text[s + a:s + b] for a, b in _word_spans(text[s:e], reference=True)[0]]
            for s, e in _sentence_tokenizer().span_tokenize(text)]

def _self_checked(fast, ok, what):
    """The fast tagger, or where its tables failed the self-check when they were built (ok False:
    it tagged nltk_fast.SELF_CHECK_TEXT unlike NLTK's own model) a warning line, and every decision
    is then made by NLTK's own model: eps = inf makes each one a near-tie, which _exact recomputes
    with NLTK's model (the same path for the POS tagger and both NE chunkers)."""
    if type(ok) is not bool:   # not what build() writes: the file is rebuilt
        raise ValueError('no self-check result')
    if not ok:
        print(f"metadata.py: warning: the fast {what} differs from NLTK's on the self-check sample; "
              f"using NLTK's own model for it (slower)", file=sys.stderr)
        fast.eps = float('inf')
    return fast

# BPE: GPT-2 ('gpt2'), or 'gpt2-N': GPT-2 with only its first N ranks (the 256 bytes and
# the first N-256 merges; <|endoftext|> = N). Every token of a merge has a lower rank than
# the merge, so the truncated table is a valid BPE: a small vocabulary for CPU experiments.
# One tokenizer per process: set_tokenizer() before annotating (workers inherit it).
TOKENIZER = 'gpt2'

def set_tokenizer(name):
    global TOKENIZER
    if name != TOKENIZER:
        parse_tokenizer(name)
        TOKENIZER = name
        for f in (encoding, _token_bytes_len, _encode_chunk):
            f.cache_clear()

def parse_tokenizer(name):
    """'gpt2' -> None, 'gpt2-N' -> N; anything else is an error."""
    n = tokenizer_size(name)   # the naming rule (common.py: checkpoints are checked by it too)
    if n is None:
        raise MetadataError(f"unknown tokenizer '{name}' (expected gpt2 or gpt2-N, 256 <= N < 50257)")
    return None if name == 'gpt2' else n - 1

@lru_cache(maxsize=None)
def _gpt2_tables():
    """GPT-2's ranks from our disk cache: tiktoken's own loader parses its data-gym files in
    Python (~0.15 s a process). Those files are checked by tiktoken against hashes in its code,
    so the key is tiktoken's version and the code that builds the ranks (tiktoken's loader,
    this file)."""
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public as public

    def build():   # the ranks (token bytes -> rank) as one byte string, the lengths, the ranks
        spec = public.gpt2()
        ranks = spec.pop('mergeable_ranks')
        return dict(spec=spec, blob=np.frombuffer(b''.join(ranks), dtype=np.uint8),
                    lens=np.array(list(map(len, ranks)), dtype=np.int64),
                    ranks=np.array(list(ranks.values()), dtype=np.int64))

    def check(t):   # what _gpt2 and _token_bytes_len read (an error here: rebuilt)
        if not (isinstance(t['spec'], dict) and t['lens'].shape == t['ranks'].shape
                and int(t['lens'].sum()) == t['blob'].size):
            raise ValueError('inconsistent GPT-2 tables')
        return t

    return _cached('gpt2', f'tiktoken {tiktoken.__version__} numpy {np.__version__}',
                   [public.__file__, tiktoken.load.__file__, __file__], build, check)

@lru_cache(maxsize=None)
def _gpt2():
    """tiktoken.get_encoding('gpt2'), built from _gpt2_tables()."""
    import tiktoken
    t = _gpt2_tables()
    blob, ends = t['blob'].tobytes(), np.cumsum(t['lens']).tolist()
    toks = list(map(blob.__getitem__, map(slice, [0] + ends[:-1], ends)))
    return tiktoken.Encoding(mergeable_ranks=dict(zip(toks, t['ranks'].tolist())), **t['spec'])

@lru_cache(maxsize=None)
def encoding():
    import tiktoken
    gpt2 = _gpt2()
    n = parse_tokenizer(TOKENIZER)
    if n is None:
        return gpt2
    ranks = {k: v for k, v in gpt2._mergeable_ranks.items() if v < n}
    return tiktoken.Encoding(name=TOKENIZER, pat_str=gpt2._pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': n})

# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description='Print the LIME metadata of each token as JSON Lines.')
    p.add_argument('file', nargs='?', help='UTF-8 text file (default: stdin)')
    p.add_argument('--tokenization', default='lime', choices=TOKENIZATIONS,
                   help="lime: each word encoded on its own (default); plain: encode_ordinary")
    p.add_argument('--ner', default='typed', choices=NER_MODES,
                   help='typed: NLTK default multiclass chunker (default); binary: NE; none')
    p.add_argument('--ids', action='store_true',
                   help='input is whitespace-separated GPT-2 token ids instead of text')
    p.add_argument('--tags', default='full', choices=TAG_KINDS,
                   help='full: taggers see the whole text; causal: tags of token t from tokens <= t')
    p.add_argument('--reference', action='store_true', help='use plain NLTK taggers')
    p.add_argument('--tokenizer', default='gpt2', help='gpt2 (default) or gpt2-N: the first N GPT-2 ranks')
    args = p.parse_args(argv)
    name = args.file or '<stdin>'
    try:
        set_tokenizer(args.tokenizer)
        ensure_resources(args.ner)
        if args.file:
            try:   # a regular file only: a FIFO would block, a directory cannot be read
                raw = read_regular(args.file)
            except OSError as e:
                raise MetadataError(f'{name}: {e.strerror or e}')
            except ValueError as e:
                raise MetadataError(f'{name}: {e}')
        else:
            raw = sys.stdin.buffer.read()
        try:
            data = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise MetadataError(f'{name}: not valid UTF-8 (byte {e.start})')
        if args.ids:
            toks = data.split()
            bad = next((x for x in toks if not (x.isascii() and x.isdigit())), None)   # int() takes '-1', '1_0'
            if bad is not None:
                raise MetadataError(f'{name}: --ids expects whitespace-separated integers, got {bad[:20]!r}')
            # more than 18 digits: out of range (and not an int64)
            ids = np.array([int(x) if len(x) <= 18 else -1 for x in toks], dtype=np.int64)
            n = encoding().n_vocab
            out = np.nonzero((ids < 0) | (ids >= n))[0]
            if len(out):
                raise MetadataError(f'{name}: --ids: token id {toks[out[0]][:30]} out of range 0..{n - 1}')
            streams = annotate_ids(ids, args.ner, args.tags, args.reference)
        else:
            ids, streams = annotate_text(data, args.tokenization, args.ner, args.reference)
            if args.tags == 'causal':
                streams = annotate_ids(ids, args.ner, 'causal', args.reference)
        streams = {base_stream(k): v for k, v in streams.items()}
    except MetadataError as e:
        print(f'metadata.py: error: {e}', file=sys.stderr)
        return 1
    # one line per token, exactly as json.dumps({'id': .., 'text': .., 'pos': .., 'ner': ..},
    # ensure_ascii=False) writes it, from pieces quoted once per distinct value
    enc = encoding()
    quote = lambda s: json.dumps(s, ensure_ascii=False)
    pos_q = list(map(quote, stream_tags('pos', args.ner)))
    ner_q = list(map(quote, stream_tags('ner', args.ner))) if args.ner != 'none' else ['null']
    ner = streams['ner'].tolist() if args.ner != 'none' else [0] * len(ids)
    text_q = {}
    ids = ids.tolist()
    for lo in range(0, len(ids), 1 << 16):
        lines = []
        for t, p, n in zip(ids[lo:lo + (1 << 16)], streams['pos'][lo:lo + (1 << 16)].tolist(), ner[lo:lo + (1 << 16)]):
            s = text_q.get(t)
            if s is None:
                s = text_q[t] = quote(enc.decode_single_token_bytes(t).decode('utf-8', errors='replace'))
            lines.append(f'{{"id": {t}, "text": {s}, "pos": {pos_q[p]}, "ner": {ner_q[n]}}}\n')
        sys.stdout.write(''.join(lines))
    return 0

if __name__ == '__main__':
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
