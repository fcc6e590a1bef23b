"""prepare.py end to end on small inputs: binaries read back, split, shards, bad input."""
import os
import sys
import json
import shutil
import signal
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

@pytest.mark.parametrize('case', ['not_utf8', 'empty_dir', 'missing', 'bad_json', 'no_text', 'bad_ext',
                                  'surrogate'])
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
    elif case == 'surrogate':
        (inp / 'b.jsonl').write_text('{"text": "ok"}\n{"text": "a \\ud800 b"}\n')
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

# -----------------------------------------------------------------------------
# reliability (issue 10): dead workers, signals, the output directory, merge checks, options

def run_hooked(hook, args, **kw):
    """prepare.main(args) in a subprocess whose process() first runs `hook` (Python code seeing
    `item`, the work item). Workers are forked, so they run the hooked function too."""
    code = (f"import os, sys, time, signal\nsys.path.insert(0, {ROOT!r})\nimport prepare\n"
            f"_orig = prepare.process\n"
            f"def process(item):\n    {hook}\n    return _orig(item)\n"
            f"prepare.process = process\nprepare.main({['--no_progress'] + args!r})\n")
    return subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)

def finish(proc, timeout):
    """stderr of proc once it exits; past the timeout it (and its workers) are killed: a hang."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f'prepare.py still running after {timeout} s (hung)')

def one_line_error(r_stderr, *expect):
    lines = r_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error:'), r_stderr
    for e in expect:
        assert e in lines[0], r_stderr
    return lines[0]

def leftovers(out):
    return sorted(p for p in os.listdir(out.parent) if p.startswith(out.name + '.'))

def children_of(pid):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []

def alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(') ')[-1][0] != 'Z'
    except OSError:
        return False

def test_dead_worker_ends_the_run(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    (inp / 'kill.txt').write_text('KILLME here.')
    out = tmp_path / 'ds'
    t0 = __import__('time').time()
    proc = run_hooked("if 'KILLME' in repr(item): os.kill(os.getpid(), signal.SIGKILL)",
                      ['--input', str(inp), '--out_dir', str(out), '--ner', 'binary', '--workers', '2'])
    err = finish(proc, 90)
    assert proc.returncode == 1
    one_line_error(err, 'worker died', 'SIGKILL')
    assert __import__('time').time() - t0 < 60
    assert not out.exists() and leftovers(out) == []

def test_sigterm_cleans_up(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    proc = run_hooked("time.sleep(600)", ['--input', str(inp), '--out_dir', str(out), '--ner', 'none',
                                          '--workers', '2'])
    import time
    t0 = time.time()
    while not leftovers(out) and time.time() - t0 < 60:
        time.sleep(0.05)
    if not leftovers(out):
        finish(proc, 0.1)
        raise AssertionError('no temporary directory appeared')
    workers = children_of(proc.pid)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, 60)
    assert proc.returncode == 128 + signal.SIGTERM
    one_line_error(err, 'SIGTERM')
    assert not out.exists() and leftovers(out) == []
    time.sleep(0.5)
    assert not [w for w in workers if alive(w)], 'worker processes left running'

def test_out_dir_forms(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    common = ['--input', str(inp), '--ner', 'none', '--tags', 'full', '--workers', '1']
    out = tmp_path / 'ds'
    assert run_prepare(common + ['--out_dir', str(out)]).returncode == 0
    first = (out / 'train.bin').read_bytes()
    # an existing DIR given as DIR/: replaced, nothing orphaned
    r = run_prepare(common + ['--out_dir', str(out) + '/'])
    assert r.returncode == 0, r.stderr
    assert (out / 'train.bin').read_bytes() == first and leftovers(out) == []
    # a symlink: the dataset goes to its target, the link stays
    target = tmp_path / 'real'
    link = tmp_path / 'link'
    link.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # new target, then replacing it
        r = run_prepare(common + ['--out_dir', str(link)])
        assert r.returncode == 0, r.stderr
        assert link.is_symlink() and (target / 'train.bin').read_bytes() == first
        assert leftovers(link) == [] and leftovers(target) == []
    # a file, or a directory that holds other things: refused before any work, left alone
    f = tmp_path / 'afile'
    f.write_text('keep me')
    r = run_prepare(common + ['--out_dir', str(f)])
    assert r.returncode != 0
    one_line_error(r.stderr, 'afile', 'not a directory')
    assert f.read_text() == 'keep me' and leftovers(f) == []
    r = run_prepare(common + ['--out_dir', str(inp)])
    assert r.returncode != 0
    one_line_error(r.stderr, 'did not write')
    assert sorted(os.listdir(inp)) == ['doc0.txt', 'doc1.txt', 'doc2.txt', 'more.jsonl']

def test_disk_full_at_the_final_flush(tmp_path):
    """A file-size limit makes the buffered writes fail (EFBIG) when they are flushed at the end:
    one line, the temporary directory removed, the old dataset kept."""
    import resource
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    common = ['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full', '--workers', '1']
    assert run_prepare(common).returncode == 0
    before = (out / 'train.bin').read_bytes()
    assert len(before) > 100

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--no_progress'] + common,
                       capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 1
    one_line_error(r.stderr, str(out), 'cannot write')
    assert leftovers(out) == [] and (out / 'train.bin').read_bytes() == before

def test_stale_temporary_dirs_removed(tmp_path):
    import socket
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = socket.gethostname()
    stale = [f'ds.tmp-{dead.pid}', f'ds.tmp-{host}-{dead.pid}', f'ds.old-{host}-{dead.pid}']
    kept = [f'ds.tmp-{host}-{os.getpid()}', f'ds.tmp-otherhost-{dead.pid}', 'ds.backup']
    for n in stale + kept:
        (tmp_path / n).mkdir()
        (tmp_path / n / 'train.bin').write_bytes(b'xx')
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full',
                     '--workers', '1'])
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == sorted(kept)
    assert 'otherhost' in r.stderr and all(n in r.stderr for n in stale)

def test_every_input_checked_before_tagging(tmp_path):
    """A bad file late in the corpus fails the run before any document is tagged."""
    inp = write_inputs(tmp_path / 'in')
    (inp / 'zz_latin.txt').write_bytes(b'ok ' * 1000 + b'caf\xe9')
    out = tmp_path / 'ds'
    flag = tmp_path / 'tagged'
    proc = run_hooked(f"open({str(flag)!r}, 'w').close()",
                      ['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--workers', '1'])
    err = finish(proc, 300)
    assert proc.returncode == 1
    one_line_error(err, 'zz_latin.txt', 'UTF-8', 'byte 3003')
    assert not flag.exists() and not out.exists() and leftovers(out) == []

def test_symlinked_subdirectories_followed(tmp_path):
    inp = tmp_path / 'in'
    (inp / 'real').mkdir(parents=True)
    (inp / 'real' / 'a.txt').write_text(DOCS[0])
    other = tmp_path / 'elsewhere'
    other.mkdir()
    (other / 'b.txt').write_text(DOCS[1])
    (inp / 'linked').symlink_to(other, target_is_directory=True)
    (inp / 'loop').symlink_to(inp, target_is_directory=True)           # a loop: read once
    (inp / 'real' / 'again').symlink_to(other, target_is_directory=True)  # a second link: read once
    out = tmp_path / 'ds'
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full',
                     '--val_fraction', '0', '--workers', '1'])
    assert r.returncode == 0, r.stderr
    meta, data = read_dataset(out)
    assert sorted(docs_of(data['train'])) == sorted(DOCS[:2])

def test_text_rules_bom_and_literal_endoftext(tmp_path):
    """A leading UTF-8 BOM of a .txt document (or of a .jsonl file) is dropped; a literal
    '<|endoftext|>' inside a document is ordinary text (tokenized like any text), never the
    special token, which appears only between documents."""
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'a.txt').write_bytes('\ufeffHello there.'.encode('utf-8'))
    (inp / 'b.txt').write_text('Before <|endoftext|> after.')
    (inp / 'c.jsonl').write_bytes('\ufeff{"text": "Json <|endoftext|>"}\n'.encode('utf-8'))
    out = tmp_path / 'ds'
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'binary', '--tags', 'full',
                     '--val_fraction', '0', '--workers', '1'])
    assert r.returncode == 0, r.stderr
    meta, data = read_dataset(out)
    ids = data['train']
    assert docs_of(ids) == ['Hello there.', 'Before <|endoftext|> after.', 'Json <|endoftext|>']
    enc = md.encoding()
    assert (ids == enc.eot_token).sum() == 3 and ids[-1] == enc.eot_token
    assert list(ids[:len(enc.encode_ordinary('Hello there.'))]) == enc.encode_ordinary('Hello there.')
    lit = enc.encode_ordinary('<|endoftext|>')
    assert len(lit) == 7 and enc.eot_token not in lit  # plain BPE: 7 ordinary tokens
    for text, (a, b) in zip(docs_of(ids), md.split_documents(ids.astype(np.int64))):
        assert list(ids[a:b]) == list(md.annotate_text(text, 'lime', 'binary')[0])  # ordinary text

@pytest.mark.parametrize('args,expect', [
    (['--workers', '0'], '[1, 1024]'), (['--workers=-3'], '[1, 1024]'),
    (['--val_fraction', '1'], '[0, 1)'), (['--val_fraction=-0.1'], '[0, 1)'),
    (['--num_shards', '0'], '>= 1'), (['--num_shards', '2', '--shard_index', '2'], '[0, --num_shards=2)'),
    (['--shard_index=-1'], '[0, --num_shards=1)'), (['--seed=-5'], '>= 0')])
def test_option_ranges(tmp_path, args, expect):
    inp = write_inputs(tmp_path / 'in')
    r = run_prepare(['--input', str(inp), '--out_dir', str(tmp_path / 'o')] + args)
    assert r.returncode != 0
    one_line_error(r.stderr, args[-1].split('=')[-1], expect)
    assert not (tmp_path / 'o').exists() and leftovers(tmp_path / 'o') == []

@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """Shards 0 and 1 of 2 (seed 1337) and shard 1 of 2 with another seed."""
    d = tmp_path_factory.mktemp('shards')
    inp = write_inputs(d / 'in')
    common = ['--input', str(inp), '--ner', 'none', '--tags', 'full', '--workers', '1', '--num_shards', '2']
    for name, extra in (('s0', ['--shard_index', '0']), ('s1', ['--shard_index', '1']),
                        ('t1', ['--shard_index', '1', '--seed', '7'])):
        r = run_prepare(common + extra + ['--out_dir', str(d / name)])
        assert r.returncode == 0, r.stderr
    return d

@pytest.mark.parametrize('case', ['duplicate', 'same_index', 'gap', 'seed', 'incomplete', 'missing_stream',
                                  'truncated', 'not_json'])
def test_merge_refuses_wrong_shards(shards, tmp_path, case):
    d = tmp_path / 'copy'
    shutil.copytree(shards, d)
    s0, s1, t1 = str(d / 's0'), str(d / 's1'), str(d / 't1')
    dirs, expect = [s0, s1], []
    if case == 'duplicate':
        dirs, expect = [s0, s0], ['shard 0 of 2 given twice']
    elif case == 'same_index':
        shutil.copytree(d / 's0', d / 's0b')
        dirs, expect = [s0, str(d / 's0b'), s1], ['s0b', 'given twice']
    elif case == 'gap':
        dirs, expect = [s1], ['shard 0 of 2 is missing']
    elif case == 'seed':
        dirs, expect = [s0, t1], ['t1', 'seed 7 differs from 1337']
    elif case == 'incomplete':
        (d / 's1' / 'meta.json').unlink()
        expect = ['s1', 'incomplete shard']
    elif case == 'missing_stream':
        (d / 's1' / 'val.pos.bin').unlink()
        expect = ['val.pos.bin', 'missing']
    elif case == 'truncated':
        with open(d / 's0' / 'train.bin', 'r+b') as f:
            f.truncate(10)
        expect = ['s0/train.bin', 'bytes']
    elif case == 'not_json':
        (d / 's0' / 'meta.json').write_text('{oops')
        expect = ['s0/meta.json', 'cannot read']
    out = tmp_path / 'merged'
    r = run_prepare(['--merge'] + dirs + ['--out_dir', str(out)])
    assert r.returncode != 0
    one_line_error(r.stderr, *expect)
    assert not out.exists() and leftovers(out) == []

def test_merge_any_order(shards, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert run_prepare(['--merge', str(shards / 's0'), str(shards / 's1'), '--out_dir', str(a)]).returncode == 0
    assert run_prepare(['--merge', str(shards / 's1'), str(shards / 's0'), '--out_dir', str(b)]).returncode == 0
    for f in os.listdir(a):
        if f.endswith('.bin'):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    meta = json.load(open(a / 'meta.json'))
    assert meta['num_shards'] == 1 and meta['shard_index'] == 0
