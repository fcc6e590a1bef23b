"""Shared test helpers: the repo root on sys.path, and tiny dataset directories in prepare.py's format."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPECIAL = ['<pad>', '<space>', '<unk>']


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
