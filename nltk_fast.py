"""
Exact re-implementations of the NLTK models LIME uses, fast: the averaged-perceptron POS tagger
(FastPOSTagger), the maxent NE chunker (FastNEChunker), the Treebank word-span tokenizer
(FastWordSpans) and a memo for punkt's sentence-break decision (punkt_memo); and the facts about
NLTK that metadata.py's causal code relies on (the models' windows below; the last section:
long runs without whitespace, with the checks that they hold for the installed NLTK).

The contract: each returns exactly what NLTK returns on the same input (the same tags, labels,
spans and sentence breaks; tests/test_metadata.py compares them on Gutenberg and Brown). The
taggers are built from tables(model): numpy arrays and JSON values computed from NLTK's model
(metadata.py keeps them in a disk cache, whose arrays are read-only), and NLTK's own
model, passed in as a function that loads it, is needed only where our floating-point sums
could order two scores differently from NLTK's (a gap below a tiny epsilon): that one token is
recomputed by NLTK's own code. Nothing here reads metadata.py. import_nltk imports the few NLTK
modules tagging needs and defers the rest of NLTK to its first use (and then loads it without the
scipy / scikit-learn parts LIME does not use); three small NLTK functions are copied here
(perceptron_normalize, ne_simplify_pos, the NE shape), used only where NLTK's source is the one
copied (source_hash), so tagging never imports nltk.tag or nltk.chunk.

How they are fast. Both taggers are greedy left to right and read only the one or two previous
tags, so we vectorise ACROSS words: everything that does not depend on earlier predictions is
computed up front per token (feature rows cached per word), then rounds over all words add the
history features until no tag changes (the same fixpoint as the left-to-right loop).
FastWordSpans tokenizes each whitespace-separated piece once (given the characters around it)
and caches it; punkt_memo caches punkt's decision per context string.

What the causal code in metadata.py relies on (the window widths of the models):
- POS_WINDOW = 2: the POS tag of word i reads words i-2 .. i+2 (START / END markers beyond the
  sentence) and the tags of words i-1 and i-2. So a word's tag changes only if a word within 2
  of it, or an earlier tag, changed; and a job resumed at index >= 2 reads only real words.
- NE_WINDOW = 1: the raw NE label of token i reads the (word, pos) tokens i-1 .. i+1 and the label
  of token i-1; NE_START = 2: it also reads whether i is 0, 1 or later, so a job resumed at
  index >= 2 reads as mid-sentence.
- The layout interface: ids(words) gives cache ids of words (tokens), and tag_windows /
  label_windows score many windows of such ids in one call, each window resuming the greedy
  tagger after given tags. Ids stay valid until the scoring call that uses them (the per-word
  caches are emptied after a call that leaves them over max_cache entries).
- FastWordSpans works within whitespace-separated pieces (see its docstring).
- punkt's decision at a candidate break is a pure function of its context string.
"""
import re
import sys
import bisect
from functools import lru_cache

import numpy as np

POS_WINDOW = 2   # POS tag i reads words i-2 .. i+2 and the tags of i-1, i-2
NE_WINDOW = 1    # raw NE label i reads tokens i-1 .. i+1 and the label of i-1
NE_START = 2     # ... and whether i is 0, 1 or more


# the NLTK modules LIME's fast path needs when it starts (resources, punkt, the word tokenizer,
# NLTK's ReDoS-guarded regex engine), and the modules whose code import_nltk defers: the packages
# above them, and the grammar and semantics modules nltk.data imports for its load() of grammars
STARTUP_MODULES = ('nltk.data', 'nltk.redos', 'nltk.tokenize.punkt', 'nltk.tokenize.destructive')
DEFERRED = ('nltk', 'nltk.tokenize', 'nltk.grammar', 'nltk.sem')


def import_nltk():
    """The nltk package, imported as cheaply as LIME can (a process that tags should be ready in a
    fraction of a second). Nothing is deferred or blocked when nltk is already imported.

    - nltk's __init__ imports nearly all of NLTK (~0.15 s: parsers, corpus readers, hundreds of
      regexes compiled through its ReDoS guard), and the fast path needs STARTUP_MODULES only. So
      the modules in DEFERRED are made with their code not run yet, and the startup modules
      imported into them. The first use of anything else (an attribute a deferred module lacks,
      such as nltk.pos_tag or nltk.__version__, or the import of any other NLTK module) first runs
      nltk's __init__ in the same module object, which imports the rest in the order a plain
      `import nltk` does (the modules already there are reused, as in any import): from then on
      nltk is the package a plain import gives, and nothing was loaded twice. The fast path
      imports only `from <startup module> import name` (an `import nltk...` statement or
      `from nltk import x` would finish the import; tests/test_metadata.py checks that tagging
      does not, and that NLTK is then the same as after a plain import).
    - While nltk's __init__ runs, scipy (for nltk.collocations -> nltk.metrics.association's
      Fisher test, and a few other statistics) and scikit-learn (nltk.classify.scikitlearn) are
      made unimportable (a None entry in sys.modules; NLTK catches the ImportError and defines its
      fallbacks), then the entries are removed, so a later `import scipy` works as usual. They
      cost about 1 s, and LIME uses neither; only what NLTK itself would have taken from them is
      missing in this process (the test checks that nothing else in NLTK differs)."""
    if 'nltk' in sys.modules:
        return sys.modules['nltk']
    import importlib
    import importlib.util
    specs = {}
    for name in DEFERRED:
        specs[name] = spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        parent, _, child = name.rpartition('.')
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        for name in STARTUP_MODULES:
            importlib.import_module(name)
    except BaseException:
        for name in [m for m in sys.modules if m == 'nltk' or m.startswith('nltk.')]:
            del sys.modules[name]
        raise
    _NLTKInit(specs).install()
    return sys.modules['nltk']


class _NLTKInit:
    """Runs the deferred modules' code on first use (see import_nltk), as a plain import would:
    nltk's __init__ first, and a deferred package's before any module inside it. Hooks: a module
    __getattr__ on each deferred module (PEP 562), and an import finder consulted for every NLTK
    module not imported yet."""

    def __init__(self, specs):
        self.specs, self.pending = specs, list(specs)   # 'nltk' first

    def install(self):
        for name in self.specs:
            sys.modules[name].__getattr__ = self._getattr(name)
        sys.meta_path.insert(0, self)

    def _getattr(self, name):
        def __getattr__(attr):
            self.run(name)
            return getattr(sys.modules[name], attr)
        return __getattr__

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith('nltk.'):
            return None
        self.run(fullname)
        if fullname in sys.modules:   # an __init__ just imported it: that module, not a second one
            import importlib.util
            return importlib.util.spec_from_loader(fullname, _Loaded())
        return None

    def run(self, name):
        """Run the deferred code that a plain import of `name` would have run by now."""
        for pkg in list(self.pending):
            if pkg in self.pending and (pkg == 'nltk' or name == pkg or name.startswith(pkg + '.')):
                self.pending.remove(pkg)
                if not self.pending:
                    sys.meta_path.remove(self)
                self._exec(pkg)

    def _exec(self, pkg):
        mod = sys.modules[pkg]
        del mod.__getattr__
        blocked = [m for m in ('scipy', 'sklearn') if m not in sys.modules]
        for m in blocked:
            sys.modules[m] = None
        try:
            self.specs[pkg].loader.exec_module(mod)
        finally:
            for m in blocked:
                if sys.modules.get(m, 0) is None:
                    del sys.modules[m]


class _Loaded:
    # the loader of a module that is already in sys.modules
    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module):
        pass


def nltk_version():
    """NLTK's version, read as its __init__ reads it (from the VERSION file beside it), without
    running that __init__."""
    import os
    nltk = import_nltk()
    try:
        with open(os.path.join(os.path.dirname(nltk.__spec__.origin), 'VERSION')) as f:
            return f.read().strip()
    except OSError:
        return nltk.__version__


def iob(raw, prev):
    """Final IOB tag of a word from its raw NE label and the previous word's (None at the start):
    NEChunkParser turns an I-X that does not continue an X chunk into B-X."""
    if raw.startswith('I-') and not (prev is not None and prev[:2] in ('B-', 'I-') and prev[2:] == raw[2:]):
        return 'B-' + raw[2:]
    return raw


class _OrthoContext(dict):
    """punkt's ortho_context table (a defaultdict(int)) without the side effect: looking up an
    unknown word type gives 0 but stores nothing (else every new type punkt reads is added, one
    entry per prefix on a long run)."""

    def __missing__(self, key):
        return 0


def punkt_tables(params):
    """punkt's parameters (PunktParameters) as JSON values, for a disk cache: NLTK reads its tab
    files line by line (~40 ms a process)."""
    return dict(abbrev_types=sorted(params.abbrev_types), sent_starters=sorted(params.sent_starters),
                collocations=sorted(map(list, params.collocations)),
                ortho_words=list(params.ortho_context), ortho_flags=list(params.ortho_context.values()))


def punkt_tokenizer(tables):
    """The sentence tokenizer of those parameters (what PunktTokenizer(lang) is, less the
    loading and saving of files)."""
    from collections import defaultdict
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    params = PunktParameters()
    params.abbrev_types, params.sent_starters = set(tables['abbrev_types']), set(tables['sent_starters'])
    params.collocations = set(map(tuple, tables['collocations']))
    params.ortho_context = defaultdict(int, zip(tables['ortho_words'], tables['ortho_flags']))
    return PunktSentenceTokenizer(params)


def punkt_memo(tok, maxsize=1 << 16):
    """Memoised tok.text_contains_sentbreak. A context 'word. Next' whose word is ASCII
    letters (2 or more) is looked up with the word replaced by a fixed one: punkt reads that
    word only through its type (lowercased), and only to ask whether it is an abbreviation,
    an initial, a number or the first half of a known collocation. So when it is none of
    these, any such word gives the same answer, and new words mostly hit the cache.
    Also swaps in _OrthoContext (the same answers, bounded memory)."""
    tok._params.ortho_context = _OrthoContext(tok._params.ortho_context)
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


# The sample text every fast tagger must tag exactly as NLTK's own model does, checked when its
# tables are built (metadata.py's _self_checked; this file is in the tables' cache key, so a new
# sample is checked at once): names of people, organisations, places, facilities; numbers, money, dates;
# quotes of every kind; abbreviations; odd capitals and punctuation.
SELF_CHECK_TEXT = """\
Mr. John Smith, the new C.E.O. of Acme Corp., flew from New York to Paris on Jan. 5, 2024. \
He met Dr. Maria Garcia-Lopez at the Louvre Museum and later at the U.S. Embassy. \
"We expect revenue of $3.5 billion, up 12% from last year," Smith said. \
Ms. O'Neill, a spokeswoman for the European Union, didn't comment; she's in Brussels until Friday. \
The Mississippi River floods every spring, and the Golden Gate Bridge was closed for 3 hours. \
'It was 'odd',' said Prof. Chen of MIT. ``Really odd.'' \
IBM, Microsoft and Apple Inc. reported earnings on Tuesday; Google's shares fell 4.2 percent. \
Mount Everest (8,849 m) lies between Nepal and China, east of the Himalayan town of Namche Bazaar. \
In 1999 the Red Cross and the United Nations sent 1,000,000 tonnes of food to Sudan. \
St. Petersburg, Fla., and St. Petersburg, Russia, are 9,000 km apart -- or so says the A.P. \
He read The Times, the Wall Street Journal and Le Monde before 7:30 a.m. every day. \
Queen Elizabeth II opened Heathrow Terminal 5 in London; President Obama visited Camp David. \
WHY DID THE FBI AND THE CIA MEET IN VIRGINIA? nobody at the pentagon knows. \
Sen. Bob Dole (R-Kan.) and Gov. Jerry Brown of California spoke at Stanford University. \
The Amazon, the Nile and the Yangtze are long; the Sahara Desert is dry. \
Call 555-0123 or write to P.O. Box 42, Springfield, IL 62704 by 5/1/2025! \
Toyota Motor Corp. and General Motors Co. build cars in Detroit, Mich., and Nagoya, Japan. \
Hello... world?! "Quoted," she said, 'single', \u201ccurly\u201d and \u2018curly\u2019 quotes. \
Jean-Paul Sartre wrote in French; Fyodor Dostoevsky wrote in Russian about St. Petersburg. \
The World Health Organization, NASA, and the Bank of England issued reports on 3.14159 and 2.71828.
"""


def check_arrays(t, spec):
    """Raise ValueError unless each array named in spec, name -> (dtype, shape, bound), is what
    tables() makes: that dtype, that shape (None: any length), and where bound is given, values
    in 0..bound-1 (rows of another array). A table file that parses but holds something else is
    then refused when it is loaded (metadata.py rebuilds it), not at the first tagging."""
    for name, (dtype, shape, bound) in spec.items():
        a = t[name]
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == len(shape)
                and all(n is None or n == m for n, m in zip(shape, a.shape))):
            raise ValueError(f"table {name}: not a {dtype} array of shape {shape}")
        if bound is not None and a.size and not (a.min() >= 0 and a.max() < bound):
            raise ValueError(f"table {name}: a row index out of range")


def source_hash(fn):
    """A short hash of a function's source: which NLTK code a copy here was checked against."""
    import hashlib
    import inspect
    import textwrap
    try:
        return hashlib.sha256(textwrap.dedent(inspect.getsource(fn)).encode()).hexdigest()[:16]
    except (OSError, TypeError):   # no source (a frozen or compiled install): not known
        return None


def perceptron_normalize(word):
    """NLTK's PerceptronTagger.normalize (3.10): the word as the tagger's features read it."""
    if "-" in word and word[0] != "-":
        return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
        return "!YEAR"
    if word and word[0].isdigit():
        return "!DIGITS"
    return word.lower()


def ne_simplify_pos(s):
    """nltk.chunk.named_entity.simplify_pos (3.10)."""
    if s.startswith("V"):
        return "V"
    else:
        return s.split("-")[0]


class FastPOSTagger:
    """Exact, vectorised equivalent of tagger.tag() for tagger = nltk.tag.PerceptronTagger().

    Built from tables(tagger) (plain arrays and lists, which metadata.py keeps in a disk cache);
    NLTK's own tagger is needed only to recompute a near-tie: load_tagger() is called then."""

    # NLTK 3.10's PerceptronTagger.normalize (source_hash), which perceptron_normalize copies
    KNOWN_NORMALIZE = {'6c3ea4e94af7145f'}
    # per-word cache columns (row ids into self.W; 0 is the all-zero row)
    TD, ISUF, IPREF, IWORD, M1WORD, M1SUF, M2WORD, P1WORD, P1SUF, P2WORD, TWID = range(11)

    @staticmethod
    def tables(tagger):
        """The model as numpy arrays and JSON values (what __init__ reads)."""
        model = tagger.model
        classes = sorted(model.classes)
        C = len(classes)
        # tag vocabulary for prev/prev2: classes first (so argmax index == tag
        # index), then the START markers and any tagdict-only tags
        tags = list(classes)
        for t in list(tagger.START) + sorted(set(tagger.tagdict.values())):
            if t not in tags:
                tags.append(t)
        tag_idx = {t: i for i, t in enumerate(tags)}
        NT = len(tags)
        cidx = {c: i for i, c in enumerate(classes)}
        # dense weight matrix: feature string -> row (row r + 1 holds features[r])
        features = list(model.weights)
        feat_row = {f: r for r, f in enumerate(features, 1)}
        W = np.zeros((len(features) + 1, C), dtype=np.float64)
        for f, r in feat_row.items():
            for lab, w in model.weights[f].items():
                if lab in cidx:  # NLTK only takes the max over self.classes
                    W[r, cidx[lab]] = w
        fr = feat_row.get
        # (prev, prev2) -> sum of 'i-1 tag', 'i-2 tag', 'i tag+i-2 tag' rows
        T = np.zeros((NT, NT, C))
        for a, ta in enumerate(tags):
            for b, tb in enumerate(tags):
                T[a, b] = W[fr("i-1 tag " + ta, 0)] + W[fr("i-2 tag " + tb, 0)] + W[fr("i tag+i-2 tag " + ta + " " + tb, 0)]
        # 'i-1 tag+i word' features: key = word_id * NT + prev_tag -> row
        tw_word = {}
        keys, rows = [], []
        pre = "i-1 tag+i word "
        for f, r in feat_row.items():
            if f.startswith(pre):
                t, w = f[len(pre):].split(" ", 1)  # tags contain no spaces
                if t in tag_idx:
                    wid = tw_word.setdefault(w, len(tw_word))
                    keys.append(wid * NT + tag_idx[t])
                    rows.append(r)
        o = np.argsort(keys)
        # the longest string the model reads a word through (metadata.py's long-word shortcut)
        longest = max(max(map(len, tagger.tagdict), default=0), max(map(len, features), default=0))
        return dict(classes=classes, tags=tags, features=features, W=W, T=T, tw_words=list(tw_word),
                    tw_keys=np.asarray(keys, dtype=np.int64)[o], tw_rows=np.asarray(rows, dtype=np.int64)[o],
                    tagdict=dict(tagger.tagdict), longest=longest, start=list(tagger.START), end=list(tagger.END),
                    normalize_known=source_hash(type(tagger).normalize) in FastPOSTagger.KNOWN_NORMALIZE)

    def __init__(self, tables, load_tagger, max_batch_tokens=32768, eps=1e-6, max_cache=2_000_000):
        self.max_cache = max_cache  # per-word cache entries kept after a call (bounds memory)
        self._load_tagger, self._tagger = load_tagger, None
        self.max_batch_tokens = max_batch_tokens
        # weights are rounded to 3 decimals, so distinct scores differ by ~1e-3;
        # a gap below eps means an exact tie (or float-order sensitive) -> NLTK
        self.eps = eps
        t = tables
        self.classes, self.tags, self.tagdict, self.longest = t['classes'], t['tags'], t['tagdict'], t['longest']
        self.tag_idx = {t: i for i, t in enumerate(self.tags)}
        self.tags_obj = np.array(self.tags, dtype=object)
        self.NT = len(self.tags)
        self.feat_row = dict(zip(t['features'], range(1, len(t['features']) + 1)))
        self.W, self.T, self.tw_keys, self.tw_rows = t['W'], t['T'], t['tw_keys'], t['tw_rows']
        C, F = len(self.classes), len(t['features']) + 1
        check_arrays(t, {'W': ('float64', (F, C), None), 'T': ('float64', (self.NT, self.NT, C), None),
                         'tw_keys': ('int64', (None,), None), 'tw_rows': ('int64', (len(t['tw_keys']),), F)})
        known = self.tag_idx.keys()
        if not (set(self.tagdict.values()) | set(t['start'])) <= known or self.classes != self.tags[:C]:
            raise ValueError("tables: a tag of the tag dictionary, a class or a START marker is not a known tag")
        self.bias = self.W[self.feat_row.get("bias", 0)]
        self.tw_word = dict(zip(t['tw_words'], range(len(t['tw_words']))))
        # NLTK's context markers and word normalisation: our copy of it where NLTK's is the one
        # it copies (checked when the tables were built), else NLTK's (importing nltk.tag: slower)
        self.START, self.END = t['start'], t['end']
        if t['normalize_known']:
            self.normalize = perceptron_normalize
        else:
            from nltk.tag import PerceptronTagger
            self.normalize = PerceptronTagger(load=False).normalize
        # per-word cache; ids 0..3 are the context pseudo-words, which are NOT
        # normalised (a real token '-START-' normalises to '-start-')
        self._reset_cache()

    @property
    def tagger(self):
        """NLTK's own tagger, loaded on first use (a near-tie)."""
        if self._tagger is None:
            self._tagger = self._load_tagger()
        return self._tagger

    def _reset_cache(self):
        self.word_id = {}
        self.roles = np.zeros((1024, 11), dtype=np.int64)
        self.n_words = 0
        for k, s in enumerate(list(self.START) + list(self.END)):
            self._add(s, pseudo=True)
            self.word_id[k] = k  # int keys (never a word) name the pseudo-words in _run

    def _row(self, w, pseudo=False):
        fr = self.feat_row.get
        n = w if pseudo else self.normalize(w)
        td = self.tagdict.get(w)
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
        sentence start): what NLTK's greedy loop gives when it reaches words[start] with
        those tags."""
        return _run_batched(self._run, jobs, self.max_batch_tokens)

    def _run(self, jobs):
        # jobs in any order (an empty one gives an empty list)
        # flat layout per job: the words start-2 .. stop+1 of its sentence, with
        # -START- -START2- before word 0 and -END- -END2- after the last word (pseudo-word
        # ids 0..3, written as their int keys); words are mapped to ids in one pass after
        fw, starts, lens, h1, h2 = [], [], [], [], []
        START, tidx = self.START, self.tag_idx
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
        tags, realpos, offs = self._score(flat, starts, lens, h1, h2, jobs.__getitem__)
        self._bound_cache()
        names = self.tags_obj[tags[realpos]].tolist()
        return [names[o:o + n] for o, n in zip(offs.tolist(), lens.tolist())]

    def ids(self, words):
        """Cache ids of words (int keys 0..3: the pseudo-words), new words added in order.
        They stay valid until the next scoring call has returned."""
        get = self.word_id.get
        flat = list(map(get, words))
        if None in flat:
            self._add_many(list(dict.fromkeys(w for i, w in zip(flat, words) if i is None)))
            flat = list(map(get, words))
        return np.asarray(flat, dtype=np.int64)

    def tag_windows(self, flat, starts, lens, h1, h2, job):
        """The causal code's entry point: greedy tagging of many windows laid out in one array.
        flat: word ids (from ids(); 0, 1 = -START-, -START2-, 2, 3 = -END-, -END2-); window k
        tags flat[starts[k]:starts[k] + lens[k]] after the tag indices h1[k], h2[k] (the
        previous tag, the one before), and the POS_WINDOW words before and after each tagged
        one are in flat. job(k) -> (words, index of the first tagged one) is called only to
        recompute a near-tie with NLTK. Returns the tag indices (into self.tags) over flat."""
        tags = self._score(flat, starts, lens, h1, h2, job)[0]
        self._bound_cache()
        return tags

    def _bound_cache(self):
        if self.n_words > self.max_cache:
            self._reset_cache()

    def _score(self, flat, starts, lens, h1, h2, job):
        # tag_windows; also returns the tagged positions (realpos) and each window's offset
        # among them (offs)
        self._context = None   # (words, context) of _exact, valid during this call only
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
                best[a] = self._exact(job, starts, tags, int(cur[a]))   # same inputs as sc
            changed = cur[best != tags[cur]]
            tags[cur] = best
            nxt = np.union1d(changed + 1, changed + 2)
            cur = nxt[pred[nxt]]
        return tags, realpos, offs

    def _exact(self, job, starts, tags, p):
        # recompute one token exactly as NLTK does (near-tie in our scores)
        tg = self.tagger
        k = int(np.searchsorted(starts, p, side="right")) - 1
        words, start = job(k)[:2]
        i = start + p - int(starts[k])
        # the context of the last sentence, reused: eps = inf (metadata.py's fallback to NLTK's
        # model) sends every word here, and rebuilding it per word would be quadratic
        if self._context is None or self._context[0] is not words:
            self._context = words, tg.START + [tg.normalize(w) for w in words] + tg.END
        context = self._context[1]
        prev, prev2 = self.tags[tags[p - 1]], self.tags[tags[p - 2]]
        feats = tg._get_features(i, words[i], context, prev, prev2)
        return self.tag_idx[tg.model.predict(feats)[0]]


class FastNEChunker:
    """Exact, vectorised equivalent of
    [iob for (w, p, iob) in tree2conlltags(chunker.parse(sent))] for chunker =
    nltk.chunk.ne_chunker(fmt) (the binary or the multiclass model).

    Built from tables(chunker) (plain arrays and lists, which metadata.py keeps in a disk cache);
    NLTK's own chunker is needed only to recompute a near-tie: load_chunker() is called then."""

    # the features of a token read through the token alone (own) and as a neighbour (cols)
    # source_hash of NLTK 3.10's shape() and simplify_pos(), which _compiled_shape and
    # ne_simplify_pos copy
    KNOWN_CODE = ('ab632d5f58619cd3', 'bf6e4cdb427616eb')
    OWN = ("bias", "shape", "wordlen", "prefix3", "suffix3", "pos", "word", "en-wordlist")
    COLS = ("prevpos", "prevword", "nextpos", "nextword")

    @staticmethod
    def tables(chunker):
        """The model as numpy arrays and JSON values (what __init__ reads)."""
        import nltk
        from nltk.chunk import named_entity
        nt = chunker._tagger  # NEChunkParserTagger
        clf = nt._classifier
        enc = clf._encoding
        # our scoring mirrors BinaryMaxentFeatureEncoding + log-linear maxent
        assert isinstance(enc, nltk.classify.maxent.BinaryMaxentFeatureEncoding)
        assert clf._logarithmic and not enc._unseen and nt._cutoff_prob is None
        labels = list(enc.labels())
        for lab in labels:
            assert lab == "O" or lab[:2] in ("B-", "I-"), lab
        L = len(labels)
        lidx = {lab: j for j, lab in enumerate(labels)}
        wts = clf._weights
        # feature name -> {value: row of per-label weights}; python dicts keyed like NLTK's
        # mapping, so value equality (True == 1, None, ints) is the same
        feat = {}
        rows = [np.zeros(L)]
        for (fname, fval, lab), fid in enc._mapping.items():
            assert fval is None or isinstance(fval, (str, int)), (fname, fval)   # JSON-exact values
            d = feat.setdefault(fname, {})
            r = d.get(fval)
            if r is None:
                r = d[fval] = len(rows)
                rows.append(np.zeros(L))
            rows[r][lidx[lab]] = wts[fid]
        W = np.array(rows)
        aon = np.zeros(L)
        if enc._alwayson:
            for lab, fid in enc._alwayson.items():
                aon[lidx[lab]] = wts[fid]
        wl = sorted(nt._english_wordlist())
        # values the 'prevtag' feature can take: None (index 0), a label's
        # first character (index 1: NLTK uses history[index - 1][0]) or the
        # full label (index >= 2)
        vals = [None] + labels + sorted({lab[0] for lab in labels})
        vidx = {v: j for j, v in enumerate(vals)}
        E = {}
        r_prevtag = [feat.get("prevtag", E).get(v, 0) for v in vals]
        r_shpt_none = [feat.get("shape+prevtag", E).get(f"{None}+{v}", 0) for v in vals]
        r_none = {k: feat.get(k, E).get(None, 0) for k in FastNEChunker.COLS}
        # 'word+nextpos' (f"{word.lower()}+{next pos.lower()}", 'None' at the sentence end) as a
        # dense table: [index of the lowercased word, index of the next pos] -> row. Next-pos
        # indices of the model's features come first (0 = None); any other pos has no row.
        wn_word, wn_pl = {}, {None: 0}
        cells = []
        for fval, r in feat.get("word+nextpos", E).items():
            if isinstance(fval, str):
                w, _, npos = fval.rpartition("+")
                wi = wn_word.setdefault(w, len(wn_word) + 1)   # 0: no such word
                pi = wn_pl.setdefault(None if npos == "None" else npos, len(wn_pl))
                cells.append((wi, pi, r))
        wn_tab = np.zeros((len(wn_word) + 1, len(wn_pl)), dtype=np.int64)
        for wi, pi, r in cells:
            wn_tab[wi, pi] = r
        # the longest string (or word length) the model reads a word through (metadata.py's
        # long-word shortcut)
        longest = max(max((len(v) for d in feat.values() for v in d if isinstance(v, str)), default=0),
                      max((v for v in feat.get("wordlen", E) if isinstance(v, int)), default=0),
                      max(map(len, wl), default=0))
        # word+nextpos is read through wn_tab only
        names = [n for n in feat if n != "word+nextpos"]
        return dict(labels=labels, W=W, aon=aon, wl=wl, vals=vals,
                    v_full=np.array([vidx[lab] for lab in labels], dtype=np.int64),
                    v_char=np.array([vidx[lab[0]] for lab in labels], dtype=np.int64),
                    r_prevtag=np.array(r_prevtag, dtype=np.int64), r_shpt_none=np.array(r_shpt_none, dtype=np.int64),
                    r_none=r_none, feat_names=names, feat_vals=[list(feat[n]) for n in names],
                    feat_rows=np.array([r for n in names for r in feat[n].values()], dtype=np.int64),
                    wn_words=list(wn_word), wn_pl=list(wn_pl), wn_tab=wn_tab, longest=longest,
                    nltk_code_known=(source_hash(named_entity.shape), source_hash(named_entity.simplify_pos))
                    == FastNEChunker.KNOWN_CODE)

    def __init__(self, tables, load_chunker, max_batch_tokens=32768, eps=1e-9, max_cache=2_000_000):
        self.max_cache = max_cache  # per-(word, pos) cache entries kept after a call
        # NLTK's shape() and simplify_pos(): our copies where NLTK's are the ones they copy
        # (checked when the tables were built), else NLTK's (importing nltk.chunk: slower)
        if tables['nltk_code_known']:
            self._shape, self._simplify_pos = self._compiled_shape(), ne_simplify_pos
        else:
            from nltk.chunk.named_entity import shape, simplify_pos
            self._shape, self._simplify_pos = shape, simplify_pos
        self._load_chunker, self._chunker = load_chunker, None
        self.max_batch_tokens = max_batch_tokens
        self.eps = eps
        t = tables
        self.labels = t['labels']
        self.labels_obj = np.array(self.labels, dtype=object)
        self.label_idx = {lab: j for j, lab in enumerate(self.labels)}
        self.W, self.aon, self.wl, self.vals = t['W'], t['aon'], set(t['wl']), t['vals']
        self.v_full, self.v_char, self.r_prevtag, self.r_shpt_none, self.r_none = (
            t['v_full'], t['v_char'], t['r_prevtag'], t['r_shpt_none'], t['r_none'])
        self.feat, k = {}, 0
        rows = t['feat_rows'].tolist()
        for name, vals in zip(t['feat_names'], t['feat_vals']):
            self.feat[name] = dict(zip(vals, rows[k:k + len(vals)]))
            k += len(vals)
        self.wn_word = dict(zip(t['wn_words'], range(1, len(t['wn_words']) + 1)))
        self.wn_pl = dict(zip(t['wn_pl'], range(len(t['wn_pl']))))
        self.wn_tab, self.longest = t['wn_tab'], t['longest']
        L, V, R = len(self.labels), len(self.vals), len(self.W)
        check_arrays(t, {'W': ('float64', (None, L), None), 'aon': ('float64', (L,), None),
                         'v_full': ('int64', (L,), V), 'v_char': ('int64', (L,), V),
                         'r_prevtag': ('int64', (V,), R), 'r_shpt_none': ('int64', (V,), R),
                         'feat_rows': ('int64', (sum(map(len, t['feat_vals'])),), R),
                         'wn_tab': ('int64', (len(self.wn_word) + 1, len(self.wn_pl)), R)})
        if set(self.r_none) != set(self.COLS) or not all(type(r) is int and 0 <= r < R
                                                         for r in self.r_none.values()):
            raise ValueError("table r_none: a row index out of range")
        self._reset_cache()

    @property
    def chunker(self):
        """NLTK's own chunker, loaded on first use (a near-tie)."""
        if self._chunker is None:
            self._chunker = self._load_chunker()
        return self._chunker

    @property
    def nt(self):
        """NLTK's greedy raw-label tagger (NEChunkParserTagger) of the chunker."""
        return self.chunker._tagger

    @staticmethod
    def _compiled_shape():
        """NLTK 3.10's nltk.chunk.named_entity.shape() with its three patterns compiled once: NLTK
        recompiles them through its ReDoS guard (nltk.redos) on every call (7 us a word). The same
        engine (the `regex` module), patterns and flags, so the same answers (tests compare)."""
        from nltk.redos import compile as redos_compile
        pats = (r"[0-9]+(\.[0-9]*)?|[0-9]*\.[0-9]+$", r"\W+$", r"\w+$")
        num, punct, word_rx = [getattr(c, '_rx', c).match for c in (redos_compile(p, re.UNICODE) for p in pats)]

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
        W, shape, wl, vals = self.W, self._shape, self.wl, self.vals
        E = {}
        (f_bias, f_shape, f_len, f_pre, f_suf, f_pos, f_word, f_wl), (f_ppos, f_pword, f_npos, f_nword) = (
            [self.feat.get(n, E) for n in names] for names in (self.OWN, self.COLS))
        f_ppt, f_shpt = self.feat.get("pos+prevtag", E), self.feat.get("shape+prevtag", E)
        i0, k = self.n_tok, len(toks)
        for name in ('selfvec', 'cols', 'ppt', 'shpt', 'plid', 'wnw'):
            setattr(self, name, _grow(getattr(self, name), i0 + k))
        own, cols, ppt, shpt, plid, wnw = [], [], [], [], [], []
        for r, tok in enumerate(toks):
            word, pos = tok
            sp = self._simplify_pos(pos)
            lw, pl = word.lower(), pos.lower()
            own.append((f_bias.get(True, 0), f_shape.get(shape(word), 0), f_len.get(len(word), 0),
                        f_pre.get(word[:3].lower(), 0), f_suf.get(word[-3:].lower(), 0), f_pos.get(sp, 0),
                        f_word.get(word, 0), f_wl.get(word in wl, 0)))
            cols.append((f_ppos.get(sp, 0), f_pword.get(lw, 0), f_npos.get(pl, 0), f_nword.get(lw, 0)))
            # the prevtag pair rows depend on the simplified pos / the shape only: few values
            row = self._ppt_rows.get(sp)
            if row is None:
                row = self._ppt_rows[sp] = [f_ppt.get(f"{sp}+{t}", 0) for t in vals]
            ppt.append(row)
            psh = shape(lw)  # prevshape is the shape of the LOWERCASED previous word
            row = self._shpt_rows.get(psh)
            if row is None:
                row = self._shpt_rows[psh] = [f_shpt.get(f"{psh}+{t}", 0) for t in vals]
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
        # opens a new chunk, i.e. becomes B-X (iob)
        return [[iob(lab, labs[i - 1] if i else None) for i, lab in enumerate(labs)]
                for labs in self.raw_sents(tagged_sents)]

    def raw_sents(self, tagged_sents):
        """The raw labels of NLTK's NE tagger (before the chunk/IOB fixup) of each sentence."""
        return _run_batched(self._run, [(s, 0, (), len(s)) for s in tagged_sents], self.max_batch_tokens)

    def raw_resume(self, jobs):
        """Greedy continuation: jobs of (tokens, start, history, stop) -> the raw labels of
        tokens[start:stop] given history = the raw labels of tokens[:start] (only the
        last one is read; pos of tokens past stop is not read): what NLTK's greedy loop gives
        when it reaches tokens[start] with that history."""
        return _run_batched(self._run, jobs, self.max_batch_tokens)

    def _run(self, jobs):
        # jobs in any order (an empty one gives an empty list)
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
        labs, realpos, offs = self._score(ids, starts, lens, absst, fpos, lpos, hpos, hlab, jobs.__getitem__)
        self._bound_cache()
        names = self.labels_obj[labs[realpos]].tolist()
        return [names[o:o + n] for o, n in zip(offs.tolist(), lens.tolist())]

    def ids(self, toks):
        """Cache ids of (word, pos) tokens, new ones added in order. They stay valid until the
        next scoring call has returned."""
        get = self.tok_id.get
        ids = list(map(get, toks))
        if None in ids:
            self._add_many(list(dict.fromkeys(t for i, t in zip(ids, toks) if i is None)))
            ids = list(map(get, toks))
        return np.asarray(ids, dtype=np.int64)

    def label_windows(self, ids, starts, lens, absst, fpos, lpos, hpos, hlab, job):
        """The causal code's entry point: greedy raw labelling of many windows laid out in one
        array. ids: token ids (from ids()); window k labels ids[starts[k]:starts[k] + lens[k]],
        the first of them at index absst[k] of its sentence; fpos / lpos: positions of
        sentence-first / sentence-last tokens; hpos, hlab: given label indices (the history
        before each window). The NE_WINDOW tokens before and after each labelled one are in ids.
        job(k) -> (tokens, start, history) is called only to recompute a near-tie with NLTK.
        Returns the label indices (into self.labels) over ids."""
        labs = self._score(ids, starts, lens, absst, fpos, lpos, hpos, hlab, job)[0]
        self._bound_cache()
        return labs

    def _bound_cache(self):
        if self.n_tok > self.max_cache:
            self._reset_cache()

    def _score(self, ids, starts, lens, absst, fpos, lpos, hpos, hlab, job):
        # label_windows; also returns the labelled positions (realpos) and each window's
        # offset among them (offs)
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
                    best[a] = self._exact(job, starts, labs, int(cur[a]))   # same inputs as sc
            changed = cur[best != labs[cur]]
            labs[cur] = best
            nxt = changed + 1
            cur = nxt[tagged[nxt]]
        return labs, realpos, offs

    def _exact(self, job, starts, labs, p):
        # recompute one token exactly as NLTK does (near-tie in our scores)
        k = int(np.searchsorted(starts, p, side="right")) - 1
        toks, start, hist = job(k)[:3]
        i = start + p - int(starts[k])
        history = list(hist[:start]) + [self.labels[t] for t in labs[int(starts[k]) : p].tolist()]
        tag = self.nt.choose_tag(list(toks), i, history)
        return self.labels.index(tag)


def treebank_rules_hash(tokenizer_class):
    """A short hash of NLTKWordTokenizer's rules (patterns and replacements), to tell the rule set
    the shortcuts above were checked against from another."""
    import hashlib
    pat = lambda x: getattr(x, '_rx', x).pattern
    rules = []
    for name in ('STARTING_QUOTES', 'PUNCTUATION', 'ENDING_QUOTES'):
        rules += [(name, pat(a), b) for a, b in getattr(tokenizer_class, name)]
    for name in ('PARENS_BRACKETS', 'DOUBLE_DASHES'):
        a, b = getattr(tokenizer_class, name)
        rules.append((name, pat(a), b))
    for name in ('CONTRACTIONS2', 'CONTRACTIONS3'):
        rules += [(name, pat(a)) for a in getattr(tokenizer_class, name)]
    return hashlib.sha256(repr(rules).encode()).hexdigest()[:16]


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
    sentence. Verified identical on all of Gutenberg and Brown (LIME_FULL_CHECK=1 python -m
    pytest tests/test_metadata.py -k corpora).

    known_rules: the tokenizer's rules are the ones listed in KNOWN_RULES (NLTK 3.10's; checked
    by hash). Then a piece with none of the characters those rules read (ACTIVE) and no
    letter-only contraction is one word without asking NLTK (a base64 blob, say), and metadata's
    causal path may use its sync points (see "long runs without whitespace" there)."""

    CLOSERS = set("])}>\"'»”’")
    KNOWN_RULES = {'f1644240333ead6c'}
    # every character a rule reads, and whitespace
    ACTIVE = re.compile(r"""[\s"'`«»“”‘’„.:,;@#$%&?!*()\[\]{}<>\-\u2012-\u2015]""")
    # NLTK's CONTRACTIONS2 patterns without an apostrophe (they split a letters-only word)
    LETTER_SPLITS = frozenset(["cannot", "gimme", "gonna", "gotta", "lemme", "wanna"])

    def __init__(self, max_cache=2_000_000):
        from nltk.tokenize.destructive import NLTKWordTokenizer
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
        self.known_rules = treebank_rules_hash(NLTKWordTokenizer) in self.KNOWN_RULES

    def _canon_run(self, m):
        w = m.group()
        return w if w.lower() in self.LETTER_SPLITS else 'a' * len(w)

    def _piece(self, key):
        # key = (before char or '' at text start, piece text, after char or '$' at text end / tail)
        b, piece, a = key
        if (piece.isascii() and piece.isalpha() and piece.lower() not in self.LETTER_SPLITS) or (
                self.known_rules and not self.ACTIVE.search(piece)
                and not any(p.search(' ' + piece + ' ') for p in self.wt.CONTRACTIONS2)):
            # ASCII letters only: every rule needs a non-letter (quote, punctuation, bracket,
            # dash, apostrophe) except the letter-only contractions (cannot -> can not, ...);
            # likewise any piece without the characters the rules read
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
        return list(self.wt.span_tokenize(text))


# -----------------------------------------------------------------------------
# long runs without whitespace: the facts about NLTK that bound metadata.py's causal work
# A prefix that ends inside a long whitespace-free run (a base64 blob, minified JSON, 'a' * n)
# would make metadata.py's causal steps cost the run's length per token: the run is one chunk
# (re-tokenized whole), often one huge word (whose every prefix is a new word for the taggers),
# and punkt's contexts hold the whole run. Four facts about NLTK keep the work per token bounded, each exact:
# 1. Sync points (sync_point). NLTK's Treebank rules only match patterns of a few characters,
#    except runs of backticks, periods, closing brackets/quotes before the text's end, and
#    chains of ':' ','. At a position m whose 2 * SYNC_G neighbours hold none of those runs but
#    runs of periods (nor quotes other than '"', nor whitespace) and not only closing characters
#    right of m, no rule match crosses m but a run of periods, and every match near m depends on
#    characters within the window only. A run of two or more periods is one word whatever its
#    length and neighbours (the ellipsis rule pads it with spaces; the rules before it read one
#    character after ':' ',' or a final period after a non-period, the rules after it see the
#    padding), so it may hold m (the word across m) or start before the window, provided the
#    window holds two of its periods (else the window would read a single period). So
#    the words of a prefix left of m are the document's, and right of m those of the text from
#    m - SYNC_G to the prefix end, tokenized on its own (the word across m, if any, joins both).
# 2. Long words (MiddleSummary, rep_middle; used by metadata's _word_str). The taggers read a
#    word longer than any string in their models (the fast taggers' .longest) only through its
#    first and last characters, whether it holds a '-', and a few properties of its
#    characters (digits, letters, case, \w): what str.istitle, str.islower, NLTK's shape() and the
#    number pattern see. A word of LONG_WORD characters or more whose middle consists of
#    characters of a few known classes (_char_class) is given to the taggers as its first and last
#    REP_H characters around a short middle with the same classes, pairs of case classes and
#    periods (rep_middle): the same features, so the same tags.
# 3. punkt (punkt_input). punkt decides a break from contexts whose tokens it annotates in pairs
#    (whether a token ends a sentence depends on it and the next token only); in a stretch
#    without whitespace it weighs only the last candidate break (every context starts at the
#    stretch's start, so earlier candidates overlap later ones); and it reads a long token only
#    through its first and last characters and which classes of characters it holds. So, for
#    punkt, the middle of a long stretch reads the same as a few characters: as the two
#    single-character tokens ( ) [ ] { } " ; : * @ around it (and a ':') when no token in it can
#    end a sentence (no ? ! and no period that ends a token); as the two anchors around it (those
#    tokens, or runs of two to _RUN_MAX periods: always tokens of their own) and a ':', with the
#    last candidate in the tail (or none in the stretch), when the text before it already holds a
#    sentence-ending pair or the middle holds none (_sentence_ends; neither (anchor, ':') nor
#    (':', anchor) is one); as one character of each class present (letter, digit, , . - inside a
#    token, other) when punkt splits nowhere in it (a period ends a token only before whitespace,
#    NonWord punctuation, '..', '--' or a comma that ends one: TextIndex._judge_dot); inside a run
#    of periods, as 2 * REP_H + 1 periods (a run longer than any string punkt looks up is one
#    token, read the same whatever its length).
# 4. Candidate breaks (TextIndex.candidates). punkt breaks only at matches of its period_context_re:
#    a . ? ! followed by NonWord punctuation, or by whitespace and a token. A period before
#    ',' '-' '.', a letter or a digit is none, in the text and in each of its prefixes (there the
#    character after it is the text's, a U+FFFD for a cut character, or nothing), so it creates
#    no break and keeps no decision open. (Counted as candidates, the periods of 'x.,x.,' or of
#    '...' kept a decision open up to the run's end: punkt re-ran on the whole run per token.)
#    With fact 1's runs of periods (sync points inside and next to them), runs of periods,
#    'x.,' 'x.-' and ellipses between words cost the same per token as other text.
# Each holds for the NLTK rules it was checked against (long_run_checks compares them; fact 4
# reads PunktLanguageVars, part of punkt's checked code); with another NLTK the exact per-token
# path runs (slower on long runs, the same tags).


SYNC_G = 8                 # characters on each side of a sync point
_SYNC_TRIES = 64           # windows tried before re-tokenizing the whole chunk
# what a sync window may not hold: whitespace, backticks, single and curly quotes, guillemets,
# two of ':' ',' or two '-' in a row (a single period is read by the final-period rule only
# before closing characters up to the text's end: the window's right half has another; runs of
# periods: see fact 1, sync_point keeps the window from starting at the last period of a run)
_SYNC_BAD = re.compile(r"""[\s`'«»“”‘’„]|[:,](?=[:,])|-(?=-)""")
_CLOSERS = frozenset('])}>"\'»”’')   # closing characters the Treebank final-period rule skips
REP_H = 32                 # characters kept at each end of a long word (taggers) or stretch (punkt)
LONG_WORD = 3 * REP_H      # words at least this long go to the taggers as a representative
PUNKT_LONG = 4 * REP_H     # stretches at least this long are shortened for punkt
_PUNKT_C1 = '()[]{}";:*@'    # punkt: single-character tokens that also end the token before them
# the punkt code the facts above were checked against: NLTK 3.10 (the Treebank rules: in
# FastWordSpans.KNOWN_RULES)
_KNOWN_PUNKT = {'84432cd3026837fb'}


def sync_point(text, lo, x):
    """The last sync point m <= x with m - SYNC_G >= lo (fact 1 above), or -1."""
    G = SYNC_G
    m = x
    for _ in range(_SYNC_TRIES):
        if m - G < lo:
            return -1
        w = text[m - G:m + G]
        bad = None
        for bad in _SYNC_BAD.finditer(w):
            pass
        if bad is None:
            # (not from the last period of a run: the window would read a single period)
            edge = w[0] == '.' and w[1] != '.' and m > G and text[m - G - 1] == '.'
            if any(ch not in _CLOSERS for ch in w[G:]) and not edge:
                return m
            m -= 1
        else:
            m = m - 2 * G + bad.start()   # the next window ends before the bad character
    return -1


# character classes of a long word's middle (fact 2): U, L (cased), D (ASCII digit), O (uncased
# letter: CJK, ...; not the CJK numerals), W ('_'), X (other: + / = , : ...), Y ('-'), P ('.'), each with the
# representative character written in its place
_CLASS_REP = 'Aa0\u65e5_+-.'
_U, _L, _D, _O, _W, _X, _Y, _P = range(8)


def _char_props(ch):
    # everything the taggers' features (and str.istitle / islower, shape(), the number patterns)
    # can observe of one character, in both regex engines
    props = (ch in '0123456789', ch.isdigit(), ch.isdecimal(), ch.isnumeric(), ch.isalpha(),
             ch.isalnum(), ch.isupper(), ch.islower(), ch.istitle(), ch.isspace(), ch.isprintable(),
             ch in '-.', bool(re.match(r'\w', ch)), bool(re.match(r'\d', ch)))
    rx = _regex_module()
    if rx is not None:
        props += (bool(rx.match(r'\w', ch)), bool(rx.match(r'\d', ch)))
    return props


@lru_cache(maxsize=None)
def _regex_module():
    try:
        import regex
        return regex
    except ImportError:
        return None


_CLASS_OF = {}   # character -> class (-1: none: the word is given to the taggers as it is)


def _char_class(ch):
    k = _CLASS_OF.get(ch)
    if k is None:
        k = -1
        if ch not in 'Σ-.':   # (Σ lowercases by its neighbours; '-' and '.' are their own classes)
            props = _char_props(ch)
            for cls, rep in enumerate(_CLASS_REP[:_Y]):
                if props == _char_props(rep):
                    low = ch.lower()
                    if (low == ch if cls != _U else len(low) == 1 and _char_class(low) == _L):
                        k = cls
                    break
        elif ch != 'Σ':
            k = _Y if ch == '-' else _P
        _CLASS_OF[ch] = k
    return k


def _pair_flags(a, b):
    # (bad for istitle of the word, bad for istitle of the lowercased word) of adjacent classes a, b
    ca, cb = a <= _L, b <= _L
    return (ca and b == _U) or (not ca and b == _L), not ca and cb


_CLASS_TABLE = {}   # ord(character) -> its class as a digit, 'x' for none (for str.translate)
_BAD1 = re.compile('[01]0|[2-7]1')   # class pairs bad for istitle of the word (cased then U, uncased then L)
_BAD2 = re.compile('[2-7][01]')      # ... of the lowercased word (uncased then cased)


class MiddleSummary:
    """The classes of a long word's middle, scanned left to right (extended as the prefix grows):
    first and last class, the classes present, whether a pair bad for istitle occurs (in the word
    and in the lowercased word), how many periods (0, 1, 2 or more); ok False: a character of no class."""
    __slots__ = ('end', 'first', 'last', 'present', 'bad1', 'bad2', 'dots', 'ok')

    def __init__(self, start):
        self.end, self.first, self.last, self.present = start, -1, -1, 0
        self.bad1 = self.bad2 = False
        self.dots, self.ok = 0, True

    def extend(self, text, end):
        if self.ok and end > self.end:
            chunk = text[self.end:end]
            for ch in set(chunk):
                if ord(ch) not in _CLASS_TABLE:
                    k = _char_class(ch)
                    _CLASS_TABLE[ord(ch)] = str(k) if k >= 0 else 'x'
            r = chunk.translate(_CLASS_TABLE)
            if 'x' in r:
                self.ok = False
            else:
                rr = (str(self.last) if self.last >= 0 else '') + r
                if self.first < 0:
                    self.first = int(r[0])
                self.last = int(r[-1])
                for d in set(r):
                    self.present |= 1 << int(d)
                self.bad1 = self.bad1 or _BAD1.search(rr) is not None
                self.bad2 = self.bad2 or _BAD2.search(rr) is not None
                self.dots = min(2, self.dots + r.count('7'))
        self.end = max(self.end, end)
        return self

    def key(self):
        return self.first, self.last, self.present, self.bad1, self.bad2, self.dots


@lru_cache(maxsize=None)
def rep_middle(key):
    """The shortest string of class representatives with the summary key (first, last, present,
    bad1, bad2, dots): found by breadth-first search over (last class, classes so far, flags)."""
    first, last, present, bad1, bad2, dots = key
    classes = [k for k in range(8) if present >> k & 1]
    start = (first, 1 << first, False, False, int(first == _P))
    prev = {start: None}
    queue = [start]
    for state in queue:
        k, have, b1, b2, d = state
        if k == last and have == present and b1 == bad1 and b2 == bad2 and d == dots:
            out = []
            while state is not None:
                out.append(_CLASS_REP[state[0]])
                state = prev[state]
            return ''.join(reversed(out))
        for n in classes:
            f1, f2 = _pair_flags(k, n)
            nxt = (n, have | 1 << n, b1 or f1, b2 or f2, min(2, d + (n == _P)))
            if nxt not in prev:
                prev[nxt] = state
                queue.append(nxt)
    raise AssertionError(key)   # unreachable: the word's own middle is such a string


def long_run_checks(word_spans, tok, models):
    """(sync points, long-word representatives, punkt shortening): whether each fact of the notes
    above holds for the installed NLTK: word_spans (FastWordSpans) knows its Treebank rules, punkt's
    code is the one checked, and no string that punkt's parameters (tok) or the models (the fast
    taggers: their .longest) hold is as long as a representative's ends."""
    import hashlib
    import importlib
    import inspect
    punkt = importlib.import_module('nltk.tokenize.punkt')   # (not `import nltk...`: import_nltk)
    sync = word_spans.known_rules
    names = ['_match_potential_end_contexts', 'text_contains_sentbreak', '_slices_from_text',
             '_realign_boundaries', 'span_tokenize', '_annotate_tokens', '_annotate_first_pass',
             '_first_pass_annotation', '_annotate_second_pass', '_second_pass_annotation',
             '_ortho_heuristic', '_tokenize_words', '_get_last_whitespace_index']
    try:
        src = ''.join(inspect.getsource(next(c.__dict__[n] for c in punkt.PunktSentenceTokenizer.__mro__
                                             if n in c.__dict__)) for n in names)
        src += inspect.getsource(punkt.PunktToken) + inspect.getsource(punkt.PunktLanguageVars) + inspect.getsource(punkt._pair_iter)
        punkt_ok = hashlib.sha256(src.encode()).hexdigest()[:16] in _KNOWN_PUNKT
    except (OSError, TypeError, StopIteration):
        punkt_ok = False
    params = tok._params
    known = list(params.abbrev_types) + list(params.sent_starters) + [t for t, v in params.ortho_context.items() if v]
    known += [a + ' ' + b for a, b in params.collocations]
    punkt_ok = punkt_ok and max(map(len, known), default=0) < 2 * REP_H
    longest = max(m.longest for m in models)
    return sync, longest < 2 * REP_H, punkt_ok


# str.isspace of every code point up to U+3000 (the last space character), False after it
_SPACE_TABLE = np.array([chr(i).isspace() for i in range(0x3001)] + [False], dtype=bool)


class TextIndex:
    """Sorted positions of a few kinds of characters of a text, so that the lookups near a prefix
    end never scan a long run: whitespace (str.isspace), separators (' ', '\\n', '\\r', '\\t'),
    candidate sentence ends (. ? !) and, built on first use, what punkt reads in a stretch
    (punkt_input). Built with numpy for a document; extend() appends (the online stream)."""

    KINDS = ('ws', 'sep', 'cand')
    PUNKT_KINDS = ('pact', 'pbad', 'c1', 'pdig', 'poth', 'pnum')

    def __init__(self, text):
        from array import array
        self.text = text
        self.L = len(text)
        self.pos = {k: array('q') for k in self.KINDS}
        self.has_punkt = False
        if text:
            cp = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
            isws = _SPACE_TABLE[np.minimum(cp, len(_SPACE_TABLE) - 1)]
            sep = (cp == 32) | (cp == 10) | (cp == 13) | (cp == 9)
            cand = (cp == 46) | (cp == 63) | (cp == 33)
            for k, mask in (('ws', isws), ('sep', sep), ('cand', cand)):
                self.pos[k].frombytes(np.flatnonzero(mask).astype(np.int64).tobytes())

    def find(self, kind, x):
        """The number of positions of this kind before x (bisect_left)."""
        return bisect.bisect_left(self.pos[kind], x)

    def last_before(self, kind, x):
        """The last position of this kind at or before x, -1 if none."""
        a = self.pos[kind]
        k = bisect.bisect_right(a, x) - 1
        return a[k] if k >= 0 else -1

    def first_from(self, kind, x, default):
        a = self.pos[kind]
        k = bisect.bisect_left(a, x)
        return a[k] if k < len(a) else default

    def count(self, kind, a, b):
        p = self.pos[kind]
        return bisect.bisect_left(p, b) - bisect.bisect_left(p, a)

    def rstrip_end(self, c):
        """len(text[:c].rstrip())."""
        ws = self.pos['ws']
        k = bisect.bisect_left(ws, c) - 1
        if k < 0 or ws[k] != c - 1:
            return c
        lo, hi = 0, k   # the first position of the whitespace run ending at c - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ws[mid] == ws[k] - (k - mid):
                hi = mid
            else:
                lo = mid + 1
        return ws[lo]

    def truncate(self, k):
        """Forget the text from k on (the stream replaces its cut characters)."""
        for a in self.pos.values():
            while a and a[-1] >= k:
                a.pop()
        if self.has_punkt:   # , . - judged by their next characters: judged again
            for p in range(max(0, k - _DOT_AHEAD), k):
                if self.text[p] in '.,-' and p not in self.dot_open:
                    for name in ('pbad', 'pact', 'pnum'):
                        a = self.pos[name]
                        i = bisect.bisect_left(a, p)
                        if i < len(a) and a[i] == p:
                            del a[i]
                    self.dot_open.append(p)
            self.dot_open = sorted(p for p in self.dot_open if p < k)
        self.L = k

    def extend(self, text):
        """The text grew (it starts with the old one)."""
        old, self.text, self.L = self.L, text, len(text)
        for m in _INDEX_RX.finditer(text, old):
            ch = m.group()
            p = m.start()
            if ch.isspace():
                self.pos['ws'].append(p)
                if ch in ' \n\r\t':
                    self.pos['sep'].append(p)
            else:
                self.pos['cand'].append(p)
        if self.has_punkt:
            self._punkt_extend(old)
        if 'pcand' in self.pos:
            self._cand_extend(old)

    def candidates(self):
        """Build the kind pcand (fact 4 of the notes above): the . ? ! that punkt's candidate
        pattern may match in the text or a prefix of it: those followed by whitespace or NonWord
        punctuation (the text's last character is none: judged again when text follows)."""
        if 'pcand' not in self.pos:
            from array import array
            self.pos['pcand'] = array('q')
            self._cand_extend(0)
        return self

    def _cand_extend(self, old):
        pc, text, L = self.pos['pcand'], self.text, self.L
        while pc and pc[-1] >= old - 1:
            pc.pop()
        cand = self.pos['cand']
        P = np.frombuffer(cand, dtype=np.int64)[bisect.bisect_left(cand, max(old - 1, 0)):]
        if not len(P):
            return
        nxt = np.frombuffer(text[max(old - 1, 0):].encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
        table = _punkt_end_table()
        at = np.minimum(P + 1 - max(old - 1, 0), len(nxt) - 1)
        ok = (P + 1 < L) & table[np.minimum(nxt[at], len(table) - 1)]
        pc.frombytes(P[ok].tobytes())

    def punkt(self):
        """Build the punkt kinds: pact (characters punkt may split a token at, or whose class the
        two regex engines disagree on), pbad (? ! and periods that may end a token: they may end
        a sentence), c1 (_PUNKT_C1), pdig / pnum / poth (digits / , . - inside a token / other
        non-word characters among the rest; letters are the rest). The kinds of , . - depend on
        the next characters (up to _DOT_AHEAD; judged when they come)."""
        if not self.has_punkt:
            from array import array
            for k in self.PUNKT_KINDS:
                self.pos[k] = array('q')
            self.has_punkt = True
            self.dot_open = []   # , . - near the end of the text, judged when the next characters come
            self._punkt_extend(0)
        return self

    def _punkt_extend(self, old):
        text = self.text
        if self.dot_open:
            waiting, self.dot_open = self.dot_open, []
            for p in waiting:
                self._bad_or_dot(p)
        chunk = text[old:]
        for ch in set(chunk) - _PUNKT_KIND.keys():
            _PUNKT_KIND[ch] = _punkt_kind(ch)
        kinds = [_PUNKT_KIND[ch] for ch in chunk] if len(chunk) < 4096 else None
        if kinds is None:   # a long text at once: vectorised (the same judgments as _judge_dot)
            kv = np.frombuffer(chunk.translate({ord(ch): chr(48 + k) for ch, k in _PUNKT_KIND.items()})
                               .encode('latin-1'), dtype=np.uint8) - 48
            cp = np.frombuffer(chunk.encode('utf-32-le', 'surrogatepass'), dtype=np.uint32)
            n = len(cp)
            j = np.flatnonzero(kv & 4)
            c0 = cp[j]
            numch = (c0 == 46) | (c0 == 44) | (c0 == 45)
            wait = numch & (j + _DOT_AHEAD >= n)
            self.dot_open += (j[wait] + old).tolist()
            j, c0, numch = j[~wait], c0[~wait], numch[~wait]
            n1, n2, n3 = (cp[np.minimum(j + i, n - 1)] for i in (1, 2, 3))
            k1, k2, k3 = (kv[np.minimum(j + i, n - 1)] for i in (1, 2, 3))
            dot, com, dash = c0 == 46, c0 == 44, c0 == 45
            com_ends = ((k1 & 32) != 0) | (((n1 == 46) | (n1 == 45)) & (n2 == n1)) | ((n1 == 46) & ((k2 & 64) != 0))
            com2_ends = ((k2 & 32) != 0) | (((n2 == 46) | (n2 == 45)) & (n3 == n2)) | ((n2 == 46) & ((k3 & 64) != 0))
            ends = ((k1 & 32) != 0) | (n1 == 46) | ((n1 == 45) & (n2 == 45)) | ((n1 == 44) & com2_ends)
            act = (dot & ends) | (dash & (n1 == 45)) | (com & com_ends)
            found = {'pact': np.union1d(np.flatnonzero(kv & 1), j[act]), 'c1': np.flatnonzero(kv & 2),
                     'pdig': np.flatnonzero(kv & 8), 'poth': np.flatnonzero(kv & 16), 'pnum': j[numch & ~act],
                     'pbad': j[~numch | (dot & ends)]}
            for name, at in found.items():
                self.pos[name].frombytes((at + old).astype(np.int64).tobytes())
        else:
            for i, k in enumerate(kinds):
                if k:
                    p = old + i
                    if k & 1:
                        self.pos['pact'].append(p)
                    if k & 2:
                        self.pos['c1'].append(p)
                    if k & 4:
                        self._bad_or_dot(p)
                    if k & 8:
                        self.pos['pdig'].append(p)
                    if k & 16:
                        self.pos['poth'].append(p)

    def _bad_or_dot(self, p):
        if self.text[p] not in '.,-':
            bisect.insort(self.pos['pbad'], p)
        elif p + _DOT_AHEAD < self.L:
            self._judge_dot(p)
        else:
            self.dot_open.append(p)

    def _judge_dot(self, p):
        # punkt reads , . - inside a token as number characters; a token ends before whitespace,
        # NonWord punctuation, '..' or '--' (MultiChar) or a comma that ends a token itself, so a
        # period there may end a token (and so a sentence), not before ',x' or '-x' ('x.,x.,' is
        # one token); '..' and '--' are tokens of their own, and a comma ends a token before a
        # character that ends tokens (judged late, after later characters: inserted in order)
        ch, nxt, nxt2, nxt3 = self.text[p:p + _DOT_AHEAD + 1]
        ends = (nxt.isspace() or nxt == '.' or (nxt == '-' and nxt2 == '-') or _punkt_nonword().match(nxt) is not None
                or (nxt == ',' and _comma_ends(nxt2, nxt3)))
        if ch == '.' and ends:
            bisect.insort(self.pos['pbad'], p)
        if ch == ',':
            ends = _comma_ends(nxt, nxt2)
        if (nxt == ch) if ch != ',' else ends:
            bisect.insort(self.pos['pact'], p)
        elif not (ch == '.' and ends):
            bisect.insort(self.pos['pnum'], p)
        else:
            bisect.insort(self.pos['pact'], p)


@lru_cache(maxsize=None)
def _punkt_end_table():
    # code point -> whether punkt's candidate pattern accepts it after . ? ! (whitespace, or
    # NonWord punctuation: ASCII in the checked NLTK); the last entry (False) stands for the rest
    nonword = _punkt_nonword()
    return _SPACE_TABLE | np.array([nonword.match(chr(i)) is not None for i in range(len(_SPACE_TABLE) - 1)] + [False])


_DOT_AHEAD = 3   # characters after a , . - that its judgment reads (_judge_dot)


def _comma_ends(nxt, nxt2):
    # ',(?=$|\s|NonWord|MultiChar)' ends a token (MultiChar: '--', '..', '. . .'), given the two
    # characters after the comma (the text goes on after them)
    return (nxt.isspace() or _punkt_nonword().match(nxt) is not None
            or (nxt in '.-' and nxt2 == nxt) or (nxt == '.' and nxt2.isspace()))


_INDEX_RX = re.compile(r'[\s.?!]')
# character -> bits: 1 pact, 2 c1, 4 pbad (or , . -: judged by the next characters), 8 pdig, 16 poth,
# 32 ends a punkt token (NonWord punctuation, whitespace), 64 whitespace
_PUNKT_KIND = {}


def _punkt_kind(ch):
    nonword = _punkt_lang_vars()._re_non_word_chars
    rx = _regex_module()
    k = 0
    if ch in _PUNKT_C1:
        k |= 2
    if ch in '?!.,-':
        k |= 4
    if ch.isspace():
        k |= 64
    if ch.isspace() or re.match(nonword, ch):
        k |= 32
    if ch in '.,-':
        return k
    engines = [re] + ([rx] if rx is not None else [])
    word = {bool(e.match(r'\w', ch)) for e in engines}
    digit = {bool(e.match(r'\d', ch)) for e in engines}
    if (ch.isspace() or re.match(nonword, ch) or ch == '\u2014' or len(word) > 1 or len(digit) > 1
            or (rx is not None and bool(rx.match(nonword, ch)) != bool(re.match(nonword, ch)))):
        return k | 1
    if digit == {True}:
        return k | 8
    if word == {False}:
        return k | 16
    return k


_PUNKT_REALIGN = frozenset('"\')]}\u2018\u2019\u201c\u201d\xab\xbb')   # punkt's realigned closers


def punkt_input(tok, text, idx, memo, W, c, mcut):
    """(text, back) for re-running punkt (tok) on the prefix from W (text[W:c] + mcut U+FFFD), the
    middle of each whitespace-free stretch of PUNKT_LONG characters or more replaced by a few
    characters that punkt reads the same way (fact 3 of the notes above); back(p) maps a position
    of that text to the document's (None inside a replaced middle: punkt never breaks there).
    None: nothing to replace. idx: the text's TextIndex; memo: a dict kept with the text."""
    lo, hi = idx.find('ws', W), idx.find('ws', c)
    bounds = [W - 1] + list(idx.pos['ws'][lo:hi]) + [c]
    cuts = []
    for z0, z2 in zip(bounds[:-1], bounds[1:]):   # the stretch [z0 + 1, z2)
        if z2 - z0 - 1 >= PUNKT_LONG:
            cut = _punkt_cut(tok, text, idx, memo, z0 + 1, z2)
            if cut is not None:
                cuts.append(cut)
    if not cuts:
        return None
    segs, parts, pos, n = [], [], W, 0   # segs: (start in the new text, document start, length) of the copied parts
    for x, y, rep in cuts:
        segs.append((n, pos, x - pos))
        parts += [text[pos:x], rep]
        n += x - pos + len(rep)
        pos = y
    segs.append((n, pos, c - pos + mcut))
    parts.append(text[pos:c] + '\ufffd' * mcut)
    seg_starts = [a for a, _, _ in segs]

    def back(p):
        a, d, ln = segs[bisect.bisect_right(seg_starts, p) - 1]
        return d + p - a if p - a <= ln else None
    return ''.join(parts), back


def _punkt_cut(tok, text, idx, memo, z, z2):
    """A middle [x, y) of the long stretch [z, z2) and its replacement for punkt, or None."""
    idx.punkt().candidates()
    a, b = z + REP_H, z2 - REP_H
    if idx.count('pact', a - 1, b + 1) == 0:
        # only characters punkt never splits a token at (the neighbours too: the middle stays
        # inside one token): one character of each class present
        dig, num, oth = idx.count('pdig', a, b), idx.count('pnum', a, b), idx.count('poth', a, b)
        if b - a > dig + num + oth or dig or oth:   # (a comma first: never before the tail)
            return a, b, (',' if num else '') + ('a' if b - a > dig + num + oth else '') + ('0' if dig else '') + ('+' if oth else '')
    if idx.count('cand', a - 2, b + 1) == b - a + 3 and idx.count('pcand', a - 2, b + 1) == 0:
        # periods only (a ? or ! among . ? ! makes the character before it a candidate): a run
        # of periods is one token, read the same whatever its length past 2 * REP_H (no string
        # punkt looks up is that long); it stays longer than that
        return a, b, '.' * (2 * REP_H + 1)
    x = idx.first_from('c1', a, b)
    y1 = idx.last_before('c1', b - 1)
    if x < b and y1 > x + 2 and idx.count('pbad', x, y1 + 1) == 0:
        # between two single-character tokens, with no ? ! or period that can end a token in
        # between (no token there can end a sentence) and a character that is no closing one
        # (the realignment after a break before the middle reads closing characters up to the
        # next space)
        if all(ch in _PUNKT_REALIGN for ch in text[x:x + 64]) and all(ch in _PUNKT_REALIGN for ch in text[max(x, y1 - 63):y1 + 1]):
            return None
        return x, y1 + 1, text[x] + ':' + text[y1]
    # the middle holds tokens that may end a sentence. In a stretch without whitespace punkt
    # weighs only the last candidate break of the stretch (each context starts at the stretch's
    # start, so earlier candidates overlap the later ones), and a context decides a break when
    # it holds a sentence-ending pair of tokens, whatever else it holds. So with the stretch's
    # last candidate in the tail, a middle reads as nothing when the text before it holds such
    # a pair already, or when the middle itself holds none (both found by _sentence_ends).
    # The middle lies between two anchors (_anchor_from), kept around a ':'. A stretch without
    # candidates is read only as the token after an earlier one (the whole stretch: its context).
    pk = _last_candidate(text, idx, z, z2)
    if pk < 0 and idx.candidates().count('pcand', z, z2 - 1) == 0:
        pk = z2
    if pk < 0:
        return None
    xa, ya = _anchor_from(text, idx, a, min(b, pk)), _anchor_before(text, idx, min(b, pk))
    if xa is None or ya is None or ya[0] <= xa[1] + 2:
        return None
    if all(ch in _PUNKT_REALIGN for ch in text[z:xa[1]]):   # (the realignment could read into the middle)
        return None
    found, clean = _sentence_ends(tok, text, idx, memo, z, ya)
    if found >= 0:
        xa = _anchor_from(text, idx, max(xa[0], found + 1), ya[0])
    elif clean < ya[0] - 64 or _sentence_break_in(tok, text[clean:ya[1]]):
        return None
    if xa is None or ya[0] <= xa[1] + 2:
        return None
    return xa[0], ya[1], text[xa[0]:xa[1]] + ':' + text[ya[0]:ya[1]]


_RUN_MAX = 8   # runs of periods up to this long are anchors


def _anchor_from(text, idx, x, y, tries=64):
    """An anchor [s, e) with x <= s and e <= y, the first one unless many other token breaks come
    first (None: none found): a token that splits the text the same way whatever surrounds it,
    so that punkt reads a piece of text between two anchors as it reads it inside the whole: a
    single-character token (_PUNKT_C1; these never end a sentence) or a run of two to _RUN_MAX
    periods (MultiChar: always a token of its own; an ellipsis, which may end a sentence)."""
    c = idx.first_from('c1', x, y)
    best = (c, c + 1) if c + 1 <= y else None
    pact = idx.pos['pact']
    k = bisect.bisect_left(pact, x)
    for _ in range(tries):
        if k >= len(pact) or pact[k] >= (best[0] if best else y):
            break
        r = _period_run(text, pact[k])
        if r is not None and r[1] <= y:
            return r
        k += 1
    return best


def _anchor_before(text, idx, y, tries=64):
    """An anchor [s, e) with e <= y, the last one unless many other token breaks come last (None:
    none found)."""
    c = idx.last_before('c1', y - 1)
    best = (c, c + 1) if c >= 0 else None
    pact = idx.pos['pact']
    k = bisect.bisect_left(pact, y) - 1
    for _ in range(tries):
        if k < 0 or (best is not None and pact[k] <= best[0]):
            break
        r = _period_run(text, pact[k])
        if r is not None and r[1] <= y:
            return r
        k -= 1
    return best


def _period_run(text, p):
    # (p, end) if a run of two to _RUN_MAX periods starts at p (and ends inside the text), else None
    if text[p:p + 2] != '..' or (p > 0 and text[p - 1] == '.'):
        return None
    e = p + 2
    while e < len(text) and e <= p + _RUN_MAX and text[e] == '.':
        e += 1
    return (p, e) if e - p <= _RUN_MAX and e < len(text) else None


def _sentence_break_in(tok, text):
    """punkt's text_contains_sentbreak, not memoised (these texts do not repeat)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    return PunktSentenceTokenizer.text_contains_sentbreak(tok, text)


def _last_candidate(text, idx, z, z2, tries=64):
    """The last . ? ! of the stretch [z, z2) followed (inside it) by a character that punkt's
    candidate pattern accepts after it (-1 if none among the last `tries`)."""
    cand = idx.pos['cand']
    nonword = _punkt_nonword()
    k = bisect.bisect_left(cand, z2 - 1) - 1
    for _ in range(tries):
        if k < 0 or cand[k] < z:
            return -1
        if nonword.match(text, cand[k] + 1):
            return cand[k]
        k -= 1
    return -1


@lru_cache(maxsize=None)
def _punkt_nonword():
    return re.compile(_punkt_lang_vars()._re_non_word_chars)


@lru_cache(maxsize=None)
def _punkt_lang_vars():
    # punkt's default (English) language variables: those of the tokenizer punkt_tokenizer makes,
    # as of PunktTokenizer('english')
    from nltk.tokenize.punkt import PunktLanguageVars
    return PunktLanguageVars()


def _sentence_ends(tok, text, idx, memo, z, y):
    """(found, clean) for the stretch starting at z, read up to the anchor y (its span, see
    _anchor_from): found: a position such that text[z:found + 1] holds a sentence-ending pair of
    tokens (-1: none up to clean); clean: the start of an anchor such that no pair of tokens
    whose first one starts before it is a sentence-ending one. Read in pieces that start at an
    anchor and end with the next one (so every pair of tokens lies in a piece, its first one not
    the piece's last), each once per stretch (cached in memo, a dict: stretch start -> what has
    been read)."""
    memo = memo.setdefault(z, [z, -1])   # [clean up to, found]
    while memo[1] < 0:
        v = memo[0]
        u = _anchor_from(text, idx, v + 64, y[1])   # the next piece: text[v:u[1]]
        if u is None:
            break
        if _sentence_break_in(tok, text[v:u[1]]):
            memo[1] = u[1] - 1
        else:
            memo[0] = u[0]
    return memo[1], memo[0]

