"""prepare.py end to end on small inputs: binaries read back, split, shards, bad input."""
import os
import sys
import gzip
import json
import time
import shutil
import hashlib
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

def run_prepare(args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--no_progress'] + args,
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)

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
    md.set_tokenizer('gpt2')  # these datasets' (an earlier test module may have left another one set)
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
    # README's split: the 3 .txt files by a seeded permutation (round(3 * 0.4) = 1 in val), the
    # 2 JSONL records by blake2b of (seed, path without extension, line index)
    val_txt = np.random.default_rng(1337).permutation(3)[:1].tolist()
    val = [DOCS[i] for i in val_txt] + [t for i, t in enumerate(DOCS[3:]) if record_in_val('more', i, fraction=0.4)]
    assert sorted(docs_of(data['val'])) == sorted(val) and meta['val_docs'] == len(val)
    assert meta['train_docs'] == 5 - len(val)
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
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full', '--overwrite'])
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
    units = prepare.list_units(prepare.p.parse_args([]))[0]
    assert len(units) >= 17 and all(k == 'gutenberg' for k, _, _ in units)
    texts = [text for u in units[:2] for _, _, text in prepare.read_unit(u, 'text')]
    from nltk.corpus import gutenberg
    assert texts == [gutenberg.raw(f) for _, f, _ in units[:2]]

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
    t0 = time.time()
    proc = run_hooked("if 'KILLME' in repr(item): os.kill(os.getpid(), signal.SIGKILL)",
                      ['--input', str(inp), '--out_dir', str(out), '--ner', 'binary', '--workers', '2'])
    err = finish(proc, 90)
    assert proc.returncode == 1
    one_line_error(err, 'worker died', 'SIGKILL')
    assert time.time() - t0 < 60
    assert not out.exists() and leftovers(out) == []

def test_sigterm_cleans_up(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    proc = run_hooked("time.sleep(600)", ['--input', str(inp), '--out_dir', str(out), '--ner', 'none',
                                          '--workers', '2'])
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
    # an existing DIR given as DIR/: replaced (--overwrite), nothing orphaned
    r = run_prepare(common + ['--out_dir', str(out) + '/', '--overwrite'])
    assert r.returncode == 0, r.stderr
    assert (out / 'train.bin').read_bytes() == first and leftovers(out) == []
    # a symlink: the dataset goes to its target, the link stays
    target = tmp_path / 'real'
    link = tmp_path / 'link'
    link.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # new target, then replacing it
        r = run_prepare(common + ['--out_dir', str(link), '--overwrite'])
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
    r = run_prepare(common + ['--out_dir', str(inp), '--overwrite'])
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
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--no_progress', '--overwrite'] + common,
                       capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 1
    one_line_error(r.stderr, str(out), 'cannot write')
    assert leftovers(out) == [] and (out / 'train.bin').read_bytes() == before

def dead_pid():
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    return dead.pid

def test_stale_temporary_dirs_removed_users_dirs_kept(tmp_path):
    """Leftovers of dead runs on this host that hold prepare.py's marker are removed; a user's
    directories with look-alike names (no marker, or a marker naming another directory) are not."""
    import socket
    sys.path.insert(0, ROOT)
    import prepare
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    host, dead, dead2 = socket.gethostname(), dead_pid(), dead_pid()
    stale = [f'ds.tmp-{host}-{dead}', f'ds.old-{host}-{dead}']
    kept = [f'ds.tmp-{host}-{os.getpid()}', f'ds.tmp-otherhost-{dead}']  # alive, another machine's
    users = ['ds.old-2024', 'ds.tmp-99999', f'ds.tmp-{dead2}', f'ds.old-{dead2}', f'ds.old-{host}-{dead2}',
             f'ds.tmp-{host}-{dead2}', 'ds.backup']
    for n in stale + kept + users:
        (tmp_path / n).mkdir()
        (tmp_path / n / 'train.bin').write_bytes(b'xx')
        if n in stale + kept:
            prepare.mark(str(tmp_path / n))
    (tmp_path / 'ds.old-2024' / 'a.txt').write_text('notes')
    (tmp_path / f'ds.tmp-{host}-{dead2}' / prepare.MARK).write_text(stale[0])  # copied from elsewhere
    r = run_prepare(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full',
                     '--workers', '1'])
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == sorted(kept + users)
    assert (tmp_path / 'ds.old-2024' / 'a.txt').read_text() == 'notes'
    assert all((tmp_path / n / 'train.bin').read_bytes() == b'xx' for n in kept + users)
    assert 'otherhost' in r.stderr and all(n in r.stderr for n in stale)
    assert not [n for n in users if n in r.stderr]
    assert not os.path.exists(out / prepare.MARK)  # the marker never stays in a dataset

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
    (['--shard_index=-1'], '[0, --num_shards=1)'), (['--seed=-5'], '>= 0'),
    (['--max_doc_bytes=0'], '>= 1'), (['--tags=full,full'], 'given twice'),
    (['--tags=causal,full,causal'], 'full, causal')])
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

# -----------------------------------------------------------------------------
# corpus scale (issue 14): formats, shards that read only their own files, restarts, Slurm,
# pieces of long documents

RECORDS = DOCS + ['A second look at the same bank.', '', 'Short.', 'Dr. Who? Yes. "Quote!" she said.',
                  'Visit New York in May.', 'The end.']
HF_ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}

def write_records(path, texts, field='text'):
    """texts as one file in the format its name gives (.jsonl, .jsonl.gz, .jsonl.zst, .parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith('.parquet'):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({'id': list(range(len(texts))), field: texts}), str(path), row_group_size=3)
        return path
    data = ''.join(json.dumps({field: t, 'id': i}) + '\n' for i, t in enumerate(texts)).encode('utf-8')
    if path.name.endswith('.gz'):
        data = gzip.compress(data)
    elif path.name.endswith(('.zst', '.zstd')):
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path

def record_in_val(key, index, seed=1337, fraction=0.1):
    """README's rule for a record (a JSONL line, a parquet row): blake2b-64 of seed, key, index."""
    h = hashlib.blake2b(f'{seed}\0{key}\0{index}'.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(h, 'big') < fraction * 2 ** 64

RUN_KEYS = {'elapsed_s', 'words_per_sec', 'versions', 'shard_from', 'merged_from'}

def same_dataset(a, b, ignore=()):
    names = sorted(n for n in os.listdir(a) if n.endswith('.bin'))
    assert names == sorted(n for n in os.listdir(b) if n.endswith('.bin'))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ma, mb = json.load(open(a / 'meta.json')), json.load(open(b / 'meta.json'))
    skip = RUN_KEYS | set(ignore)
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}

def test_formats_equal_jsonl(tmp_path):
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst(d) and .parquet (3 rows per row group):
    identical datasets, split by README's rule (key = path without extension, 0-based index);
    as a Hugging Face dataset (a local directory, streamed): the same documents."""
    outs = {}
    for fmt in ('jsonl', 'jsonl.gz', 'jsonl.zst', 'jsonl.zstd', 'parquet'):  # DCLM: .jsonl.zstd
        d = write_records(tmp_path / fmt.replace('.', '_') / f'part.{fmt}', RECORDS, field='body').parent
        outs[fmt] = tmp_path / f'ds_{fmt}'
        r = run_prepare(['--input', str(d), '--out_dir', str(outs[fmt]), '--ner', 'binary', '--tags', 'full',
                         '--text_field', 'body', '--val_fraction', '0.4', '--workers', '1'])
        assert r.returncode == 0, r.stderr
    meta, data = read_dataset(outs['jsonl'])
    val = [t for i, t in enumerate(RECORDS) if t and record_in_val('part', i, fraction=0.4)]
    train = [t for i, t in enumerate(RECORDS) if t and not record_in_val('part', i, fraction=0.4)]
    assert val and train
    assert docs_of(data['val']) == val and docs_of(data['train']) == train
    assert meta['val_docs'] == len(val) and meta['train_docs'] == len(train)
    for fmt in ('jsonl.gz', 'jsonl.zst', 'jsonl.zstd', 'parquet'):
        same_dataset(outs['jsonl'], outs[fmt], ignore=['inputs'])
    out = tmp_path / 'ds_hf'
    r = run_prepare(['--hf_dataset', str(tmp_path / 'parquet'), '--out_dir', str(out), '--ner', 'binary',
                     '--tags', 'full', '--text_field', 'body', '--val_fraction', '0', '--workers', '1'],
                    env={**os.environ, **HF_ENV, 'HF_HOME': str(tmp_path / 'hf_home')})
    assert r.returncode == 0, r.stderr
    meta, data = read_dataset(out)
    assert docs_of(data['train']) == [t for t in RECORDS if t] and meta['val_docs'] == 0
    assert meta['inputs'] == [f'hf:{tmp_path / "parquet"}::train']

def mixed_corpus(d):
    """Six input files of four formats: units 0-5 in listing order."""
    d.mkdir(parents=True)
    for i, name in enumerate(['a.txt', 'b.txt', 'c.txt']):
        (d / name).write_text(DOCS[i] + ' ' + RECORDS[-1 - i])
    write_records(d / 'd.jsonl', RECORDS[:6])
    write_records(d / 'e.jsonl.zst', RECORDS[6:] + DOCS[:2])
    write_records(d / 'f.parquet', DOCS[2:] + RECORDS[7:])
    return sorted(os.listdir(d))

def test_shards_read_only_their_files_and_merge_into_one_run(tmp_path):
    """3 shards from a Slurm job array (--array=1-3): shard i reads files i, i+3 only (the
    others are garbage while it runs), and the merge equals one unsharded run byte for byte."""
    inp = tmp_path / 'in'
    names = mixed_corpus(inp)
    common = ['--input', str(inp), '--ner', 'binary', '--tags', 'full,causal', '--workers', '2',
              '--val_fraction', '0.3']
    r = run_prepare(common + ['--out_dir', str(tmp_path / 'all')])
    assert r.returncode == 0, r.stderr
    real = {n: (inp / n).read_bytes() for n in names}
    for i in range(3):
        for j, n in enumerate(names):
            (inp / n).write_bytes(real[n] if j % 3 == i else b'\xff\xfe not this shard \x00')
        env = {**os.environ, 'SLURM_ARRAY_TASK_ID': str(i + 1), 'SLURM_ARRAY_TASK_MIN': '1',
               'SLURM_ARRAY_TASK_COUNT': '3'}
        r = run_prepare(common + ['--out_dir', str(tmp_path / f'sh{i}')], env=env)
        assert r.returncode == 0, r.stderr
        m = json.load(open(tmp_path / f'sh{i}' / 'meta.json'))
        assert (m['shard_index'], m['num_shards']) == (i, 3) and 'SLURM_ARRAY_TASK_ID' in m['shard_from']
        assert [u[0] for u in m['units']] == [i, i + 3]
    for n in names:
        (inp / n).write_bytes(real[n])
    merged = tmp_path / 'merged'
    r = run_prepare(['--merge', str(tmp_path / 'sh2'), str(tmp_path / 'sh0'), str(tmp_path / 'sh1'),
                     '--out_dir', str(merged)])
    assert r.returncode == 0, r.stderr
    same_dataset(tmp_path / 'all', merged)
    meta, data = read_dataset(merged)
    assert meta['val_docs'] > 0 and meta['train_docs'] > 0 and 'pos_causal' in meta['streams']

def test_slurm_and_shard_count_errors(tmp_path):
    inp = write_inputs(tmp_path / 'in')  # 4 files
    env = {**os.environ, 'SLURM_ARRAY_TASK_ID': '4', 'SLURM_ARRAY_TASK_COUNT': '2'}  # --array=0-4:4
    r = run_prepare(['--input', str(inp), '--out_dir', str(tmp_path / 'o')], env=env)
    assert r.returncode != 0
    one_line_error(r.stderr, '--shard_index=4', '[0, --num_shards=2)', 'SLURM_ARRAY_TASK_ID')
    r = run_prepare(['--input', str(inp), '--out_dir', str(tmp_path / 'o'), '--num_shards', '5',
                     '--ner', 'none'])
    assert r.returncode != 0
    one_line_error(r.stderr, '--num_shards=5', 'only 4 files', 'at most 4')
    assert not (tmp_path / 'o').exists() and leftovers(tmp_path / 'o') == []

def test_killed_shard_reruns_cleanly_and_a_complete_one_is_skipped(tmp_path):
    inp = write_inputs(tmp_path / 'in')
    common = ['--input', str(inp), '--ner', 'none', '--tags', 'full', '--num_shards', '2', '--shard_index', '1',
              '--workers', '2']
    ref = tmp_path / 'ref'
    assert run_prepare(common + ['--out_dir', str(ref)]).returncode == 0
    out = tmp_path / 'sh1'
    proc = run_hooked('time.sleep(600)', common + ['--out_dir', str(out)])
    t0 = time.time()
    while not (leftovers(out) and children_of(proc.pid)) and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are at work (asleep in the hook)
    workers = children_of(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the main process, as the OOM killer would
    t0 = time.time()
    while [w for w in workers if alive(w)] and time.time() - t0 < 10:
        time.sleep(0.05)
    lingering = [w for w in workers if alive(w)]
    if lingering:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not lingering, 'workers outlived the main process'
    assert not out.exists() and len(leftovers(out)) == 1
    r = run_prepare(common + ['--out_dir', str(out)])
    assert r.returncode == 0, r.stderr
    assert 'removed' in r.stderr and leftovers(out) == []
    same_dataset(ref, out)
    stamp = (out / 'meta.json').stat().st_mtime_ns
    r = run_prepare(common + ['--out_dir', str(out)])
    assert r.returncode == 0 and 'already complete' in r.stdout and 'skipped' in r.stdout, r.stdout + r.stderr
    assert (out / 'meta.json').stat().st_mtime_ns == stamp
    r = run_prepare(common + ['--out_dir', str(out), '--seed', '5'])
    assert r.returncode != 0
    one_line_error(r.stderr, 'another seed', '--overwrite')
    r = run_prepare(common + ['--out_dir', str(out), '--overwrite'])
    assert r.returncode == 0, r.stderr
    assert (out / 'meta.json').stat().st_mtime_ns != stamp
    same_dataset(ref, out)

def run_without(package, args, **kw):
    code = (f"import sys\nsys.modules[{package!r}] = None\nsys.path.insert(0, {ROOT!r})\nimport prepare\n"
            f"prepare.main({['--no_progress'] + args!r})\n")
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, **kw)

@pytest.mark.parametrize('case', ['zst_garbage', 'zst_truncated', 'gz_truncated', 'gz_bad_record',
                                  'parquet_no_column', 'parquet_not_text', 'parquet_null', 'parquet_garbage',
                                  'hf_missing'])
def test_bad_records(tmp_path, case):
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'ok.txt').write_text('A fine document.')
    many = [f'Document number {i}.' for i in range(3000)]
    args, env = ['--input', str(inp)], None
    if case == 'zst_garbage':
        (inp / 'x.jsonl.zst').write_bytes(b'not zstd at all ' * 10)
        expect = ['x.jsonl.zst', 'corrupt or truncated', 'after line 0']
    elif case == 'zst_truncated':
        z = write_records(inp / 'x.jsonl.zst', many).read_bytes()
        (inp / 'x.jsonl.zst').write_bytes(z[:len(z) // 2])
        expect = ['x.jsonl.zst', 'truncated', 'after line']
    elif case == 'gz_truncated':
        z = write_records(inp / 'x.jsonl.gz', many).read_bytes()
        (inp / 'x.jsonl.gz').write_bytes(z[:len(z) // 2])
        expect = ['x.jsonl.gz', 'truncated', 'after line']
    elif case == 'gz_bad_record':
        (inp / 'x.jsonl.gz').write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": 5}\n'))
        expect = ['x.jsonl.gz:2', 'no string field "text"']
    elif case == 'parquet_no_column':
        write_records(inp / 'x.parquet', ['a', 'b'], field='body')
        expect = ['x.parquet', 'no column "text"', 'body']
    elif case == 'parquet_not_text':
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({'text': [1, 2]}), str(inp / 'x.parquet'))
        expect = ['x.parquet', 'column "text" holds int64']
    elif case == 'parquet_null':
        write_records(inp / 'x.parquet', ['a', 'b', 'c', None, 'e'])
        expect = ['x.parquet: row 3', 'null']
    elif case == 'parquet_garbage':
        (inp / 'x.parquet').write_bytes(b'PAR1 this is not parquet')
        expect = ['x.parquet', 'not a readable parquet file']
    elif case == 'hf_missing':
        args = ['--hf_dataset', str(tmp_path / 'nope')]
        env = {**os.environ, **HF_ENV, 'HF_HOME': str(tmp_path / 'hf_home')}
        expect = ['--hf_dataset', 'nope', 'cannot load']
    out = tmp_path / 'out'
    r = run_prepare(args + ['--out_dir', str(out), '--ner', 'none', '--tags', 'full', '--workers', '2'], env=env)
    assert r.returncode == 1
    one_line_error(r.stderr, *expect)
    no_leftovers(tmp_path, out)

@pytest.mark.parametrize('package,pip,name', [('zstandard', 'zstandard', 'x.jsonl.zst'),
                                              ('pyarrow', 'pyarrow', 'x.parquet'),
                                              ('datasets', 'datasets', 'hf')])
def test_missing_optional_package(tmp_path, package, pip, name):
    inp = tmp_path / 'in'
    if name == 'hf':
        args = ['--hf_dataset', 'some/dataset']
    else:
        write_records(inp / name, ['One.', 'Two.'])
        args = ['--input', str(inp)]
    out = tmp_path / 'out'
    r = run_without(package, args + ['--out_dir', str(out), '--ner', 'none', '--workers', '1'])
    assert r.returncode == 1
    one_line_error(r.stderr, f'needs the {package} package (pip install {pip})')
    no_leftovers(tmp_path, out)

TEMPT = ('Mr. Smith met Dr. Jones. He said no. Then J. R. R. Tolkien wrote. It was 3 p.m. Then they left. '
         'See e.g. this. The U.S. Army came. Is it? Yes! "Stop." He ran. (It was late.) Then dawn. '
         'Chapter 3. The end. Etc. And so on. Them vs. us. No. 5 is here. Jan. 5 was cold. It cost $5. Then '
         'more.\n\nReally?\n\nYes.\r\nOK!  Fine. \tGo. A. B. C. Done... And then. Wow!!! Hi. i.e. that. '
         'St. Paul. Co. Ltd. Inc. Fine. Ms. Lee and Mrs. Lee. Gen. Grant. Prof. X? Sure. ok. so. '
         'He left.\u201d She stayed. It ended.) Then. 2nd. Third! Fourth? fifth. Sixth.\n')

def test_pieces_equal_whole_documents():
    """A long document is tagged in pieces (balanced work); cut where README's rule says, the
    pieces' tokens, full and causal tags, both tokenizations, equal the whole document's."""
    import prepare
    from nltk.corpus import gutenberg
    cases = [(TEMPT * 3, 1)]  # size 1: a cut at every point the rule allows
    for book, n in (('austen-emma.txt', 30000), ('melville-moby_dick.txt', 30000), ('whitman-leaves.txt', 20000),
                    ('shakespeare-hamlet.txt', 20000)):
        cases.append((gutenberg.raw(book)[:n], 400))
    for text, size in cases:
        pieces = prepare.cut_document(text, size)
        assert ''.join(pieces) == text and len(pieces) >= 10, len(pieces)
        for tokenization in ('lime', 'plain'):
            ids, full = md.annotate_text(text, tokenization, 'binary')
            causal = md.annotate_ids(ids, 'binary', 'causal')
            parts = [md.annotate_text(piece, tokenization, 'binary') for piece in pieces]
            assert np.array_equal(np.concatenate([i for i, _ in parts]), ids)
            for k in full:
                assert np.array_equal(np.concatenate([s[k] for _, s in parts]), full[k]), (k, tokenization)
            pc = [md.annotate_ids(i, 'binary', 'causal') for i, _ in parts]
            for k in causal:
                assert np.array_equal(np.concatenate([c[k] for c in pc]), causal[k]), (k, tokenization)
    assert prepare.cut_document('Short text. Here it is.', 1 << 17) == ['Short text. Here it is.']

def test_long_documents_spread_over_workers(tmp_path):
    """--chunk_chars 2000: a 60k-character book is tagged as pieces by both workers; the dataset
    is the one written from whole documents."""
    from nltk.corpus import gutenberg
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'book.txt').write_text(gutenberg.raw('austen-persuasion.txt')[:60000])
    (inp / 'short.txt').write_text(DOCS[1])
    common = ['--input', str(inp), '--ner', 'binary', '--workers', '2']
    r = run_prepare(common + ['--out_dir', str(tmp_path / 'whole')])
    assert r.returncode == 0, r.stderr
    log = tmp_path / 'pids'
    proc = run_hooked(f"open({str(log)!r}, 'a').write(f'{{os.getpid()}} {{len(item)}}\\n')",
                      common + ['--out_dir', str(tmp_path / 'pieces'), '--chunk_chars', '2000'])
    err = finish(proc, 300)
    assert proc.returncode == 0, err
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) >= 20 and len({pid for pid, _ in rows}) == 2
    same_dataset(tmp_path / 'whole', tmp_path / 'pieces')

# the default dataset (python prepare.py --ner binary, the offline NLTK Gutenberg) before issue 14
GUTENBERG_SHA256 = {
    'train.bin': 'a06a53ecd795ea06968a09f43c6f10020fffc50161192e6068c69d0061960e69',
    'train.ner.bin': '67a38de74dad791a6f35f118daa033f79caf5854d20f7bf230e006565ec33434',
    'train.ner_causal.bin': '459c8abc496e65698e00d16e8c4d62bd2a4fb04992560ce43dadd95541a6d6f4',
    'train.pos.bin': '677ade9fb883b24b44346cb4fbbbff847b59fb3ab1e35979d056f7b58006f135',
    'train.pos_causal.bin': 'cd2c53b4bfdff7018431af6d1636918e160f92875b8eaf377349f10f51487bad',
    'train.word.bin': 'ae5c81d9d43d98a8ca50a9881f5cfd58991c8369ce3d722a60058761aeacb743',
    'val.bin': 'a1990a1ad7fc2bb97c5688632bcd988517ceac0e3915adc67bc3ab65fcce09bf',
    'val.ner.bin': '6d776153ba653adfdea997ba58628ed27f07a254f33760571e90b4930a22bff5',
    'val.ner_causal.bin': '6235cabd16408605ea3b2fc065c74ab2f200a992bd55565adbebccf17318a755',
    'val.pos.bin': '8d51551453b79b695c7fd6d92c4ac39a174417f57a6c7b4aec89c4dd128970a7',
    'val.pos_causal.bin': '3a71071a877b8646fadf4629cc8044900ee30f6c91a1c7f1b6e96d930aaecb05',
    'val.word.bin': 'ff06a5086ffb63e5c8d208a3eb67089e7df0c82b6da5553b3f9af26d7ed6cbdd',
}

@pytest.mark.skipif(not os.environ.get('LIME_FULL_CHECK'), reason='LIME_FULL_CHECK=1: the whole default corpus')
def test_default_dataset_unchanged(tmp_path):
    """python prepare.py --ner binary writes the same 12 files as before issue 14 (pieces, the
    new shards and splits change nothing for it). Hashes of NLTK 3.10.4 / tiktoken 0.14.0."""
    out = tmp_path / 'gutenberg'
    r = run_prepare(['--ner', 'binary', '--out_dir', str(out)])
    assert r.returncode == 0, r.stderr
    got = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in GUTENBERG_SHA256}
    assert got == GUTENBERG_SHA256

# -----------------------------------------------------------------------------
# issue 21: nothing of the user's is deleted, hostile inputs, hangs

def tree(d):
    """Every file under d with its bytes and mtime: 'untouched' means equal trees."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob('*'))}

def test_existing_dataset_replaced_only_with_overwrite(tmp_path, shards):
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    common = ['--input', str(inp), '--ner', 'none', '--tags', 'full', '--workers', '1', '--out_dir', str(out)]
    assert run_prepare(common).returncode == 0
    before = tree(out)
    for extra in ([], ['--seed', '5']):  # the same arguments or others: refused before any work
        r = run_prepare(common + extra)
        assert r.returncode == 1
        one_line_error(r.stderr, str(out), 'holds a dataset already', '--overwrite')
        assert tree(out) == before and leftovers(out) == []
    r = run_prepare(['--merge', str(shards / 's0'), str(shards / 's1'), '--out_dir', str(out)])
    assert r.returncode == 1
    one_line_error(r.stderr, 'holds a dataset already', '--overwrite')
    assert tree(out) == before and leftovers(out) == []
    r = run_prepare(common + ['--seed', '5', '--overwrite'])
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / 'meta.json'))['seed'] == 5 and leftovers(out) == []
    r = run_prepare(['--merge', str(shards / 's0'), str(shards / 's1'), '--out_dir', str(out), '--overwrite'])
    assert r.returncode == 0, r.stderr
    assert 'merged_from' in json.load(open(out / 'meta.json')) and leftovers(out) == []

@pytest.mark.parametrize('case', ['nanogpt', 'not_our_meta', 'bad_meta', 'user_file'])
def test_directory_prepare_did_not_write_is_refused(tmp_path, case):
    """nanoGPT's train.bin/val.bin, a meta.json of someone else's or any user file: refused
    even with --overwrite, and left untouched."""
    inp = write_inputs(tmp_path / 'in')
    out = tmp_path / 'ds'
    if case != 'user_file':
        out.mkdir()
        (out / 'train.bin').write_bytes(b'\x01\x02' * 100)
        (out / 'val.bin').write_bytes(b'\x03\x04' * 10)
    expect = {'nanogpt': 'train.bin but no readable meta.json', 'not_our_meta': "meta.json has no 'streams'",
              'bad_meta': "meta.json has no 'vocab_size'", 'user_file': "'notes.txt'"}[case]
    if case == 'not_our_meta':
        (out / 'meta.json').write_text(json.dumps({'vocab_size': 50304}))  # nanoGPT's meta.pkl, as JSON
    elif case == 'bad_meta':
        (out / 'meta.json').write_text('[1, 2]')
    elif case == 'user_file':
        assert run_prepare(['--input', str(inp), '--ner', 'none', '--tags', 'full', '--workers', '1',
                            '--out_dir', str(out), '--overwrite']).returncode == 0
        (out / 'notes.txt').write_text('mine')
    before = tree(out)
    for args in (['--input', str(inp), '--ner', 'none', '--tags', 'full', '--workers', '1'],
                 ['--input', str(inp), '--ner', 'none', '--tags', 'full', '--num_shards', '2']):
        r = run_prepare(args + ['--out_dir', str(out), '--overwrite'])
        assert r.returncode == 1
        one_line_error(r.stderr, str(out), expect, 'not replacing it')
        assert tree(out) == before and leftovers(out) == []

def run_quick(args, timeout=60):
    """run_prepare, but a hang fails the test instead of stalling it (subprocess.run kills it)."""
    try:
        return subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--no_progress'] + args,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f'prepare.py still running after {timeout} s (hung)')

@pytest.mark.parametrize('case', ['fifo_in_dir', 'fifo_given', 'dev_zero_link', 'dev_null_link'])
def test_only_regular_files_are_read(tmp_path, case):
    """A FIFO would block at open forever, /dev/zero never ends: refused at the listing, in one
    line naming it, also behind a symlink."""
    inp = write_inputs(tmp_path / 'in')
    bad = inp / ('x.jsonl' if case == 'dev_null_link' else 'x.txt')
    if case.startswith('fifo'):
        os.mkfifo(bad)
    else:
        bad.symlink_to('/dev/zero' if case == 'dev_zero_link' else '/dev/null')
    out = tmp_path / 'ds'
    target = str(bad) if case == 'fifo_given' else str(inp)
    r = run_quick(['--input', target, '--out_dir', str(out), '--ner', 'none', '--workers', '1'])
    assert r.returncode == 1
    one_line_error(r.stderr, str(bad), 'not a regular file')
    assert not out.exists() and leftovers(out) == []

def jsonl_bomb(path, line_bytes, first='{"text": "A fine first document."}\n'):
    """A JSONL file (.jsonl, .gz or .zst by its name) whose second line is line_bytes long,
    written in pieces (memory stays small however long the line)."""
    import zstandard
    piece = b'a' * min(line_bytes, 1 << 24)
    if path.name.endswith('.gz'):
        f = gzip.open(path, 'wb', compresslevel=1)
    elif path.name.endswith('.zst'):
        f = zstandard.ZstdCompressor().stream_writer(open(path, 'wb'))
    else:
        f = open(path, 'wb')
    with f:
        f.write(first.encode() + b'{"text": "')
        for _ in range(line_bytes // len(piece)):
            f.write(piece)
        f.write(b'"}\n')
    return path

@pytest.mark.parametrize('name', ['bomb.jsonl', 'bomb.jsonl.gz', 'bomb.jsonl.zst', 'big.txt'])
def test_document_size_limit(tmp_path, name):
    """A 2 MiB document with --max_doc_bytes 1 MiB: one line naming the file (and line), before
    any tagging; with a limit above it, the same file is fine."""
    inp = write_inputs(tmp_path / 'in')
    if name.endswith('.txt'):
        (inp / name).write_bytes(b'word ' * ((2 << 20) // 5))
        where = name
    else:
        jsonl_bomb(inp / name, 2 << 20)
        where = f'{name}:2'
    out = tmp_path / 'ds'
    common = ['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full', '--workers', '1']
    r = run_quick(common + ['--max_doc_bytes', str(1 << 20)])
    assert r.returncode == 1
    one_line_error(r.stderr, where, '--max_doc_bytes=1,048,576')
    assert not out.exists() and leftovers(out) == []
    if not name.endswith('.txt'):  # only the long line is refused: the first document was read
        code = (f"import sys\nsys.path.insert(0, {ROOT!r})\nimport prepare\n"
                f"docs = prepare.read_jsonl({str(inp / name)!r}, 'text', 1 << 20)\n"
                f"print(next(docs)[2])\n")
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
        assert r.stdout == 'A fine first document.\n', r.stderr

def test_decompression_bomb_memory_bounded(tmp_path):
    """A 32 KB .jsonl.zst whose line is 1 GiB: refused after reading about the limit, peak memory
    a few MiB above the process' own (reading the whole line took 1 GiB or more)."""
    bomb = jsonl_bomb(tmp_path / 'bomb.jsonl.zst', 1 << 30)
    assert bomb.stat().st_size < 1 << 20
    code = (f"import sys, resource\nsys.path.insert(0, {ROOT!r})\nimport prepare\n"
            f"rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"before = rss()\n"
            f"try:\n    list(prepare.read_jsonl({str(bomb)!r}, 'text', 1 << 20))\n"
            f"except prepare.LimeError as e:\n    print(e)\n"
            f"print((rss() - before) // 1024)\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    msg, grown_mib = r.stdout.strip().splitlines()
    assert 'bomb.jsonl.zst:2: longer than --max_doc_bytes=1,048,576' in msg, r.stdout + r.stderr
    assert int(grown_mib) < 64, f'peak memory grew by {grown_mib} MiB'

def test_deep_input_tree(tmp_path):
    """A 1,500-deep input folder (os.walk recursed: RecursionError) is walked in order."""
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'top.txt').write_text(DOCS[0])
    d, dirs = str(inp), []
    for _ in range(1500):  # os.makedirs recurses too
        d = os.path.join(d, 'd')
        os.mkdir(d)
        dirs.append(d)
    with open(os.path.join(d, 'bottom.txt'), 'w') as f:
        f.write(DOCS[1])
    out = tmp_path / 'ds'
    try:
        r = run_quick(['--input', str(inp), '--out_dir', str(out), '--ner', 'none', '--tags', 'full',
                       '--val_fraction', '0', '--workers', '1'])
        assert r.returncode == 0, r.stderr
        assert docs_of(read_dataset(out)[1]['train']) == DOCS[:2]
    finally:  # pytest's rmtree recurses as deep: remove it here, bottom up
        os.remove(os.path.join(d, 'bottom.txt'))
        for d in reversed(dirs):
            os.rmdir(d)
