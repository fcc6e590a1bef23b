"""Shared test helpers: the repo root on sys.path, and tiny dataset directories in prepare.py's format."""
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPECIAL = ['<pad>', '<space>', '<unk>']

# metadata.py's disk cache of the models' tables: a fresh directory for the test session (set
# before any test module loads a model; subprocesses inherit it), never the user's ~/.cache/lime
CACHE_DIR = os.environ['LIME_CACHE_DIR'] = tempfile.mkdtemp(prefix='lime-test-cache-')
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)


def write_dataset(d, n_train=20000, n_val=4000, vocab_size=64, n_pos=8, seed=0):
    """A dataset dir whose next token is a fixed function of its own 'pos' tag, tags drawn i.i.d.:
    the past says nothing about the next token, but the next token's tag says everything.
    Streams: pos (n_pos real tags), ner (binary), word (B/I). eot = vocab_size-1 with <pad> tags."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    eot = vocab_size - 1
    streams = {'pos': {'tags': SPECIAL + [f'T{i}' for i in range(n_pos)]},
               'ner': {'tags': SPECIAL + ['O', 'ENT']},
               'word': {'tags': SPECIAL + ['B', 'I']}}
    for split, n in (('train', n_train), ('val', n_val)):
        pos = rng.integers(3, 3 + n_pos, n)
        tok = (pos - 3) * 3 + 1  # one token per tag
        ner = rng.integers(3, 5, n)
        word = rng.integers(3, 5, n)
        doc_end = rng.random(n) < 0.005
        tok[doc_end] = eot
        for s in (pos, ner, word):
            s[doc_end] = 0
        for name, arr in (('', tok), ('.pos', pos), ('.ner', ner), ('.word', word)):
            arr.astype(np.uint16).tofile(d / f'{split}{name}.bin')
    meta = dict(vocab_size=vocab_size, tokenizer='test', eot_token=eot, tokenization='lime', ner='binary',
                special=dict(pad=0, space=1, unk=2), streams=streams, train_tokens=n_train, val_tokens=n_val)
    (d / 'meta.json').write_text(json.dumps(meta))
    return d


def write_markov_dataset(d, n_train=30000, n_val=6000, n_tags=4, class_size=4, stay=0.7, seed=0):
    """A dataset whose entropy is known exactly: tags follow a Markov chain (next tag = the current
    one + 1 (mod n_tags) with probability stay, else uniform over the others) and each token is
    uniform over its tag's class of class_size tokens (disjoint classes, so the tag is a function of
    the token). Stream 'pos_causal' holds the tags (a token's tag is a function of the token itself).
    Returns (dir, nll): nll[t] = -log p(val token t | val tokens < t) under the true process (nll[0] =
    0: not a target), so its mean over any set of targets is what no model of the text can beat
    beyond noise."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    P = np.full((n_tags, n_tags), (1 - stay) / (n_tags - 1))
    for a in range(n_tags):
        P[a, (a + 1) % n_tags] = stay
    vocab = n_tags * class_size + 1
    streams = {'pos_causal': {'tags': SPECIAL + [f'T{i}' for i in range(n_tags)]}}
    nll = None
    for split, n in (('train', n_train), ('val', n_val)):
        tag = np.zeros(n, np.int64)
        u = rng.random(n)
        cum = P.cumsum(1)
        for t in range(1, n):
            tag[t] = min(int(np.searchsorted(cum[tag[t - 1]], u[t], side='right')), n_tags - 1)
        tok = tag * class_size + rng.integers(0, class_size, n)
        (tok.astype(np.uint16)).tofile(d / f'{split}.bin')
        (tag + 3).astype(np.uint16).tofile(d / f'{split}.pos_causal.bin')
        if split == 'val':
            nll = np.concatenate([[0.0], -np.log(P[tag[:-1], tag[1:]] / class_size)])
    meta = dict(vocab_size=vocab, tokenizer='test', eot_token=vocab - 1, tokenization='lime', ner='binary',
                special=dict(pad=0, space=1, unk=2), streams=streams, train_tokens=n_train, val_tokens=n_val)
    (d / 'meta.json').write_text(json.dumps(meta))
    return d, nll


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / 'data')


class RunsCode:
    """A pickled object that runs a shell command when unpickled by an unsafe torch.load
    (weights_only=False): put one in a checkpoint and a loader that executes it creates marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)
