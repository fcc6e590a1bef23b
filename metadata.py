"""
Linguistic metadata for LIME: annotate text with NLTK and align it to GPT-2 BPE tokens.

    text -> sentences (punkt) -> words with character spans (NLTK's Treebank-style
    word tokenizer) -> POS (averaged perceptron, Penn Treebank) and NER (maxent
    chunker, as IOB) per word -> BPE tokens, each carrying the tags of its word.

Every metadata stream has a fixed tag vocabulary (see STREAM_TAGS): id 0 = <pad>
(used for <|endoftext|>), 1 = <space> (whitespace-only tokens and tokens that
overlap no word), 2 = <unk> (metadata dropout / missing hints), then the tags.

Library use:
    ids, streams = annotate_text(text, tokenization='lime', ner='binary')
    streams = annotate_ids(ids, ner='binary')          # any token-id stream
CLI (prints one JSON object per token):
    python metadata.py [FILE] [--tokenization lime|plain] [--ner typed|binary|none]
                       [--ids] [--tags full|causal] [--reference]
"""
import os
import sys
import json
import argparse
from functools import lru_cache

import numpy as np

# -----------------------------------------------------------------------------
# fixed tag vocabularies: identical on every machine, independent of the data

SPECIAL = ['<pad>', '<space>', '<unk>']
PAD, SPACE, UNK = 0, 1, 2
# the 45 classes of NLTK's averaged-perceptron English tagger (sorted)
POS_TAGS = ['#', '$', "''", '(', ')', ',', '.', ':', 'CC', 'CD', 'DT', 'EX', 'FW', 'IN',
            'JJ', 'JJR', 'JJS', 'LS', 'MD', 'NN', 'NNP', 'NNPS', 'NNS', 'PDT', 'POS', 'PRP',
            'PRP$', 'RB', 'RBR', 'RBS', 'RP', 'SYM', 'TO', 'UH', 'VB', 'VBD', 'VBG', 'VBN',
            'VBP', 'VBZ', 'WDT', 'WP', 'WP$', 'WRB', '``']
# entity types of NLTK's maxent NE chunkers ('typed' is ne_chunk's default multiclass model)
NE_TYPES = {'typed': ['PERSON', 'ORGANIZATION', 'GPE', 'LOCATION', 'FACILITY', 'GSP'],
            'binary': ['NE'],
            'none': []}
NER_MODES = ('typed', 'binary', 'none')
TOKENIZATIONS = ('lime', 'plain')
TAG_KINDS = ('full', 'causal')
WORD_TAGS = ['B', 'I']  # the 'word' stream: token starts a word / continues one

def ner_tags(ner):
    return ['O'] + [f'{p}-{t}' for t in NE_TYPES[ner] for p in 'BI']

def stream_tags(stream, ner):
    """Tag names (index = id) of a stream: pos, ner, word, pos_causal, ner_causal."""
    base = stream[:-len('_causal')] if stream.endswith('_causal') else stream
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

# -----------------------------------------------------------------------------
# NLTK resources: found offline via NLTK_DATA, else downloaded once in this process

# resource path -> nltk.download package name
_RESOURCES = {
    'punkt': ('tokenizers/punkt_tab/english/', 'punkt_tab'),
    'pos': ('taggers/averaged_perceptron_tagger_eng/', 'averaged_perceptron_tagger_eng'),
    'words': ('corpora/words', 'words'),  # the NE chunker's feature extractor reads it
    'ne_binary': ('chunkers/maxent_ne_chunker_tab/english_ace_binary/', 'maxent_ne_chunker_tab'),
    'ne_typed': ('chunkers/maxent_ne_chunker_tab/english_ace_multiclass/', 'maxent_ne_chunker_tab'),
}

def ensure_resources(ner='binary'):
    """Make sure the NLTK data for this NER mode exists; download it if allowed.
    Call it in the main process before starting workers (downloads must not race)."""
    import nltk
    needed = ['punkt', 'pos'] + ([] if ner == 'none' else ['words', 'ne_' + ner])
    for key in needed:
        path, package = _RESOURCES[key]
        try:
            nltk.data.find(path)
            continue
        except LookupError:
            pass
        if os.environ.get('LIME_NO_DOWNLOAD', '') not in ('', '0'):
            ok = False
        else:
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

# models are loaded once per process (nltk.ne_chunk would reload its chunker on every call)
@lru_cache(maxsize=None)
def _sentence_tokenizer():
    from nltk.tokenize import PunktTokenizer
    return PunktTokenizer('english')

@lru_cache(maxsize=None)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer
    return NLTKWordTokenizer()

@lru_cache(maxsize=None)
def _pos_tagger(reference):
    from nltk.tag import PerceptronTagger
    return PerceptronTagger()

@lru_cache(maxsize=None)
def _ne_chunker(ner, reference):
    from nltk.chunk import ne_chunker
    return ne_chunker('binary' if ner == 'binary' else 'multiclass')

@lru_cache(maxsize=None)
def _encoding():
    import tiktoken
    return tiktoken.get_encoding('gpt2')

# -----------------------------------------------------------------------------
# words and their tags

def _word_spans(sentence):
    """Character spans of the words of one sentence (Treebank-style tokens).
    span_tokenize keeps the original characters (word_tokenize rewrites quotes)."""
    try:
        return list(_word_tokenizer().span_tokenize(sentence))
    except ValueError:
        # align_tokens fails on a few quote patterns; fall back to a plain regex split
        import re
        return [m.span() for m in re.finditer(r"\w+|[^\w\s]+", sentence)]

def pos_tag_sents(sents, reference=False):
    """POS tag names for each sentence (list of word lists); same as nltk.pos_tag."""
    tagger = _pos_tagger(reference)
    return [[t for _, t in tagger.tag(words)] if words else [] for words in sents]

def ner_tag_sents(sents, pos, ner, reference=False):
    """IOB NER tag names for each sentence; same as tree2conlltags(ne_chunk(...))."""
    from nltk.chunk import tree2conlltags
    chunker = _ne_chunker(ner, reference)
    out = []
    for words, tags in zip(sents, pos):
        out.append([iob for _, _, iob in tree2conlltags(chunker.parse(list(zip(words, tags))))]
                   if words else [])
    return out

def analyze(text, ner='binary', reference=False):
    """Words of a text with their tags.
    Returns (starts, ends, pos_ids, ner_ids): int64 character spans and uint16 tag ids
    (ner_ids is None when ner='none')."""
    sents, offsets = [], []
    for s, e in _sentence_tokenizer().span_tokenize(text):
        spans = _word_spans(text[s:e])
        sents.append([text[s + a:s + b] for a, b in spans])
        offsets.append([(s + a, s + b) for a, b in spans])
    flat = [sp for o in offsets for sp in o]
    n = len(flat)
    starts = np.fromiter((a for a, _ in flat), dtype=np.int64, count=n)
    ends = np.fromiter((b for _, b in flat), dtype=np.int64, count=n)
    pos = pos_tag_sents(sents, reference)
    pos_ids = np.fromiter((POS_ID[t] for tags in pos for t in tags), dtype=np.uint16, count=n)
    ner_ids = None
    if ner != 'none':
        ner_id = {t: i for i, t in enumerate(stream_tags('ner', ner))}
        iob = ner_tag_sents(sents, pos, ner, reference)
        ner_ids = np.fromiter((ner_id[t] for tags in iob for t in tags), dtype=np.uint16, count=n)
    return starts, ends, pos_ids, ner_ids

# -----------------------------------------------------------------------------
# BPE tokens and alignment

@lru_cache(maxsize=None)
def _token_bytes_len():
    """Byte length of every GPT-2 token (to turn token ids into byte offsets)."""
    enc = _encoding()
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int64)

@lru_cache(maxsize=1 << 20)
def _encode_chunk(chunk):
    # Zipf: most word chunks (' the', ',', ...) repeat, so the cache hits most of the time
    return _encoding().encode_ordinary(chunk)

def tokenize(text, starts, ends, tokenization='lime'):
    """GPT-2 token ids of a text. 'lime': each word chunk (the whitespace and any
    untokenized characters before a word, plus the word) is encoded on its own, so no
    token crosses a word boundary; 'plain': encode_ordinary over the whole text."""
    if tokenization == 'plain':
        return np.array(_encoding().encode_ordinary(text), dtype=np.int64)
    ids, prev = [], 0
    for e in ends.tolist():
        ids.extend(_encode_chunk(text[prev:e]))
        prev = e
    if prev < len(text):
        ids.extend(_encode_chunk(text[prev:]))
    return np.array(ids, dtype=np.int64)

def _char_of_byte(text):
    """Index of the character each UTF-8 byte of text belongs to."""
    data = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
    return np.cumsum((data & 0xC0) != 0x80) - 1  # non-continuation bytes start a character

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

def align(tok_start, tok_end, starts, ends):
    """Word index of each token: the word with the largest character overlap (ties: the
    first), -1 for a token that overlaps no word (whitespace). Words do not overlap and
    are sorted, so candidates are a contiguous range found by binary search."""
    lo = np.searchsorted(ends, tok_start, side='right')   # first word ending after token start
    hi = np.searchsorted(starts, tok_end, side='left')    # words starting before token end
    out = np.where(hi > lo, lo, -1).astype(np.int64)
    for t in np.nonzero(hi - lo > 1)[0].tolist():         # token spans several words: rare
        ov = (np.minimum(ends[lo[t]:hi[t]], tok_end[t]) - np.maximum(starts[lo[t]:hi[t]], tok_start[t]))
        out[t] = lo[t] + int(np.argmax(ov))                # argmax takes the first on ties
    return out

def _streams_from_alignment(widx, pos_ids, ner_ids):
    """Per-token streams from the word index of each token (-1 = no word -> <space>)."""
    streams = {}
    none = widx < 0
    safe = np.where(none, 0, widx)
    streams['pos'] = np.where(none, SPACE, pos_ids[safe] if len(pos_ids) else SPACE).astype(np.uint16)
    if ner_ids is not None:
        streams['ner'] = np.where(none, SPACE, ner_ids[safe] if len(ner_ids) else SPACE).astype(np.uint16)
    # word boundary: the first token of each word starts it (3 = B, 4 = I)
    first = np.ones(len(widx), dtype=bool)
    first[1:] = widx[1:] != widx[:-1]
    streams['word'] = np.where(none, SPACE, np.where(first, 3, 4)).astype(np.uint16)
    return streams

def annotate_text(text, tokenization='lime', ner='binary', reference=False):
    """Tokens and full metadata of one document.
    Returns (ids int64 array, {'pos', 'ner' (unless ner='none'), 'word'}: uint16 arrays)."""
    starts, ends, pos_ids, ner_ids = analyze(text, ner, reference)
    ids = tokenize(text, starts, ends, tokenization)
    cs, ce = _token_char_spans(ids, _char_of_byte(text))
    return ids, _streams_from_alignment(align(cs, ce, starts, ends), pos_ids, ner_ids)

def decode_text(ids):
    """Text of a token stream with invalid UTF-8 (e.g. a cut multi-byte character)
    replaced by U+FFFD, one per invalid byte, plus the byte -> char map it implies."""
    data = _encoding().decode_bytes(list(ids))
    try:
        return data.decode('utf-8'), None
    except UnicodeDecodeError:
        s = data.decode('utf-8', errors='surrogateescape')
        return ''.join('\ufffd' if '\udc80' <= c <= '\udcff' else c for c in s), s

def _char_offsets_any(ids):
    """(text, token char starts, token char ends) for any token stream, valid UTF-8 or not."""
    text, escaped = decode_text(ids)
    if escaped is None:
        return (text,) + _token_char_spans(ids, _char_of_byte(text))
    # invalid UTF-8 (rare): each escaped byte is one character
    nb = [1 if '\udc80' <= c <= '\udcff' else len(c.encode('utf-8')) for c in escaped]
    char_of_byte = np.repeat(np.arange(len(nb)), nb)
    return (text,) + _token_char_spans(ids, char_of_byte)

def _annotate_doc_ids(ids, ner, reference):
    text, cs, ce = _char_offsets_any(ids)
    starts, ends, pos_ids, ner_ids = analyze(text, ner, reference)
    return _streams_from_alignment(align(cs, ce, starts, ends), pos_ids, ner_ids)

def split_documents(ids):
    """(start, end) of each document of a token stream; <|endoftext|> separates them."""
    eot = np.nonzero(ids == _encoding().eot_token)[0]
    bounds = np.concatenate([[-1], eot, [len(ids)]])
    return [(int(a) + 1, int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]

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
                out[k][t] = full[k[:-len('_causal')]][t - a]
    return out

def annotate_causal(ids, ner='binary', reference=False):
    return annotate_causal_reference(ids, ner, reference)

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
    args = p.parse_args(argv)
    name = args.file or '<stdin>'
    try:
        ensure_resources(args.ner)
        if args.file:
            with open(args.file, 'rb') as f:
                raw = f.read()
        else:
            raw = sys.stdin.buffer.read()
        try:
            data = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise MetadataError(f'{name}: not valid UTF-8 (byte {e.start})')
        if args.ids:
            try:
                ids = np.array([int(x) for x in data.split()], dtype=np.int64)
            except ValueError as e:
                raise MetadataError(f'{name}: --ids expects whitespace-separated integers ({e})')
            if len(ids) and (ids.min() < 0 or ids.max() >= _encoding().n_vocab):
                raise MetadataError(f'{name}: token id out of range 0..{_encoding().n_vocab - 1}')
            streams = annotate_ids(ids, args.ner, args.tags, args.reference)
        else:
            ids, streams = annotate_text(data, args.tokenization, args.ner, args.reference)
            if args.tags == 'causal':
                streams = annotate_ids(ids, args.ner, 'causal', args.reference)
        streams = {k.replace('_causal', ''): v for k, v in streams.items()}
    except MetadataError as e:
        print(f'metadata.py: error: {e}', file=sys.stderr)
        return 1
    enc = _encoding()
    pos_names = stream_tags('pos', args.ner)
    ner_names = stream_tags('ner', args.ner) if args.ner != 'none' else None
    out = sys.stdout
    for i, t in enumerate(ids.tolist()):
        out.write(json.dumps({
            'id': t,
            'text': enc.decode_single_token_bytes(t).decode('utf-8', errors='replace'),
            'pos': pos_names[streams['pos'][i]],
            'ner': ner_names[streams['ner'][i]] if ner_names else None,
        }, ensure_ascii=False) + '\n')
    return 0

if __name__ == '__main__':
    sys.exit(main())
