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
from functools import lru_cache, wraps
from collections import OrderedDict

import numpy as np

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
NER_MODES = ('typed', 'binary', 'none')
TOKENIZATIONS = ('lime', 'plain')
TAG_KINDS = ('full', 'causal')
WORD_TAGS = ['B', 'I']  # the 'word' stream: token starts a word / continues one
WORD_B, WORD_I = len(SPECIAL), len(SPECIAL) + 1  # their ids (3, 4)

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
    import nltk
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

def _frozen(obj):
    # the models live for the whole process: move them (and everything alive now) out of the
    # collector's generations, so later collections do not rescan them
    import gc
    gc.freeze()
    return obj

# models are loaded once per process (nltk.ne_chunk would reload its chunker on every call)
@lru_cache(maxsize=None)
def _sentence_tokenizer():
    from nltk.tokenize import PunktTokenizer
    tok = PunktTokenizer('english')
    # punkt decides each candidate break by text_contains_sentbreak(context), a pure function
    # of the short context string (the fixed English parameters are never retrained):
    # memoise it (the causal path re-segments the same contexts again and again)
    tok.text_contains_sentbreak = _punkt_memo(tok)
    return tok

def _punkt_memo(tok, maxsize=1 << 16):
    """Memoised tok.text_contains_sentbreak. A context 'word. Next' whose word is ASCII
    letters (2 or more) is looked up with the word replaced by a fixed one: punkt reads that
    word only through its type (lowercased), and only to ask whether it is an abbreviation,
    an initial, a number or the first half of a known collocation. So when it is none of
    these, any such word gives the same answer, and new words mostly hit the cache."""
    import re
    raw = tok.text_contains_sentbreak
    params = tok._params
    special = set(params.abbrev_types) | {a for a, _ in params.collocations}
    canon = 'qqqq'
    assert canon not in special
    simple = re.compile(r"[A-Za-z]{2,}(?=[.?!]\s+\S+$)")
    cache = {}

    def run(ctx):
        r = cache.get(ctx)
        if r is None:
            if len(cache) >= maxsize:
                cache.clear()
            m = simple.match(ctx)
            if m and m.group().lower() not in special:
                key = canon + ctx[m.end():]
                r = cache.get(key)
                if r is None:
                    r = cache[key] = raw(key)
            else:
                r = raw(ctx)
            cache[ctx] = r
        return r
    return run

@lru_cache(maxsize=None)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer
    return NLTKWordTokenizer()

# reference=True: plain NLTK; else the fast exact reimplementations below (same output)
@lru_cache(maxsize=None)
def _fast_word_spans():
    return FastWordSpans()

@lru_cache(maxsize=None)
def _pos_tagger(reference):
    from nltk.tag import PerceptronTagger
    return _frozen(PerceptronTagger() if reference else FastPOSTagger())

@lru_cache(maxsize=None)
def _ne_chunker(ner, reference):
    from nltk.chunk import ne_chunker
    fmt = 'binary' if ner == 'binary' else 'multiclass'
    return _frozen(ne_chunker(fmt) if reference else FastNEChunker(fmt))

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
    if name == 'gpt2':
        return None
    head, _, n = name.partition('-')
    if head != 'gpt2' or not n.isdigit() or not 256 <= int(n) < 50257:
        raise MetadataError(f"unknown tokenizer '{name}' (expected gpt2 or gpt2-N, 256 <= N < 50257)")
    return int(n)

@lru_cache(maxsize=None)
def encoding():
    import tiktoken
    gpt2 = tiktoken.get_encoding('gpt2')
    n = parse_tokenizer(TOKENIZER)
    if n is None:
        return gpt2
    ranks = {k: v for k, v in gpt2._mergeable_ranks.items() if v < n}
    return tiktoken.Encoding(name=TOKENIZER, pat_str=gpt2._pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': n})

# -----------------------------------------------------------------------------
# Fast exact taggers: NLTK's averaged-perceptron POS tagger and maxent NE chunker
# inference, and its Treebank word-span tokenizer, reimplemented with numpy and caches.
# Both models are greedy left-to-right and read only the one or two previous tags, so we
# vectorise ACROSS words: everything that does not depend on earlier predictions is
# computed up front per token (with per-word caches), then rounds over all words add the
# history features until no tag changes (the same fixpoint as left to right). Scores are summed in a different
# order than NLTK, so whenever the best and second-best scores are closer than a tiny
# epsilon we recompute that one token with NLTK's own code (exact by construction).
# The models are NLTK's own files, loaded through NLTK. --reference uses plain NLTK.

def _run_batched(run, jobs, max_tokens):
    """run(jobs) on consecutive batches of about max_tokens tagged tokens, in the jobs' order
    (the taggers take any order). jobs: (items, start, history, stop); an empty job gives []."""
    jobs = list(jobs)
    lens = [b - a for _, a, _, b in jobs]
    keep = [k for k, n in enumerate(lens) if n > 0]
    if len(keep) < len(jobs):   # an empty job: nothing to tag, and no layout to give it
        out = [[] for _ in jobs]
        for k, r in zip(keep, _run_batched(run, [jobs[k] for k in keep], max_tokens)):
            out[k] = r
        return out
    out = []
    lo, ntok = 0, 0
    for k, n in enumerate(lens):
        ntok += n
        if ntok >= max_tokens:
            out += run(jobs[lo:k + 1])
            lo, ntok = k + 1, 0
    if lo < len(jobs):
        out += run(jobs[lo:])
    return out


def _grow(arr, n):
    # amortised-doubling growth of a per-word cache table (rows = word ids)
    if n <= arr.shape[0]:
        return arr
    new = np.zeros((max(n, 2 * arr.shape[0]),) + arr.shape[1:], dtype=arr.dtype)
    new[: arr.shape[0]] = arr
    return new


class FastPOSTagger:
    """Exact, vectorised equivalent of nltk.tag.PerceptronTagger().tag()."""

    # per-word cache columns (row ids into self.W; 0 is the all-zero row)
    TD, ISUF, IPREF, IWORD, M1WORD, M1SUF, M2WORD, P1WORD, P1SUF, P2WORD, TWID = range(11)

    def __init__(self, max_batch_tokens=32768, eps=1e-6, max_cache=2_000_000):
        self.max_cache = max_cache  # per-word cache entries before a reset (bounds memory)
        self.tagger = tagger = _pos_tagger(True)  # NLTK's own model, loaded once per process
        model = tagger.model
        self.max_batch_tokens = max_batch_tokens
        # weights are rounded to 3 decimals, so distinct scores differ by ~1e-3;
        # a gap below eps means an exact tie (or float-order sensitive) -> NLTK
        self.eps = eps
        self.classes = sorted(model.classes)
        C = len(self.classes)
        # tag vocabulary for prev/prev2: classes first (so argmax index == tag
        # index), then the START markers and any tagdict-only tags
        self.tags = list(self.classes)
        for t in list(tagger.START) + sorted(set(tagger.tagdict.values())):
            if t not in self.tags:
                self.tags.append(t)
        self.tag_idx = {t: i for i, t in enumerate(self.tags)}
        self.tags_obj = np.array(self.tags, dtype=object)
        NT = self.NT = len(self.tags)
        cidx = {c: i for i, c in enumerate(self.classes)}
        # dense weight matrix: feature string -> row
        self.feat_row = {}
        W = np.zeros((len(model.weights) + 1, C), dtype=np.float64)
        for f, wd in model.weights.items():
            r = len(self.feat_row) + 1
            self.feat_row[f] = r
            for lab, w in wd.items():
                if lab in cidx:  # NLTK only takes the max over self.classes
                    W[r, cidx[lab]] = w
        self.W = W
        fr = self.feat_row.get
        self.bias = W[fr("bias", 0)]
        # (prev, prev2) -> sum of 'i-1 tag', 'i-2 tag', 'i tag+i-2 tag' rows
        T = np.zeros((NT, NT, C))
        for a, ta in enumerate(self.tags):
            for b, tb in enumerate(self.tags):
                T[a, b] = W[fr("i-1 tag " + ta, 0)] + W[fr("i-2 tag " + tb, 0)] + W[fr("i tag+i-2 tag " + ta + " " + tb, 0)]
        self.T = T
        # 'i-1 tag+i word' features: key = word_id * NT + prev_tag -> row
        self.tw_word = {}
        keys, rows = [], []
        pre = "i-1 tag+i word "
        for f, r in self.feat_row.items():
            if f.startswith(pre):
                t, w = f[len(pre):].split(" ", 1)  # tags contain no spaces
                if t in self.tag_idx:
                    wid = self.tw_word.setdefault(w, len(self.tw_word))
                    keys.append(wid * NT + self.tag_idx[t])
                    rows.append(r)
        o = np.argsort(keys)
        self.tw_keys = np.asarray(keys, dtype=np.int64)[o]
        self.tw_rows = np.asarray(rows, dtype=np.int64)[o]
        self.tw_keys_list = self.tw_keys.tolist()
        # per-word cache; ids 0..3 are the context pseudo-words, which are NOT
        # normalised (a real token '-START-' normalises to '-start-')
        self._reset_cache()
        self.fallbacks = 0  # number of tokens recomputed with NLTK (near-ties)

    def _reset_cache(self):
        self.word_id = {}
        self.roles = np.zeros((1024, 11), dtype=np.int64)
        self.n_words = 0
        for k, s in enumerate(list(self.tagger.START) + list(self.tagger.END)):
            self._add(s, pseudo=True)
            self.word_id[k] = k  # int keys (never a word) name the pseudo-words in _run

    def _row(self, w, pseudo=False):
        tg, fr = self.tagger, self.feat_row.get
        n = w if pseudo else tg.normalize(w)
        td = tg.tagdict.get(w)
        return [
            self.tag_idx[td] if (td and not pseudo) else -1,
            fr("i suffix " + w[-3:], 0),
            fr("i pref1 " + (w[0] if w else ""), 0),
            fr("i word " + n, 0),
            fr("i-1 word " + n, 0),
            fr("i-1 suffix " + n[-3:], 0),
            fr("i-2 word " + n, 0),
            fr("i+1 word " + n, 0),
            fr("i+1 suffix " + n[-3:], 0),
            fr("i+2 word " + n, 0),
            self.tw_word.get(n, -1),
        ]

    def _add(self, w, pseudo=False):
        return self._add_many([w], pseudo)

    def _add_many(self, words, pseudo=False):
        # cache the feature rows of new words (their ids: n_words, n_words + 1, ...)
        i, k = self.n_words, len(words)
        self.roles = _grow(self.roles, i + k)
        self.roles[i:i + k] = np.asarray([self._row(w, pseudo) for w in words], dtype=np.int64).reshape(k, -1)
        self.n_words += k
        if not pseudo:
            for r, w in enumerate(words):
                self.word_id[w] = i + r
        return i

    def tag_sents(self, sents):
        """sents: list of list of word strings -> list of list of tag strings."""
        return _run_batched(self._run, [(s, 0, (), len(s)) for s in sents], self.max_batch_tokens)

    def tag_resume(self, jobs):
        """Greedy continuation: jobs of (words, start, prev, stop) -> the tags of
        words[start:stop] given prev = the tags of words[start-2:start] (fewer at the
        sentence start); same as metadata.pos_tag_resume(jobs, reference=True)."""
        return _run_batched(self._run, jobs, self.max_batch_tokens)

    def _run(self, jobs):
        # jobs in any order (an empty one gives an empty list)
        if self.n_words > self.max_cache:
            self._reset_cache()
        # flat layout per job: the words start-2 .. stop+1 of its sentence, with
        # -START- -START2- before word 0 and -END- -END2- after the last word (pseudo-word
        # ids 0..3, written as their int keys); words are mapped to ids in one pass after
        fw, starts, lens, h1, h2 = [], [], [], [], []
        START, tidx = self.tagger.START, self.tag_idx
        t_s0, t_s1 = tidx[START[0]], tidx[START[1]]
        for s, start, prev, stop in jobs:
            n = len(s)
            a = start - 2 if start > 2 else 0
            b = stop + 2 if stop + 2 < n else n
            if start < 2:
                fw += (0, 1)[start:]
            starts.append(len(fw) + (start - a))
            lens.append(stop - start)
            fw += s[a:b]
            if b < stop + 2:
                fw += (2, 3)[: stop + 2 - b]
            # history (NLTK: prev, prev2 = START, then shifted by each tag)
            k = len(prev)
            h1.append(tidx[prev[-1]] if k else t_s0)
            h2.append(tidx[prev[-2]] if k > 1 else (t_s0 if k else t_s1))
        flat = self.ids(fw)
        starts = np.asarray(starts, dtype=np.int64)
        lens = np.asarray(lens, dtype=np.int64)
        tags, realpos, offs = self._score(flat, starts, lens, h1, h2, jobs)
        names = self.tags_obj[tags[realpos]].tolist()
        return [names[o:o + n] for o, n in zip(offs.tolist(), lens.tolist())]

    def ids(self, words):
        """Cache ids of words (int keys 0..3: the pseudo-words), new words added in order."""
        get = self.word_id.get
        flat = list(map(get, words))
        if None in flat:
            self._add_many(list(dict.fromkeys(w for i, w in zip(flat, words) if i is None)))
            flat = list(map(get, words))
        return np.asarray(flat, dtype=np.int64)

    def _score(self, flat, starts, lens, h1, h2, jobs):
        """The greedy tagging of a flat layout: flat = word ids, job k tags flat[starts[k]:
        starts[k] + lens[k]] after the tags h1[k], h2[k] (previous, the one before); the words
        2 before and after each tagged one are in flat. jobs[k][0], jobs[k][1] (the words and
        the index of the first tagged one) are read only to recompute a near-tie with NLTK.
        Returns (tags: tag indices over flat, realpos: the tagged positions, offs)."""
        W, T, C, NT = self.W, self.T, len(self.classes), self.NT
        R = self.roles[flat]
        N = len(flat)
        tags = np.full(N, -1, dtype=np.int64)
        # history: for i=0 prev='-START-', prev2='-START2-' (sic, NLTK order)
        tags[starts - 1] = h1
        tags[starts - 2] = h2
        # the positions to tag, job after job
        offs = np.cumsum(lens) - lens
        realpos = np.repeat(starts - offs, lens) + np.arange(int(lens.sum()))
        real = np.zeros(N, dtype=bool)
        real[realpos] = True
        td = R[:, self.TD]
        is_td = real & (td >= 0)
        tags[is_td] = td[is_td]  # tagdict shortcut: fixed tag, no prediction
        p = np.nonzero(real & (td < 0))[0]
        # all prediction-independent features, summed once per token
        S = self.bias + W[R[p, self.ISUF]]
        S += W[R[p, self.IPREF]]
        S += W[R[p, self.IWORD]]
        S += W[R[p - 1, self.M1WORD]]
        S += W[R[p - 1, self.M1SUF]]
        S += W[R[p - 2, self.M2WORD]]
        S += W[R[p + 1, self.P1WORD]]
        S += W[R[p + 1, self.P1SUF]]
        S += W[R[p + 2, self.P2WORD]]
        # Greedy left to right gives the unique tags with tags[p] = best(p, tags[p-1], tags[p-2])
        # at every position. Solve that in rounds over all positions at once: start from the
        # best tag ignoring history, then each round recomputes the positions one or two after
        # a tag that changed, until none changes. Every position's last computation read the
        # final tags before it, so this equals the sequential loop, in a few rounds instead
        # of one step per word of the longest sentence.
        TW = R[:, self.TWID]
        pred = np.zeros(N, dtype=bool)
        pred[p] = True
        srow = np.full(N, -1, dtype=np.int64)
        srow[p] = np.arange(len(p))
        tags[p] = S.argmax(axis=1) if len(p) else tags[p]
        tw_keys, tw_rows = self.tw_keys, self.tw_rows
        nk = len(tw_keys)
        cur = p
        while len(cur):
            prev, prev2 = tags[cur - 1], tags[cur - 2]
            sc = S[srow[cur]] + T[prev, prev2]
            tw = TW[cur]
            m = np.nonzero(tw >= 0)[0]
            if len(m) and nk:
                key = tw[m] * NT + prev[m]
                loc = np.minimum(np.searchsorted(tw_keys, key), nk - 1)
                hit = tw_keys[loc] == key
                sc[m[hit]] += W[tw_rows[loc[hit]]]
            best = sc.argmax(axis=1)
            part = np.partition(sc, C - 2, axis=1)
            for a in np.nonzero(part[:, C - 1] - part[:, C - 2] < self.eps)[0].tolist():
                best[a] = self._exact(jobs, starts, tags, int(cur[a]))   # same inputs as sc
            changed = cur[best != tags[cur]]
            tags[cur] = best
            nxt = np.union1d(changed + 1, changed + 2)
            cur = nxt[pred[nxt]]
        return tags, realpos, offs

    def _exact(self, jobs, starts, tags, p):
        # recompute one token exactly as NLTK does (near-tie in our scores)
        self.fallbacks += 1
        tg = self.tagger
        k = int(np.searchsorted(starts, p, side="right")) - 1
        words, start = jobs[k][0], jobs[k][1]
        i = start + p - int(starts[k])
        context = tg.START + [tg.normalize(w) for w in words] + tg.END
        prev, prev2 = self.tags[tags[p - 1]], self.tags[tags[p - 2]]
        feats = tg._get_features(i, words[i], context, prev, prev2)
        return self.tag_idx[tg.model.predict(feats)[0]]


class FastNEChunker:
    """Exact, vectorised equivalent of
    [iob for (w, p, iob) in tree2conlltags(nltk.chunk.ne_chunker(fmt).parse(sent))]."""

    def __init__(self, fmt="binary", max_batch_tokens=32768, eps=1e-9, max_cache=2_000_000):
        self.max_cache = max_cache  # per-(word, pos) cache entries before a reset
        # load exactly what NLTK loads for ne_chunker(fmt)
        import nltk
        from nltk.chunk.named_entity import shape, simplify_pos
        self._shape, self._simplify_pos = self._compile_shape(shape), simplify_pos
        self.chunker = _ne_chunker('binary' if fmt == 'binary' else 'typed', True)  # NLTK's, loaded once
        self.nt = nt = self.chunker._tagger  # NEChunkParserTagger
        clf = nt._classifier
        enc = clf._encoding
        self.max_batch_tokens = max_batch_tokens
        self.eps = eps
        # our scoring mirrors BinaryMaxentFeatureEncoding + log-linear maxent
        assert isinstance(enc, nltk.classify.maxent.BinaryMaxentFeatureEncoding)
        assert clf._logarithmic and not enc._unseen and nt._cutoff_prob is None
        self.labels = list(enc.labels())
        self.labels_obj = np.array(self.labels, dtype=object)
        self.label_idx = {lab: j for j, lab in enumerate(self.labels)}
        for lab in self.labels:
            assert lab == "O" or lab[:2] in ("B-", "I-"), lab
        L = len(self.labels)
        lidx = {lab: j for j, lab in enumerate(self.labels)}
        wts = clf._weights
        # (fname, fval) -> row of per-label weights; a python dict keyed like
        # NLTK's mapping, so value equality (True == 1, None, ints) is the same
        self.feat_row = {}
        rows = [np.zeros(L)]
        for (fname, fval, lab), fid in enc._mapping.items():
            r = self.feat_row.get((fname, fval))
            if r is None:
                r = self.feat_row[(fname, fval)] = len(rows)
                rows.append(np.zeros(L))
            rows[r][lidx[lab]] = wts[fid]
        self.W = np.array(rows)
        self.aon = np.zeros(L)
        if enc._alwayson:
            for lab, fid in enc._alwayson.items():
                self.aon[lidx[lab]] = wts[fid]
        self.wl = nt._english_wordlist()
        # values the 'prevtag' feature can take: None (index 0), a label's
        # first character (index 1: NLTK uses history[index - 1][0]) or the
        # full label (index >= 2)
        self.vals = [None] + self.labels + sorted({lab[0] for lab in self.labels})
        vidx = {v: j for j, v in enumerate(self.vals)}
        self.v_full = np.array([vidx[lab] for lab in self.labels])
        self.v_char = np.array([vidx[lab[0]] for lab in self.labels])
        fr = self.feat_row.get
        self.r_prevtag = np.array([fr(("prevtag", v), 0) for v in self.vals])
        self.r_shpt_none = np.array([fr(("shape+prevtag", f"{None}+{v}"), 0) for v in self.vals])
        self.r_none = {k: fr((k, None), 0) for k in ("prevpos", "prevword", "nextpos", "nextword")}
        # 'word+nextpos' (f"{word.lower()}+{next pos.lower()}", 'None' at the sentence end) as a
        # dense table: [index of the lowercased word, index of the next pos] -> row. Next-pos
        # indices of the model's features come first (0 = None); any other pos has no row.
        self.wn_word, self.wn_pl = {}, {None: 0}
        cells = []
        for (fname, fval), r in self.feat_row.items():
            if fname == "word+nextpos" and isinstance(fval, str):
                w, _, npos = fval.rpartition("+")
                wi = self.wn_word.setdefault(w, len(self.wn_word) + 1)   # 0: no such word
                pi = self.wn_pl.setdefault(None if npos == "None" else npos, len(self.wn_pl))
                cells.append((wi, pi, r))
        self.wn_tab = np.zeros((len(self.wn_word) + 1, len(self.wn_pl)), dtype=np.int64)
        for wi, pi, r in cells:
            self.wn_tab[wi, pi] = r
        self._reset_cache()
        self.fallbacks = 0

    @staticmethod
    def _compile_shape(nltk_shape):
        """NLTK's shape() with its three patterns compiled once: NLTK >= 3.10 recompiles them
        through its ReDoS guard on every call (7 us a word). Same engine (the `regex` module
        there, `re` before), same patterns and flags, so the same answers (tests compare)."""
        import re
        import inspect
        pats = (r"[0-9]+(\.[0-9]*)?|[0-9]*\.[0-9]+$", r"\W+$", r"\w+$")
        try:
            src = inspect.getsource(nltk_shape)
        except Exception:
            return nltk_shape
        if not all(f'r"{p}"' in src for p in pats):
            return nltk_shape   # a different NLTK shape(): use it as it is
        uses_redos = 'redos.' in src
        if uses_redos:
            from nltk import redos
        if uses_redos:
            num, punct, word_rx = [getattr(c, '_rx', c).match for c in (redos.compile(p, re.UNICODE) for p in pats)]
        else:
            num, punct, word_rx = [re.compile(p, re.UNICODE).match for p in pats]

        memo = {}

        def shape(word):
            r = memo.get(word)
            if r is None:
                if len(memo) >= 1 << 20:
                    memo.clear()
                r = memo[word] = shape_of(word)
            return r

        def shape_of(word):
            if num(word):
                return "number"
            elif punct(word):
                return "punct"
            elif word_rx(word):
                if word.istitle():
                    return "upcase"
                elif word.islower():
                    return "downcase"
                else:
                    return "mixedcase"
            else:
                return "other"
        return shape

    def _reset_cache(self):
        # per-(word, pos) caches
        L, V = len(self.labels), len(self.vals)
        self.tok_id = {}
        self.selfvec = np.zeros((1024, L))
        self.cols = np.zeros((1024, 4), dtype=np.int64)  # prevpos, prevword, nextpos, nextword rows
        self.ppt = np.zeros((1024, V), dtype=np.int64)  # 'pos+prevtag' rows
        self.shpt = np.zeros((1024, V), dtype=np.int64)  # 'shape+prevtag' rows (as previous token)
        self.n_tok = 0  # (word, pos) pairs cached
        self.plid = np.zeros(1024, dtype=np.int64)  # id of pos.lower() (0 = None: no next token)
        self.pl_id = dict(self.wn_pl)  # pos.lower() -> index (the model's next-pos values first)
        self.wnw = np.zeros(1024, dtype=np.int64)  # index of the lowercased word in wn_tab
        self._ppt_rows, self._shpt_rows = {}, {}

    def _add_many(self, toks):
        """Cache the features of new (word, pos) tokens: Python lookups per token, the row sums
        for all of them at once (in NLTK's order: float addition is not associative)."""
        fr = self.feat_row.get
        W, shape, wl = self.W, self._shape, self.wl
        i0, k = self.n_tok, len(toks)
        for name in ('selfvec', 'cols', 'ppt', 'shpt', 'plid', 'wnw'):
            setattr(self, name, _grow(getattr(self, name), i0 + k))
        own, cols, ppt, shpt, plid, wnw = [], [], [], [], [], []
        for r, tok in enumerate(toks):
            word, pos = tok
            sp = self._simplify_pos(pos)
            lw, pl = word.lower(), pos.lower()
            own.append([fr(key, 0) for key in (
                ("bias", True),
                ("shape", shape(word)),
                ("wordlen", len(word)),
                ("prefix3", word[:3].lower()),
                ("suffix3", word[-3:].lower()),
                ("pos", sp),
                ("word", word),
                ("en-wordlist", word in wl),
            )])
            cols.append((fr(("prevpos", sp), 0), fr(("prevword", lw), 0), fr(("nextpos", pl), 0),
                         fr(("nextword", lw), 0)))
            # the prevtag pair rows depend on the simplified pos / the shape only: few values
            row = self._ppt_rows.get(sp)
            if row is None:
                row = self._ppt_rows[sp] = [fr(("pos+prevtag", f"{sp}+{t}"), 0) for t in self.vals]
            ppt.append(row)
            psh = shape(lw)  # prevshape is the shape of the LOWERCASED previous word
            row = self._shpt_rows.get(psh)
            if row is None:
                row = self._shpt_rows[psh] = [fr(("shape+prevtag", f"{psh}+{t}"), 0) for t in self.vals]
            shpt.append(row)
            plid.append(self.pl_id.setdefault(pl, len(self.pl_id)))
            wnw.append(self.wn_word.get(lw, 0))
            self.tok_id[tok] = i0 + r
        own = np.asarray(own, dtype=np.int64).reshape(k, 8)
        v = np.repeat(self.aon[None, :], k, axis=0)
        for c in range(8):
            v += W[own[:, c]]
        self.selfvec[i0:i0 + k] = v
        self.cols[i0:i0 + k] = np.asarray(cols, dtype=np.int64).reshape(k, 4)
        self.ppt[i0:i0 + k] = np.asarray(ppt, dtype=np.int64).reshape(k, -1)
        self.shpt[i0:i0 + k] = np.asarray(shpt, dtype=np.int64).reshape(k, -1)
        self.plid[i0:i0 + k] = plid
        self.wnw[i0:i0 + k] = wnw
        self.n_tok += k

    def iob_sents(self, tagged_sents):
        """tagged_sents: list of list of (word, pos) -> list of list of IOB tags."""
        # tree2conlltags(_tagged_to_parse(...)): an I-X that does not continue an X chunk
        # opens a new chunk, i.e. becomes B-X (_iob)
        return [[_iob(lab, labs[i - 1] if i else None) for i, lab in enumerate(labs)]
                for labs in self.raw_sents(tagged_sents)]

    def raw_sents(self, tagged_sents):
        """The raw labels of NLTK's NE tagger (before the chunk/IOB fixup) of each sentence."""
        return _run_batched(self._run, [(s, 0, (), len(s)) for s in tagged_sents], self.max_batch_tokens)

    def raw_resume(self, jobs):
        """Greedy continuation: jobs of (tokens, start, history, stop) -> the raw labels of
        tokens[start:stop] given history = the raw labels of tokens[:start] (only the
        last one is read; pos of tokens past stop is not read); same as
        metadata.ner_raw_resume(jobs, ner, reference=True)."""
        return _run_batched(self._run, jobs, self.max_batch_tokens)

    def _run(self, jobs):
        # jobs in any order (an empty one gives an empty list)
        if self.n_tok > self.max_cache:
            self._reset_cache()
        lidx = self.label_idx
        # flat layout per job: tokens start-1 .. stop (those its features read)
        fw, starts, lens, absst, fpos, lpos, hpos, hlab = [], [], [], [], [], [], [], []
        for s, start, hist, stop in jobs:
            n = len(s)
            a = start - 1 if start else 0
            b = stop + 1 if stop < n else n
            st = len(fw) + (start - a)
            starts.append(st)
            lens.append(stop - start)
            absst.append(start)
            if start == 0:
                fpos.append(st)
            else:
                hpos.append(st - 1)
                hlab.append(lidx[hist[start - 1]])
            if b == n:
                lpos.append(st + (n - 1 - start))
            fw += s[a:b]
        ids = self.ids(fw)
        starts = np.asarray(starts, dtype=np.int64)
        lens = np.asarray(lens, dtype=np.int64)
        absst = np.asarray(absst, dtype=np.int64)  # index of each job's first tagged token
        labs, realpos, offs = self._score(ids, starts, lens, absst, fpos, lpos, hpos, hlab, jobs)
        names = self.labels_obj[labs[realpos]].tolist()
        return [names[o:o + n] for o, n in zip(offs.tolist(), lens.tolist())]

    def ids(self, toks):
        """Cache ids of (word, pos) tokens, new ones added in order."""
        get = self.tok_id.get
        ids = list(map(get, toks))
        if None in ids:
            self._add_many(list(dict.fromkeys(t for i, t in zip(ids, toks) if i is None)))
            ids = list(map(get, toks))
        return np.asarray(ids, dtype=np.int64)

    def _score(self, ids, starts, lens, absst, fpos, lpos, hpos, hlab, jobs):
        """The greedy labelling of a flat layout: ids = token ids; job k labels
        ids[starts[k]:starts[k] + lens[k]], the first of them at index absst[k] of its sentence;
        fpos / lpos: flat positions of sentence-first / sentence-last tokens; hpos, hlab: the
        given labels (history). The tokens before and after each labelled one are in ids.
        jobs[k] is read only to recompute a near-tie with NLTK.
        Returns (labs: label indices over ids, realpos: the labelled positions, offs)."""
        W, L = self.W, len(self.labels)
        N = len(ids)
        first = np.zeros(N, dtype=bool)
        first[fpos] = True
        last = np.zeros(N, dtype=bool)
        last[lpos] = True
        cols = self.cols[ids]
        # prediction-independent features: own (word, pos) features, neighbours
        S = self.selfvec[ids].copy()
        r = np.where(first, self.r_none["prevpos"], np.roll(cols[:, 0], 1))
        S += W[r]
        r = np.where(first, self.r_none["prevword"], np.roll(cols[:, 1], 1))
        S += W[r]
        r = np.where(last, self.r_none["nextpos"], np.roll(cols[:, 2], -1))
        S += W[r]
        r = np.where(last, self.r_none["nextword"], np.roll(cols[:, 3], -1))
        S += W[r]
        # 'word+nextpos': the table cell of (this word, next pos); a next pos the model never
        # saw with any word has no row
        npl = np.where(last, 0, np.roll(self.plid[ids], -1))
        width = self.wn_tab.shape[1]
        S += W[np.where(npl < width, self.wn_tab[self.wnw[ids], np.minimum(npl, width - 1)], 0)]
        ppt = self.ppt[ids]
        shpt_prev = np.roll(self.shpt[ids], 1, axis=0)
        labs = np.full(N, -1, dtype=np.int64)
        labs[hpos] = hlab
        # The only prediction-dependent input is the previous label, through v (the value of
        # the 'prevtag' features: None at the sentence start, the label's first character
        # at index 1, the label from index 2 on; NLTK's quirk) and the 'shape+prevtag' pair.
        # So the scores of every tagged token for every possible previous label are computed
        # up front, in the same order of additions as one token at a time (same floats):
        # table[r, l] = scores of tagged token r (job after job) after label l.
        offs = np.cumsum(lens) - lens
        realpos = np.repeat(starts - offs, lens) + np.arange(int(lens.sum()))
        ai = np.repeat(absst - offs, lens) + np.arange(len(realpos))  # index in the sentence
        base = S[realpos][:, None, :] + W[self.r_prevtag][None, :, :]
        base += W[ppt[realpos]]
        base += W[np.where((ai >= 2)[:, None], shpt_prev[realpos], self.r_shpt_none[None, :])]
        vsel = np.where((ai == 0)[:, None], 0,
                        np.where((ai == 1)[:, None], self.v_char[None, :], self.v_full[None, :]))
        M = len(realpos)
        table = base[np.arange(M)[:, None], vsel].reshape(M * L, L)
        # Greedy left to right = the unique labels with labs[p] = best(p, labs[p-1]); solved in
        # rounds over all positions at once, as in FastPOSTagger._score: start from the best
        # label after 'O'-like column 0, then recompute the position after each change.
        row = np.full(N, -1, dtype=np.int64)
        row[realpos] = np.arange(M)
        tagged = np.zeros(N + 1, dtype=bool)
        tagged[realpos] = True
        if M:
            labs[realpos] = table[np.arange(M) * L].argmax(axis=1)
        cur = realpos
        while len(cur):
            # (at a sentence start every column is the same)
            sc = table[row[cur] * L + np.maximum(labs[cur - 1], 0)]
            best = sc.argmax(axis=1)
            if L > 1:
                part = np.partition(sc, L - 2, axis=1)
                for a in np.nonzero(part[:, L - 1] - part[:, L - 2] < self.eps)[0].tolist():
                    best[a] = self._exact(jobs, starts, labs, int(cur[a]))   # same inputs as sc
            changed = cur[best != labs[cur]]
            labs[cur] = best
            nxt = changed + 1
            cur = nxt[tagged[nxt]]
        return labs, realpos, offs

    def _exact(self, jobs, starts, labs, p):
        # recompute one token exactly as NLTK does (near-tie in our scores)
        self.fallbacks += 1
        k = int(np.searchsorted(starts, p, side="right")) - 1
        toks, start, hist = jobs[k][0], jobs[k][1], jobs[k][2]
        i = start + p - int(starts[k])
        history = list(hist[:start]) + [self.labels[t] for t in labs[int(starts[k]) : p].tolist()]
        tag = self.nt.choose_tag(list(toks), i, history)
        return self.labels.index(tag)


_TO_0 = str.maketrans({ch: '0' for ch in '0123456789'})
_TO_A = str.maketrans({**{ch: 'a' for ch in 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'}, **_TO_0})

class FastWordSpans:
    """Exact, cached equivalent of list(NLTKWordTokenizer().span_tokenize(sentence)).

    NLTK runs ~25 regex passes over the whole sentence. Almost all of them are
    local to a whitespace-separated piece, given the whitespace character right
    before and after it; the exceptions are anchored at the sentence start
    (^") or end (final period + closing quotes/brackets, trailing ':' ','). So:
    - every piece is tokenised ONCE as "x" + before + piece + after + "x" by
      NLTK itself, and the result cached under (before, piece, after);
    - the first piece (when it starts the text) uses its true start context;
    - the tail (last piece containing a non-closer character, to the end) is
      tokenised by NLTK with its true end context (also cached).
    Any surprise (token not inside its piece) falls back to NLTK on the whole
    sentence. Verified identical on all of Gutenberg and Brown (verify.py)."""

    CLOSERS = set("])}>\"'»”’")
    # NLTK's CONTRACTIONS2 patterns without an apostrophe (they split a letters-only word)
    LETTER_SPLITS = frozenset(["cannot", "gimme", "gonna", "gotta", "lemme", "wanna"])

    def __init__(self, max_cache=2_000_000):
        import re
        from nltk.tokenize import NLTKWordTokenizer
        self.wt = NLTKWordTokenizer()
        # NLTK >= 3.10 runs every regex through the `regex` engine with a timeout guard
        # (nltk.redos), about 2x slower than the stdlib; recompile the same patterns with re
        # (the corpus tests check the spans stay identical to NLTK's)
        flags = re.I | re.M | re.S | re.X | re.A
        plain = lambda p: re.compile(getattr(p, '_rx', p).pattern, getattr(p, '_rx', p).flags & flags)
        for name in ('STARTING_QUOTES', 'PUNCTUATION', 'ENDING_QUOTES', 'CONVERT_PARENTHESES'):
            setattr(self.wt, name, [(plain(p), r) for p, r in getattr(self.wt, name)])
        for name in ('PARENS_BRACKETS', 'DOUBLE_DASHES'):
            p, r = getattr(self.wt, name)
            setattr(self.wt, name, (plain(p), r))
        for name in ('CONTRACTIONS2', 'CONTRACTIONS3'):
            setattr(self.wt, name, [plain(p) for p in getattr(self.wt, name)])
        self.ws = re.compile(r"\S+")
        # maximal runs of ASCII letters with no apostrophe next to them
        self.letters = re.compile(r"(?<![A-Za-z'])[A-Za-z]+(?![A-Za-z'])")
        self.splits_rx = re.compile('|'.join(sorted(self.LETTER_SPLITS)), re.I)
        self.cache = {}
        self.max_cache = max_cache
        self.fallbacks = 0

    def _canon_run(self, m):
        w = m.group()
        return w if w.lower() in self.LETTER_SPLITS else 'a' * len(w)

    def _piece(self, key):
        # key = (before char or '' at text start, piece text, after char or '$' at text end / tail)
        b, piece, a = key
        if piece.isascii() and piece.isalpha() and piece.lower() not in self.LETTER_SPLITS:
            # ASCII letters only: every rule needs a non-letter (quote, punctuation, bracket,
            # dash, apostrophe) except the letter-only contractions (cannot -> can not, ...)
            spans = ((0, len(piece)),)
            if len(self.cache) >= self.max_cache:
                self.cache.clear()
            self.cache[key] = spans
            return spans
        # Only the letter-only contractions and the rules around an apostrophe read which
        # letters a word has: any other run of ASCII letters tokenizes like 'a' * its length.
        # And the rules only ask whether a character is a digit, never which: ASCII digits
        # become '0'. So pieces are tokenized (and cached) in that canonical form: "boat." and
        # "house." become "aaaa." and "aaaaa.", "3:14" becomes "0:00", and new words mostly
        # hit the cache.
        if "'" not in piece and not self.splits_rx.search(piece):
            canon = piece.translate(_TO_A)   # no apostrophe, no letter-only contraction: every run
        else:
            canon = self.letters.sub(self._canon_run, piece).translate(_TO_0)
        if canon != piece:
            spans = self.cache.get((b, canon, a))
            if spans is None:
                spans = self._piece((b, canon, a))
                if spans is None:
                    return None
            self.cache[key] = spans
            return spans
        if a == "$" and b == "":  # the whole text is one tail: plain NLTK
            syn, off = piece, 0
            spans = list(self.wt.span_tokenize(syn))
            ok = True
        elif a == "$":  # tail: true end of text
            syn, off = "x" + b + piece, 1 + len(b)
            spans = list(self.wt.span_tokenize(syn))
            ok = spans[:1] == [(0, 1)]
            spans = spans[1:]
        elif b == "":  # first piece at text start: true start context
            syn, off = piece + a + "x", 0
            spans = list(self.wt.span_tokenize(syn))
            ok = spans[-1:] == [(len(syn) - 1, len(syn))]
            spans = spans[:-1]
        else:
            syn, off = "x" + b + piece + a + "x", 1 + len(b)
            spans = list(self.wt.span_tokenize(syn))
            ok = spans[:1] == [(0, 1)] and spans[-1:] == [(len(syn) - 1, len(syn))]
            spans = spans[1:-1]
        spans = tuple([(s - off, e - off) for s, e in spans])
        if not ok or any(s < 0 or e > len(piece) for s, e in spans):
            return None
        if len(self.cache) >= self.max_cache:
            self.cache.clear()
        self.cache[key] = spans
        return spans

    def __call__(self, text):
        ps = [m.span() for m in self.ws.finditer(text)]
        if not ps:
            return list(self.wt.span_tokenize(text))
        # tail = from the last piece with a non-closer character to the end
        j = len(ps) - 1
        closers = self.CLOSERS
        while j > 0 and all(c in closers for c in text[ps[j][0] : ps[j][1]]):
            j -= 1
        out = []
        get = self.cache.get
        for k in range(j + 1):
            s, e = ps[k]
            b = text[s - 1] if s > 0 else ""
            if k == j:
                key = (b, text[s:], "$")
            else:
                key = (b, text[s:e], text[e])
            spans = get(key)
            if spans is None:
                spans = self._piece(key)
                if spans is None:
                    break
            if len(spans) == 1:   # most pieces are one word
                x, y = spans[0]
                out.append((s + x, s + y))
            else:
                out += [(s + x, s + y) for x, y in spans]
        else:
            return out
        # surprise: NLTK itself on the whole sentence
        self.fallbacks += 1
        return list(self.wt.span_tokenize(text))


# -----------------------------------------------------------------------------
# words and their tags

def _word_spans(sentence, reference=False):
    """Character spans of the words of one sentence (Treebank-style tokens).
    span_tokenize keeps the original characters (word_tokenize rewrites quotes)."""
    return _word_spans_checked(sentence, reference)[0]

def _word_spans_checked(sentence, reference=False):
    """(spans, whether the regex fallback ran): the causal path needs to know."""
    try:
        return list(_word_tokenizer().span_tokenize(sentence) if reference else _fast_word_spans()(sentence)), False
    except ValueError:
        # align_tokens fails on a few quote patterns; fall back to a plain regex split
        import re
        return [m.span() for m in re.finditer(r"\w+|[^\w\s]+", sentence)], True

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
        sp, f = _word_spans_checked(text[s:e], reference)
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

def _analyze_reference(text, ner='binary', reference=True):
    """analyze with NLTK's own tokenizers and taggers (what the fast path must equal)."""
    sents, offsets = [], []
    for s, e in _sentence_tokenizer().span_tokenize(text):
        spans = _word_spans(text[s:e], reference)
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
    enc = encoding()
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int64)

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
    # word boundary: the first token of each word starts it
    first = np.ones(len(widx), dtype=bool)
    first[1:] = widx[1:] != widx[:-1]
    streams['word'] = np.where(none, SPACE, np.where(first, WORD_B, WORD_I)).astype(np.uint16)
    return streams

@_gc_paused
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
    data = encoding().decode_bytes(list(ids))
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
    eot = np.nonzero(ids == encoding().eot_token)[0]
    bounds = np.concatenate([[-1], eot, [len(ids)]])
    return [(int(a) + 1, int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]

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

@_gc_paused
def annotate_causal(ids, ner='binary', reference=False):
    """Causal metadata, equal to annotate_causal_reference (the definition) but near-linear:
    each prefix reuses the annotation of the whole document except for its last sentence
    (or last few sentences while punkt's decision is still open), whose words are
    re-tokenized from a few words back and whose tags are recomputed from the first word
    whose tagger input differs, continuing the greedy taggers from the full tags."""
    ids = np.asarray(ids, dtype=np.int64)
    names = [n + '_causal' for n in stream_names(ner, ('full',)) if n != 'word']
    out = {k: np.full(len(ids), PAD, dtype=np.uint16) for k in names}
    for a, b in split_documents(ids):
        for k, v in _causal_doc(ids[a:b], ner, reference).items():
            out[k + '_causal'][a:b] = v
    return out

# ---- greedy continuation of the taggers (the causal path's only use of the models) ----
# Both taggers are greedy left to right, so tagging can resume mid-sentence from the tags
# already chosen. reference=True: NLTK's own models, one word at a time; else the fast
# taggers, all jobs of a call batched (same outputs; tests/test_metadata_causal.py).

@lru_cache(maxsize=None)
def _nltk_pos_model():
    return _pos_tagger(True)  # NLTK's PerceptronTagger, loaded once

def _nltk_ne_model(ner):
    return _ne_chunker(ner, True)._tagger  # the NLTK chunker's greedy raw-label tagger

def pos_tag_resume(jobs, reference=False):
    """jobs: (words, start, prev, stop) -> the tags of words[start:stop] of
    pos_tag_sents([words])[0], given prev = the tags of words[start-2:start] (the
    perceptron sees words i-2..i+2 and the two previous tags only)."""
    if not reference:
        return _pos_tagger(False).tag_resume(jobs)
    tg = _nltk_pos_model()
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
    tagger = _nltk_ne_model(ner)
    out = []
    for tokens, start, history, stop in jobs:
        hist = list(history)
        for i in range(start, stop):
            hist.append(tagger.tag_one(tokens, i, hist))
        out.append(hist[start:stop])
    return out

def _iob(raw, prev):
    """Final IOB tag of a word from its raw NE tag and the previous word's (None at start):
    NEChunkParser turns an I-X that does not continue an X chunk into B-X."""
    if raw.startswith('I-') and not (prev is not None and prev[:2] in ('B-', 'I-') and prev[2:] == raw[2:]):
        return 'B-' + raw[2:]
    return raw

@_memo(1 << 18)
def _word_spans_memo(key):
    sp, f = _word_spans_checked(*key)
    return tuple(sp), f

def _word_spans_cached(chunk, reference=True):
    return _word_spans_memo((chunk, reference))

# str.isspace of every code point up to U+3000 (the last space character), False after it
_SPACE_TABLE = np.array([chr(i).isspace() for i in range(0x3001)] + [False], dtype=bool)

class _LazyJobs:
    """jobs[k] built on demand (the taggers read a job only to settle a near-tie)."""
    def __init__(self, make):
        self.make = make

    def __getitem__(self, k):
        return self.make(k)

def _causal_simple_tags(text, tok, q, comp, A, c, j, wfirst, words, pos, raw, ner):
    """Causal tags of the simple tokens, all at once (arrays over them): the prefix of token
    tok holds the words 0..q-1 of sentence j unchanged plus text[A:c] as its word q (complete
    when comp: then it is the full text's word q). Same result as the general path (tests).
    POS: words i0..q are retagged (i0 = q-1 if complete else q-2; none at the sentence's last
    word) with -END- after q; NE: from the first word whose tagger input changed. Each job is
    a fixed-width window of the flat layouts the fast taggers score."""
    tg = _pos_tagger(False)
    if tg.n_words > tg.max_cache:
        tg._reset_cache()
    n = len(tok)
    wflat = [w for ws in words for w in ws]
    pflat = [t for ts in pos for t in ts]
    base = wfirst[j]                                     # flat index of the sentence's word 0
    gq = base + q
    nwj = wfirst[j + 1] - base
    tidx = tg.tag_idx
    ptag = np.fromiter((tidx[t] for t in pflat), dtype=np.int64, count=len(pflat))
    wid = tg.ids(wflat)
    # word q: the full word when complete, else the cut text
    lid = wid[np.minimum(gq, max(len(wid) - 1, 0))].copy()
    cut = np.nonzero(~comp)[0]
    cut_words = [text[a:b] for a, b in zip(A[cut].tolist(), c[cut].tolist())]
    if len(cut):
        lid[cut] = tg.ids(cut_words)
    i0 = np.where(comp & (q == nwj - 1), q + 1, np.maximum(0, q + comp - 2))
    need = np.nonzero(i0 <= q)[0]
    # POS window: x = q-4 .. q+2 (7 slots) of the prefix sentence
    X = q[need, None] - 4 + np.arange(7)[None, :]
    qn = q[need, None]
    ids7 = np.where(X == qn, lid[need, None],
           np.where(X == qn + 1, 2, np.where(X == qn + 2, 3,
           np.where(X >= 0, wid[np.clip(base[need, None] + X, 0, max(len(wid) - 1, 0))],
           np.where(X == -1, 1, 0)))))
    i0n = i0[need]
    starts = np.arange(len(need)) * 7 + 4 - (q[need] - i0n)
    lens = q[need] - i0n + 1
    t_s0, t_s1 = tidx[tg.tagger.START[0]], tidx[tg.tagger.START[1]]
    def hist(x):   # full tag of word x of the sentence (START tags before word 0)
        return np.where(x >= 0, ptag[np.clip(base[need] + x, 0, max(len(ptag) - 1, 0))],
                        np.where(x == -1, t_s0, t_s1))
    h1, h2 = hist(i0n - 1), hist(i0n - 2)

    def pos_job(k):
        r = int(need[k])
        jj, qq = int(j[r]), int(q[r])
        last = words[jj][qq] if comp[r] else text[int(A[r]):int(c[r])]
        return (words[jj][:qq] + [last], int(i0[r]))
    tags, _, _ = tg._score(ids7.reshape(-1), starts, lens, h1.tolist(), h2.tolist(), _LazyJobs(pos_job))
    # new tags of words i0..q (-1 where not retagged), full tags elsewhere
    newt = np.full((n, 3), -1, dtype=np.int64)          # words q-2, q-1, q
    for s_ in range(3):
        x = q[need] - 2 + s_                               # sentence index of this column
        ok = x >= i0n
        newt[need[ok], s_] = tags[(np.arange(len(need)) * 7 + 2 + s_)[ok]]
    qtag = np.where(newt[:, 2] >= 0, newt[:, 2], ptag[np.minimum(gq, max(len(ptag) - 1, 0))])
    pos_ids = _pos_id_of_tag(tg)[qtag]
    if ner == 'none':
        return pos_ids, None

    ch = _ne_chunker(ner, False)
    if ch.n_tok > ch.max_cache:
        ch._reset_cache()
    # first word whose NE input changed: its pos (retagged and different) or word q cut
    f = i0.copy()
    fulls = lambda x: ptag[np.clip(base + x, 0, max(len(ptag) - 1, 0))]
    for s_ in range(3):
        x = q - 2 + s_
        col = newt[:, s_]
        same = (col < 0) | (col == fulls(x))
        if s_ == 2:
            same &= comp
        # f advances over x only while every retagged word so far kept its tag
        f = np.where((f == x) & (x >= i0) & same, x + 1, f)
    done = (f == q + 1) & (q == nwj - 1)                  # every input the tagger reads unchanged
    j0 = np.maximum(0, f - 1)
    jcut = np.minimum(j0, q + 1)
    nj = np.nonzero(~done & (j0 <= q))[0]
    lidx = ch.label_idx
    rflat = [lab for rs in raw for lab in rs]
    rlab = np.fromiter((lidx[x] for x in rflat), dtype=np.int64, count=len(rflat))
    nid = ch.ids(list(zip(wflat, pflat)))
    # NE window: x = q-4 .. q (5 slots); slots x >= i0 carry the new POS (and word q its cut text)
    Xn = q[nj, None] - 4 + np.arange(5)[None, :]
    gx = np.clip(base[nj, None] + Xn, 0, max(len(nid) - 1, 0))
    ids5 = nid[gx].copy()
    tags_obj = tg.tags_obj
    for s_ in range(3):
        col = newt[nj, s_]
        xs = q[nj] - 2 + s_
        # slots whose (word, pos) differs from the full text's: new tag, or the cut word q
        full_x = ptag[np.clip(base[nj] + xs, 0, max(len(ptag) - 1, 0))]
        chg = (col >= 0) & ((col != full_x) | ((s_ == 2) & ~comp[nj]))
        rows = np.nonzero(chg)[0]
        if len(rows):
            r_all = nj[rows]
            wlist = [words[jj][xx] if (s_ < 2 or comp[rr]) else text[aa:cc]
                     for rr, jj, xx, aa, cc in zip(r_all.tolist(), j[r_all].tolist(), xs[rows].tolist(),
                                                   A[r_all].tolist(), c[r_all].tolist())]
            ids5[rows, 2 + s_] = ch.ids(list(zip(wlist, tags_obj[col[rows]].tolist())))
    j0n = j0[nj]
    startsn = np.arange(len(nj)) * 5 + 4 - (q[nj] - j0n)
    lensn = q[nj] - j0n + 1
    fpos = startsn[j0n == 0]
    lpos = np.arange(len(nj)) * 5 + 4
    hp = np.nonzero(j0n > 0)[0]
    hpos = startsn[hp] - 1
    hlab = rlab[base[nj][hp] + j0n[hp] - 1]

    def ne_job(k):
        r = int(nj[k])
        jj, qq = int(j[r]), int(q[r])
        ws = words[jj][:qq] + [words[jj][qq] if comp[r] else text[int(A[r]):int(c[r])]]
        ps = list(pos[jj][:qq + 1])
        for s_ in range(3):
            if newt[r, s_] >= 0:
                ps[qq - 2 + s_] = tg.tags[newt[r, s_]]
        return (list(zip(ws, ps)), int(j0[r]), raw[jj][:int(j0[r])])
    labs, _, _ = ch._score(ids5.reshape(-1), startsn, lensn, j0n, fpos.tolist(), lpos.tolist(),
                           hpos.tolist(), hlab.tolist(), _LazyJobs(ne_job))
    # raw labels of words q-1 and q: recomputed from jcut on, else the full text's
    newl = np.full((n, 2), -1, dtype=np.int64)
    for s_ in range(2):
        x = q[nj] - 1 + s_
        ok = x >= j0n
        newl[nj[ok], s_] = labs[(np.arange(len(nj)) * 5 + 3 + s_)[ok]]
    fullr = lambda x: rlab[np.clip(base + x, 0, max(len(rlab) - 1, 0))]
    r_q = np.where((q >= jcut) & (newl[:, 1] >= 0), newl[:, 1], fullr(q))
    r_p = np.where((q - 1 >= jcut) & (newl[:, 0] >= 0), newl[:, 0], fullr(q - 1))
    return pos_ids, _iob_id_table(ch, ner)[np.where(q > 0, r_p, len(ch.labels)), r_q]

@lru_cache(maxsize=None)
def _pos_id_of_tag(tg):
    # tag index of the fast POS tagger -> POS stream id
    return np.array([POS_ID.get(t, UNK) for t in tg.tags], dtype=np.uint16)

@lru_cache(maxsize=None)
def _iob_id_table(ch, ner):
    # [previous raw label index (len(labels): none), raw label index] -> NER stream id
    ner_id = {tg: i for i, tg in enumerate(stream_tags('ner', ner))}
    L = len(ch.labels)
    tab = np.zeros((L + 1, L), dtype=np.uint16)   # [previous raw label (L = none), raw label]
    for a in range(L + 1):
        for b in range(L):
            tab[a, b] = ner_id[_iob(ch.labels[b], ch.labels[a] if a < L else None)]
    return tab

_CAUSAL_SIMPLE_TOKENS = True  # False: every token takes the general path (tests compare the two)
_CAUSAL_STATS = {'tokens': 0, 'simple': 0}  # of the last _causal_doc call

def _causal_doc(ids, ner, reference):
    import re
    import bisect
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    text, escaped = decode_text(ids)
    if escaped is None:
        cob = _char_of_byte(text)
    else:
        nbc = [1 if '\udc80' <= ch <= '\udcff' else len(ch.encode('utf-8')) for ch in escaped]
        cob = np.repeat(np.arange(len(nbc)), nbc)
    L = len(text)
    cstart = np.searchsorted(cob, np.arange(L + 1))          # byte start of each char (+ end)
    blen = _token_bytes_len()[ids]
    bend = np.cumsum(blen)
    cend = cstart[1:]
    C = np.searchsorted(cend, bend, side='right')            # complete chars in each prefix
    M = bend - cstart[C]                                      # bytes of a cut char (-> U+FFFD each)
    bs = bend - blen
    CS = np.where(bs < cstart[C], cob[np.minimum(bs, max(len(cob) - 1, 0))] if len(cob) else 0,
                  C + (bs - cstart[C]))
    CE = C + M

    # ---- the whole document, per sentence
    sents, spans, fb, words, pos, raw = _doc_analysis(text, ner, reference)
    use_ner = ner != 'none'
    if use_ner:
        ner_id = {tg: i for i, tg in enumerate(stream_tags('ner', ner))}
    start_of = {s: j for j, (s, _) in enumerate(sents)}
    sstarts = np.array([s for s, _ in sents], dtype=np.int64)
    # flat words of the document (for tokens that reach back into settled sentences)
    wsent = np.array([j for j, sp in enumerate(spans) for _ in sp], dtype=np.int64)
    wstart = np.array([sents[j][0] + a for j, sp in enumerate(spans) for a, _ in sp], dtype=np.int64)
    wend = np.array([sents[j][0] + b for j, sp in enumerate(spans) for _, b in sp], dtype=np.int64)
    wfirst = np.cumsum([0] + [len(sp) for sp in spans])

    # ---- punkt: when is the decision at a sentence-ending character final in a prefix?
    # it reads the character's word, the next word and the whitespace after it (and the
    # closing quotes realigned after it); settled = the prefix holds all of that plus the
    # next non-space character: settle(p) = end of (word, spaces, word, spaces) + 1.
    cp = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)  # code points
    isws = _SPACE_TABLE[np.minimum(cp, len(_SPACE_TABLE) - 1)]                     # str.isspace
    ws_idx = np.nonzero(isws)[0]
    nws_idx = np.nonzero(~isws)[0]
    def nxt(idx, x):   # first index >= x in idx, else L
        if not len(idx):
            return np.full_like(x, L)
        k = np.searchsorted(idx, x)
        return np.where(k < len(idx), idx[np.minimum(k, len(idx) - 1)], L)
    P = np.array([m.start() for m in re.finditer(r'[.?!]', text)], dtype=np.int64)
    settle = nxt(nws_idx, nxt(ws_idx, nxt(nws_idx, nxt(ws_idx, P)))) + 1
    settle = np.where(settle > L, L + 2, settle)                     # never settled inside T
    settle = np.maximum.accumulate(settle) if len(settle) else settle
    # the character before each sentence start that created it (-1: first sentence)
    kP = np.searchsorted(P, sstarts) - 1
    creator = np.where(kP >= 0, P[np.maximum(kP, 0)] if len(P) else -1, -1)
    lastnws = np.full(L + 1, 0, dtype=np.int64)                     # len(text[:c].rstrip())
    if L:
        lastnws[1:] = np.maximum.accumulate(np.where(~isws, np.arange(1, L + 1), 0))

    pos_out = np.full(n, SPACE, dtype=np.uint16)
    ner_out = np.full(n, SPACE, dtype=np.uint16) if use_ner else None

    # per-token searches, vectorised: open punkt decisions and the sentence of each prefix end
    LO_U = np.searchsorted(settle, C, side='right').tolist()
    HI_U = np.searchsorted(P, C, side='left').tolist()
    JC = (np.searchsorted(creator, C, side='left') - 1).tolist() if len(sents) else [-1] * n
    # last ' ', '\n', '\r' or '\t' at or before each character (-1: none)
    issep = (cp == 32) | (cp == 10) | (cp == 13) | (cp == 9)
    sepprev = np.maximum.accumulate(np.where(issep, np.arange(L), -1)).tolist() if L else []
    rstarts = [[x for x, _ in sp] for sp in spans]
    sstarts_l, wfirst_l = sstarts.tolist(), wfirst.tolist()
    wstart_l, wend_l = wstart.tolist(), wend.tolist()
    lastnws_l = lastnws.tolist()
    Cl, Ml, CSl, CEl = C.tolist(), M.tolist(), CS.tolist(), CE.tolist()
    nsent = len(sents)
    P_l = P.tolist()
    # re-segmentation may start at sentence j only if whitespace lies between its start and
    # the first [.?!] at or after it (p2 = L if none)
    k2a = np.searchsorted(P, sstarts)
    p2a = np.where(k2a < len(P), P[np.minimum(k2a, len(P) - 1)], L) if len(P) else np.full(len(sstarts), L)
    brk = (nxt(ws_idx, sstarts) < p2a).tolist()
    # a token of whitespace only (and no cut character) overlaps no word of any prefix: <space>
    wscum = np.zeros(L + 1, dtype=np.int64)
    if L:
        wscum[1:] = np.cumsum(isws)
    allws_a = (M == 0) & (CE > CS) & (wscum[np.minimum(CE, L)] - wscum[np.minimum(CS, L)] == CE - CS)
    allws = allws_a.tolist()

    # ---- simple tokens (most of them), decided for all tokens at once: no open punkt
    # decision, and the prefix ends inside or at the end of word q > 0 of its sentence j, where
    # word q starts a whitespace-separated chunk and the text from its start to the prefix end
    # is ASCII letters only. That text is then one word of the prefix whatever follows
    # (FastWordSpans; the letter-only contractions go the general way), words before q are
    # unchanged, and the token's word is q: the general steps below reduce to a few lines.
    fast = np.zeros(n, dtype=bool)
    fq = fA = np.zeros(n, dtype=np.int64)
    if nsent and L and n and _CAUSAL_SIMPLE_TOKENS:
        jv = np.maximum(np.searchsorted(creator, C, side='left') - 1, 0)
        sepv = np.maximum.accumulate(np.where(issep, np.arange(L), -1))
        cut = sepv[np.minimum(np.minimum(CS, C), L - 1)]
        g = np.searchsorted(wstart, cut + 1)                  # first word starting after the cut
        nwj = wfirst[jv + 1] - wfirst[jv]                     # words of sentence j
        ql = g - wfirst[jv]
        gg = np.minimum(g, max(len(wstart) - 1, 0))
        A = wstart[gg] if len(wstart) else np.zeros(n, np.int64)
        E = wend[gg] if len(wstart) else np.zeros(n, np.int64)
        asc = ((cp >= 65) & (cp <= 90)) | ((cp >= 97) & (cp <= 122))
        acum = np.zeros(L + 1, dtype=np.int64)
        acum[1:] = np.cumsum(asc)
        fbv = np.asarray(fb, dtype=bool)[jv]
        base = ((M == 0) & (CE > CS) & ~allws_a & (np.asarray(LO_U) >= np.asarray(HI_U)) & ~fbv
                & (cut >= sstarts[jv]) & (ql > 0) & (ql < nwj) & (A < C) & isws[np.maximum(A - 1, 0)])
        fast = base & (C <= E) & (acum[np.minimum(C, L)] - acum[np.minimum(A, L)] == C - A)
        # second kind: the prefix ends exactly at the end of word k (>= q) of sentence j, the
        # token overlaps word k only, and the chunk from word q re-tokenized as the text's end
        # gives words q..k again (checked per token below): the prefix's words are words 0..k
        ke = np.minimum(np.searchsorted(wend, C), max(len(wend) - 1, 0))
        kl = ke - wfirst[jv]
        fast2 = (base & ~fast & (wend[ke] == C) & (kl >= ql) & (kl < nwj)
                 & (CS >= wend[np.maximum(ke - 1, 0)]))
        fq, fA = np.where(fast2, kl, ql), np.where(fast2, wstart[ke], A)
        fA0 = A.tolist()
        fast = np.where(fast2, 2, fast.astype(np.int64))
        fj_l = jv.tolist()
    fq_l, fA_l = fq.tolist(), fA.tolist()
    wend_full_l = wend.tolist()

    # the simple tokens, final: letter-only contractions go the general way; the second kind
    # holds when the chunk re-tokenized as the text's end gives the full text's words
    simple = fast > 0
    for t in np.nonzero((fast == 1) & np.isin(C - fA, (5, 6)))[0].tolist():
        if text[fA_l[t]:Cl[t]].lower() in FastWordSpans.LETTER_SPLITS:
            simple[t] = False
    for t in np.nonzero(fast == 2)[0].tolist():
        A0, c = fA0[t], Cl[t]
        sp, f = _word_spans_cached(text[A0:c], reference)
        g0 = wfirst_l[fj_l[t]] + fq_l[t] - len(sp) + 1   # flat index of word q
        simple[t] = bool(sp and not f and 0 <= g0 and wstart_l[g0] == A0
                         and all(x == wstart_l[g0 + i] - A0 and y == wend_l[g0 + i] - A0
                                 for i, (x, y) in enumerate(sp)))
    _CAUSAL_STATS.update(tokens=n, simple=int(simple.sum()))
    # fast taggers: all simple tokens at once after the loop; the loop takes the others
    simple_all = np.nonzero(simple)[0] if not reference else np.zeros(0, dtype=np.int64)
    todo = np.nonzero(~simple)[0] if not reference else np.arange(n)
    simple_l = simple.tolist()
    for b_lo in range(0, len(todo), 8192):   # blocks of tokens bound the memory of long documents
        # ---- phase 1: sentences and words of every prefix near its end
        recs = []
        frecs = []   # the simple tokens: [t, j, q, o, i0, complete, words, tags from o]
        for t in todo[b_lo:b_lo + 8192].tolist():
            if simple_l[t]:
                frecs.append(t)
                continue
            c, m, cs, ce = Cl[t], Ml[t], CSl[t], CEl[t]
            if ce <= cs or allws[t]:
                continue
            lo_u, hi_u = LO_U[t], HI_U[t]
            if lo_u < hi_u:                      # an open punkt decision: re-segment from a settled start
                jw = bisect.bisect_right(sstarts_l, P_l[lo_u]) - 1
                while jw > 0 and not brk[jw]:
                    jw -= 1
                jw = max(jw, 0)
                W = sstarts_l[jw] if nsent else 0
                ptext = text[W:c] + '\ufffd' * m
                new = [(W + a, W + b) for a, b in _sentence_tokenizer().span_tokenize(ptext)]
                jfirst = jw
            else:
                j = max(JC[t], 0)
                s0 = sstarts_l[j] if nsent else 0
                e0 = c + m if m else lastnws_l[c]
                new = [(s0, e0)] if e0 > s0 else []
                jfirst = j
            cands = []   # (word start, word end, kind, data)
            # settled sentences' words that the token reaches
            if jfirst > 0:
                lim = wfirst_l[jfirst]
                for w in range(bisect.bisect_right(wend_l, cs, 0, lim), lim):
                    if wstart_l[w] < ce:
                        cands.append((wstart_l[w], wend_l[w], 'old', w))
            for s, e in new:
                if e <= cs or s >= ce:
                    continue
                S = text[s:min(e, c)] + '\ufffd' * max(0, e - c)
                j = start_of.get(s)
                # the prefix sentence's words: sp = ref[:q] + tail (q = 0: all re-tokenized)
                q, tail = 0, None
                ref = spans[j] if j is not None else []
                if j is not None and not fb[j] and ref:
                    # re-tokenize from the whitespace-delimited chunk holding the token's start:
                    # the Treebank rules act within a chunk (plus the sentence's first/last chars)
                    cut = sepprev[min(cs, c, L - 1)]
                    q = bisect.bisect_left(rstarts[j], cut + 1 - s) if cut >= s else 0
                    q = min(q, len(ref) - 1)
                    while q > 0 and not text[s + ref[q][0] - 1].isspace():
                        q -= 1
                    if q > 0 and s + ref[q][0] < c:
                        a = ref[q][0]
                        wsp, f = _word_spans_cached(S[a:], reference)
                        if not f and wsp:
                            tail = [(a + x, a + y) for x, y in wsp]
                    if tail is None:
                        q = 0
                if tail is None:
                    tail, _ = _word_spans_checked(S, reference)
                # words ref[:q] end at or before the cut <= the token start: no overlap, unchanged
                rel_cs, rel_ce = cs - s, ce - s
                lo = hi = -1
                for i, (x, y) in enumerate(tail):
                    if x >= rel_ce:
                        break
                    if y > rel_cs:
                        if lo < 0:
                            lo = i
                        hi = i
                if lo < 0:
                    continue
                lo, hi = lo + q, hi + q
                nw = q + len(tail)
                lim = min(nw, len(ref))
                meq = q
                while meq < lim and tail[meq - q] == ref[meq] and s + tail[meq - q][1] <= c:
                    meq += 1
                stop = min(hi + 2, nw)
                same = meq == nw == len(ref)
                i0 = min(stop if same else max(0, meq - 2), stop)
                # only the words from o on are read (the taggers resume at index >= 2 past o)
                o = max(0, min(lo, i0 - 3))
                spo = (ref[o:q] + tail) if o < q else tail[o - q:]
                cands.append((s + spo[lo - o][0], s + spo[hi - o][1], 'new',
                              dict(j=j, spo=spo, o=o, wl=[S[x:y] for x, y in spo], lo=lo, hi=hi,
                                   stop=stop, i0=i0, s=s, c=c, nw=nw)))
            recs.append((t, cs, ce, cands))

        # ---- phase 2: POS of the changed words, all prefixes in one batch
        pjobs, pref = [], []
        fjobs, fref = [], []
        for k, t in enumerate(frecs):
            j, q, A, c = fj_l[t], fq_l[t], fA_l[t], Cl[t]
            comp = c == wend_full_l[wfirst_l[j] + q]            # the word is complete
            rp = pos[j]
            stop = q + 1
            i0 = stop if (comp and q == len(rp) - 1) else max(0, q + comp - 2)
            o = max(0, min(q, i0 - 3))
            wl = words[j][o:q]
            wl.append(text[A:c])
            frecs[k] = rec = [t, j, q, o, i0, comp, wl, rp[o:i0]]
            if i0 < stop:
                fjobs.append((wl, i0 - o, rp[max(0, i0 - 2):i0], stop - o))
                fref.append(rec)
        for t, cs, ce, cands in recs:
            for cd in cands:
                if cd[2] != 'new':
                    continue
                d = cd[3]
                rp = pos[d['j']] if d['j'] is not None else []
                i0, o = d['i0'], d['o']
                d['pos'] = rp[o:i0]            # tags of words o.. (ref tags before i0)
                if i0 < d['stop']:
                    pjobs.append((d['wl'], i0 - o, rp[max(0, i0 - 2):i0], d['stop'] - o))
                    pref.append(d)
        res = pos_tag_resume(fjobs + pjobs, reference)
        for rec, tags in zip(fref, res):
            rec[7] = rec[7] + tags
        for d, tags in zip(pref, res[len(fjobs):]):
            d['pos'] = d['pos'] + tags

        # ---- phase 3: NE raw tags of the changed words
        if use_ner:
            njobs, nref = [], []
            for t, cs, ce, cands in recs:
                for cd in cands:
                    if cd[2] != 'new':
                        continue
                    d = cd[3]
                    j, spo, stop, hi, o, nw = d['j'], d['spo'], d['stop'], d['hi'], d['o'], d['nw']
                    ref = spans[j] if j is not None else []
                    rp = pos[j] if j is not None else []
                    pw = d['pos']
                    lim = min(nw, len(ref), stop)
                    # words before i0 are unchanged, end in the prefix and keep their tags
                    f = d['i0']
                    while (f < lim and spo[f - o] == ref[f] and d['s'] + spo[f - o][1] <= d['c']
                           and pw[f - o] == rp[f]):
                        f += 1
                    if f == lim and lim == stop and (stop < nw or len(ref) == nw):
                        f = 1 << 62                  # every item the NE tagger reads is unchanged
                    j0 = max(0, f - 1)
                    rr = raw[j] if j is not None else []
                    d['jcut'] = jc = min(j0, hi + 1)
                    d['rr'] = rr
                    d['raw'] = []
                    if j0 <= hi:
                        # tokens from o2 on (the job still starts at index >= 2 past o2, or o2 = 0)
                        o2 = max(o, j0 - 2)
                        wl = d['wl'][o2 - o:]
                        pw2 = pw[o2 - o:]
                        if len(pw2) < len(wl):
                            pw2 = pw2 + ['NN'] * (len(wl) - len(pw2))
                        njobs.append((list(zip(wl, pw2)), j0 - o2, rr[o2:j0], hi + 1 - o2))
                        nref.append(d)
            fnjobs, fnref = [], []
            for rec in frecs:
                t, j, q, o, i0, comp, wl, pw = rec
                rp = pos[j]
                # the first word whose NE tagger input changed (its POS, or the word itself)
                f = i0
                while f < q and pw[f - o] == rp[f]:
                    f += 1
                if f == q and comp and pw[q - o] == rp[q]:
                    f = q + 1
                    if q == len(rp) - 1:
                        f = 1 << 62
                j0 = max(0, f - 1)
                rec.append(min(j0, q + 1))   # rec[8]: raw labels before this index are the full ones
                rec.append(None)             # rec[9]: the recomputed raw labels from rec[8] on
                if j0 <= q:
                    o2 = max(o, j0 - 2)
                    fnjobs.append((list(zip(wl[o2 - o:], pw[o2 - o:])), j0 - o2, raw[j][o2:j0], q + 1 - o2))
                    fnref.append(rec)
            res = ner_raw_resume(fnjobs + njobs, ner, reference)
            for rec, tags in zip(fnref, res):
                rec[9] = tags
            for d, tags in zip(nref, res[len(fnjobs):]):
                d['raw'] = tags

        # ---- phase 4 for the simple tokens: the token's word is q
        for rec in frecs:
            t, j, q, o, pw = rec[0], rec[1], rec[2], rec[3], rec[7]
            pos_out[t] = POS_ID[pw[q - o]]
            if use_ner:
                jc, rw, rr = rec[8], rec[9], raw[j]
                r = rr[q] if q < jc else rw[q - jc]
                rprev = rr[q - 1] if q - 1 < jc else rw[q - 1 - jc]
                ner_out[t] = ner_id[_iob(r, rprev)]

        # ---- phase 4: align the last token by overlap
        for t, cs, ce, cands in recs:
            best, bov = None, 0
            for cd in cands:
                if cd[2] == 'old':
                    ov = min(cd[1], ce) - max(cd[0], cs)
                    if ov > bov:
                        best, bov = ('old', cd[3]), ov
                else:
                    d = cd[3]
                    o, spo, s = d['o'], d['spo'], d['s']
                    for i in range(d['lo'], d['hi'] + 1):
                        x, y = spo[i - o]
                        ov = min(s + y, ce) - max(s + x, cs)
                        if ov > bov:
                            best, bov = ('new', d, i), ov
            if best is None:
                continue
            if best[0] == 'old':
                w = best[1]
                j = int(wsent[w]); i = w - wfirst_l[j]
                pos_out[t] = POS_ID[pos[j][i]]
                if use_ner:
                    ner_out[t] = ner_id[_iob(raw[j][i], raw[j][i - 1] if i else None)]
            else:
                d, i = best[1], best[2]
                pos_out[t] = POS_ID[d['pos'][i - d['o']]]
                if use_ner:
                    jc, rr, rw = d['jcut'], d['rr'], d['raw']
                    r = rr[i] if i < jc else rw[i - jc]
                    rprev = None if i == 0 else (rr[i - 1] if i - 1 < jc else rw[i - 1 - jc])
                    ner_out[t] = ner_id[_iob(r, rprev)]
    if len(simple_all):
        tk = simple_all
        jj, qq = jv[tk], fq[tk]
        comp = C[tk] == wend[wfirst[jj] + qq]
        p_ids, n_ids = _causal_simple_tags(text, tk, qq, comp, fA[tk], C[tk], jj, wfirst, words, pos, raw, ner)
        pos_out[tk] = p_ids
        if use_ner:
            ner_out[tk] = n_ids
    res = {'pos': pos_out}
    if use_ner:
        res['ner'] = ner_out
    return res

class CausalStream:
    """Online causal metadata for a growing token stream (generation): extend(new_ids) returns
    the causal tags of the new tokens, equal to annotate_causal of the whole stream, without
    re-annotating the whole document per token.

    The taggers work sentence by sentence and punkt decides each sentence break from the words
    around it only, so once a break is settled (text after it exists: a full sentence follows)
    nothing before it can change the tags after it. The stream keeps a window that starts at
    such a break, at a token boundary, and annotates only the window: the start of the
    second-to-last sentence of the current window, so the window stays about two sentences
    long. Tags: {'pos': uint16 array, 'ner': ... (unless ner='none')}, ids of stream_tags."""

    def __init__(self, ner='binary', reference=False):
        self.ner, self.reference = ner, reference
        self.keys = [n for n in stream_names(ner, ('full',)) if n != 'word']
        self.doc = []   # token ids of the current document (since the last <|endoftext|>)
        self.w = 0      # window start: index into doc at a settled sentence break

    def extend(self, new_ids):
        new_ids = [int(i) for i in new_ids]
        out = {k: np.full(len(new_ids), PAD, dtype=np.uint16) for k in self.keys}
        eot = encoding().eot_token
        i = 0
        while i < len(new_ids):
            if new_ids[i] == eot:   # <pad> tags; a new document starts after it
                self.doc, self.w = [], 0
                i += 1
                continue
            j = i
            while j < len(new_ids) and new_ids[j] != eot:
                j += 1
            self.doc.extend(new_ids[i:j])
            n = j - i
            win = np.array(self.doc[self.w:], dtype=np.int64)
            if n == 1:   # one token: the definition directly, full tags of the window's last token
                tags = _annotate_doc_ids(win, self.ner, self.reference)
            else:        # many (a prompt): the near-linear causal path over the window
                tags = _causal_doc(win, self.ner, self.reference)
            for k in self.keys:
                out[k][i:j] = tags[k][len(win) - n:]
            self._advance()
            i = j
        return out

    def _advance(self):
        """Move the window start to the second-to-last sentence start, if a token starts there."""
        win = np.array(self.doc[self.w:], dtype=np.int64)
        if len(win) < 2:
            return
        text, cs, ce = _char_offsets_any(win)
        sents = list(_sentence_tokenizer().span_tokenize(text))
        if len(sents) < 3:
            return
        prev_end, start = sents[-3][1], sents[-2][0]
        # the first token after the end of the sentence before; it must not reach into that
        # sentence, start inside the new one, or begin with a UTF-8 continuation byte
        k = int(np.searchsorted(cs, prev_end, side='left'))
        if k == 0 or k >= len(win) or cs[k] > start or ce[k - 1] > prev_end:
            return
        data = encoding().decode_bytes(win[:k + 1].tolist())
        first = data[len(encoding().decode_bytes(win[:k].tolist()))] if len(data) else 0
        if (first & 0xC0) == 0x80:
            return
        self.w += k

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
            if len(ids) and (ids.min() < 0 or ids.max() >= encoding().n_vocab):
                raise MetadataError(f'{name}: token id out of range 0..{encoding().n_vocab - 1}')
            streams = annotate_ids(ids, args.ner, args.tags, args.reference)
        else:
            ids, streams = annotate_text(data, args.tokenization, args.ner, args.reference)
            if args.tags == 'causal':
                streams = annotate_ids(ids, args.ner, 'causal', args.reference)
        streams = {k.replace('_causal', ''): v for k, v in streams.items()}
    except MetadataError as e:
        print(f'metadata.py: error: {e}', file=sys.stderr)
        return 1
    enc = encoding()
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
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
