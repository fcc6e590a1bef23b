"""prepare.py end to end on small inputs: binaries read back, split, shards, bad input."""
import os
import sys
import json
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metadata as md  # noqa: E402

DOCS = [
    "Alice was beginning to get very tired of sitting by her sister on the bank.\r\n",
    "  It was the best of times,\tit was the worst of times. \u201cQuoted,\u201d she said \U0001F600",
    "Mr. Smith went to Washington. He didn't like New York in 2024!",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "The old man the boat.",
]

def run_prepare(args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--no_progress'] + args,
                          capture_output=True, text=True, cwd=cwd, timeout=600)

def write_inputs(d):
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(DOCS[:3]):
        (d / f'doc{i}.txt').write_bytes(t.encode('utf-8'))
    with open(d / 'more.jsonl', 'w', encoding='utf-8') as f:
        for t in DOCS[3:]:
            f.write(json.dumps({'text': t, 'id': 1}) + '\n')
    return d

def read_dataset(out):
    meta = json.load(open(out / 'meta.json'))
    data = {}
    for split in ('train', 'val'):
        data[split] = np.fromfile(out / f'{split}.bin', dtype=np.uint16)
        for s in meta['streams']:
            data[f'{split}.{s}'] = np.fromfile(out / f'{split}.{s}.bin', dtype=np.uint16)
    return meta, data

def docs_of(ids):
    enc = md.encoding()
    return [enc.decode_bytes(ids[a:b].tolist()).decode('utf-8') for a, b in md.split_documents(ids.astype(np.int64))]

def test_end_to_end(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'binary', '--tags', 'full',
                     '--val_fraction', '0.4', '--workers', '2'])
    assert r.returncode == 0, r.stderr
    meta, data = read_dataset(out)
    assert meta['vocab_size'] == 50257 and meta['tokenizer'] == 'gpt2' and meta['tokenization'] == 'lime'
    assert meta['ner'] == 'binary' and set(meta['streams']) == {'pos', 'ner', 'word'}
    assert meta['streams']['ner']['tags'] == md.stream_tags('ner', 'binary')
    assert meta['train_docs'] == 3 and meta['val_docs'] == 2
    assert meta['train_tokens'] == len(data['train']) and meta['val_tokens'] == len(data['val'])
    assert 'nltk' in meta['versions'] and 'tiktoken' in meta['versions']
    # lossless: every input document comes back exactly, once, each followed by <|endoftext|>
    assert sorted(docs_of(data['train']) + docs_of(data['val'])) == sorted(DOCS)
    for split in ('train', 'val'):
        ids = data[split]
        assert ids[-1] == 50256
        for s in meta['streams']:
            assert len(data[f'{split}.{s}']) == len(ids)
            assert (data[f'{split}.{s}'][ids == 50256] == md.PAD).all()
        # streams equal the library's annotation of each document
        for a, b in md.split_documents(ids.astype(np.int64)):
            text = md.encoding().decode_bytes(ids[a:b].tolist()).decode('utf-8')
            ids2, st = md.annotate_text(text, 'lime', 'binary')
            assert (ids2 == ids[a:b]).all()
            for s in meta['streams']:
                assert (st[s] == data[f'{split}.{s}'][a:b]).all()
    # deterministic: a second run (1 worker) writes identical files
    out2 = tmp_path / 'ds2'
    r = run_prepare(['--input', str(inp), '--out_dir', str(out2), '--ner', 'binary', '--tags', 'full',
                     '--val_fraction', '0.4', '--workers', '1'])
    assert r.returncode == 0, r.stderr
    for f in os.listdir(out):
        if f.endswith('.bin'):
            assert (out / f).read_bytes() == (out2 / f).read_bytes(), f
    # other seeds give other splits (by document)
    splits = set()
    for seed in range(6):
        o = tmp_path / f's{seed}'
        assert run_prepare(['--input', str(inp), '--out_dir', str(o), '--ner', 'none', '--tags', 'full',
                            '--val_fraction', '0.4', '--seed', str(seed), '--workers', '1']).returncode == 0
        splits.add(tuple(sorted(docs_of(read_dataset(o)[1]['val']))))
    assert len(splits) > 1

def test_shards_and_merge(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    common = ['--input', str(inp), '--ner', 'binary', '--tags', 'full', '--workers', '1', '--val_fraction', '0.2']
    assert run_prepare(common + ['--out_dir', str(tmp_path / 'all')]).returncode == 0
    for i in range(2):
        r = run_prepare(common + ['--out_dir', str(tmp_path / f'sh{i}'), '--num_shards', '2', '--shard_index', str(i)])
        assert r.returncode == 0, r.stderr
    r = run_prepare(['--merge', str(tmp_path / 'sh0'), str(tmp_path / 'sh1'), '--out_dir', str(tmp_path / 'merged')])
    assert r.returncode == 0, r.stderr
    m_all, d_all = read_dataset(tmp_path / 'all')
    m_mer, d_mer = read_dataset(tmp_path / 'merged')
    for split in ('train', 'val'):
        assert sorted(docs_of(d_all[split])) == sorted(docs_of(d_mer[split]))
    assert m_all['train_tokens'] == m_mer['train_tokens'] and m_all['val_docs'] == m_mer['val_docs']

def no_leftovers(tmp_path, out):
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(out.name + '.')]

@pytest.mark.parametrize('case', ['not_utf8', 'empty_dir', 'missing', 'bad_json', 'no_text', 'bad_ext'])
def test_bad_input(tmp_path, case):
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'ok.txt').write_text('A fine document.')
    target, expect = str(inp), None
    if case == 'not_utf8':
        (inp / 'latin.txt').write_bytes(b'caf\xe9')
        expect = 'latin.txt'
    elif case == 'empty_dir':
        (inp / 'ok.txt').unlink()
        expect = 'no documents'
    elif case == 'missing':
        target, expect = str(tmp_path / 'nope'), 'nope'
    elif case == 'bad_json':
        (inp / 'b.jsonl').write_text('{"text": "ok"}\n{not json\n')
        expect = 'b.jsonl:2'
    elif case == 'no_text':
        (inp / 'b.jsonl').write_text('{"text": "ok"}\n{"body": "x"}\n')
        expect = 'b.jsonl:2'
    elif case == 'bad_ext':
        (inp / 'x.csv').write_text('a,b')
        target, expect = str(inp / 'x.csv'), 'x.csv'
    out = tmp_path / 'out'
    r = run_prepare(['--input', target, '--out_dir', str(out), '--ner', 'binary', '--workers', '2'])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error:') and expect in lines[0], r.stderr
    no_leftovers(tmp_path, out)

def test_bad_input_keeps_existing_dataset(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    assert run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full']).returncode == 0
    before = (out / 'train.bin').read_bytes()
    (inp / 'zz.txt').write_bytes(b'\xff\xfe')
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full'])
    assert r.returncode != 0 and 'zz.txt' in r.stderr
    assert (out / 'train.bin').read_bytes() == before

@pytest.mark.parametrize('flag,value', [('--ner', 'fancy'), ('--tokenization', 'wordpiece'), ('--tags', 'full,future')])
def test_unknown_option_values(tmp_path, flag, value):
    r = run_prepare(['--input', str(tmp_path), '--out_dir', str(tmp_path / 'o'), flag, value])
    assert r.returncode != 0 and value.split(',')[-1] in r.stderr
    allowed = {'--ner': 'binary', '--tokenization': 'plain', '--tags': 'causal'}[flag]
    assert allowed in r.stderr

def test_small_vocab_tokenizer(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'small'
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'binary', '--tags', 'full',
                     '--tokenizer', 'gpt2-512', '--workers', '1'])
    assert r.returncode == 0, r.stderr
    meta, data = read_dataset(out)
    assert meta['tokenizer'] == 'gpt2-512' and meta['vocab_size'] == 513 and meta['eot_token'] == 512
    assert data['train'].max() == 512 and (data['train'] == 512).sum() == meta['train_docs']
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--tokenizer', 'bert'])
    assert r.returncode != 0 and 'gpt2-N' in r.stderr

def test_default_corpus_is_gutenberg():
    sys.path.insert(0, ROOT)
    import prepare
    refs = prepare.enumerate_documents(None)
    assert len(refs) >= 17 and all(k == 'gutenberg' for k, _, _ in refs)
