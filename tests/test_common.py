"""common.py (issue 22): the one error type, the config include, atomic writes, checkpoint loading,
the log reader, text files, the data reader (Split, eval_starts); and the import graph (no script
imports another but its engines: harness -> sample, experiments -> sample, harness)."""
import ast
import errno
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import metadata as md
import train
from conftest import ROOT

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
SCRIPTS = ('train', 'sample', 'harness', 'export', 'prepare')
LIBRARY = ('common', 'model', 'metadata', 'nltk_fast')


# --- the one error type -------------------------------------------------------------------

def test_lime_error_is_one_line_exit_1_without_traceback():
    e = common.LimeError('x.pt: not found')
    assert isinstance(e, SystemExit) and e.msg == 'x.pt: not found' and str(e) == 'x.pt: not found'
    r = subprocess.run([sys.executable, '-c', 'import common; common.fail("a: b")'], cwd=ROOT,
                       capture_output=True, text=True, env=ENV)
    assert (r.returncode, r.stderr) == (1, 'a: b\n')


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_prints_its_errors_the_same_way(script, tmp_path):
    # an unknown option: '<script>.py: error: <message>', exit status 1, one line, no traceback
    flag = '--no_such_flag' if script == 'prepare' else '--no_such_key=1'
    r = subprocess.run([sys.executable, str(ROOT / f'{script}.py'), flag] if script != 'prepare' else
                       [sys.executable, str(ROOT / 'prepare.py'), '--workers=0', f'--out_dir={tmp_path / "o"}'],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f'{script}.py: error: '), r.stderr
    assert not (tmp_path / 'o').exists()


def test_the_old_error_classes_are_gone():
    import export
    import harness
    import prepare
    import sample
    gone = [(m.__name__, n) for m, n in ((train, 'ConfigError'), (train, 'CheckpointError'), (sample, 'SampleError'),
                                         (harness, 'HarnessError'), (prepare, 'PrepareError'),
                                         (export, 'ExportError')) if hasattr(m, n)]
    assert gone == []
    assert issubclass(prepare.Stopped, common.LimeError)


# --- configuration ------------------------------------------------------------------------

def test_include_is_resolved_next_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'base.py').write_text("n_layer = 2\nn_head = 2\nout_dir = 'base'\n")
    (tmp_path / 'sub' / 'mid.py').write_text("include('base.py')\nn_head = 4\n")
    (tmp_path / 'top.py').write_text("include('sub/mid.py')\nout_dir = 'top'\n")
    monkeypatch.chdir('/')  # not the configs' directory
    cfg, explicit = common.configure([str(tmp_path / 'top.py'), '--n_layer=5'], train.DEFAULTS)
    assert (cfg['n_layer'], cfg['n_head'], cfg['out_dir']) == (5, 4, 'top')  # later settings win
    assert explicit == {'n_layer', 'n_head', 'out_dir'}  # 'include' is no config key


def test_include_errors_are_one_line(tmp_path):
    (tmp_path / 'a.py').write_text("include('b.py')\n")
    (tmp_path / 'b.py').write_text("include('a.py')\n")
    with pytest.raises(common.LimeError, match=r"a\.py: included twice in a chain of include\(\) calls"):
        common.configure([str(tmp_path / 'a.py')], train.DEFAULTS)
    (tmp_path / 'c.py').write_text("include('nothing.py')\n")
    with pytest.raises(common.LimeError, match=f"no such config file {tmp_path / 'nothing.py'}"):
        common.configure([str(tmp_path / 'c.py')], train.DEFAULTS)


def test_shipped_configs_use_include_and_load():
    for path in sorted((ROOT / 'configs').glob('*.py')):
        assert 'exec(' not in path.read_text(), path.name  # the one include mechanism
        if not path.name.startswith(('bench_', 'experiments_', 'quickstart')):  # train.py's configs
            cfg, _ = common.configure([str(path)], train.DEFAULTS)
            train.check_config(dict(cfg, device='cpu', dtype='float32'))
    cfg, _ = common.configure([str(ROOT / 'configs' / 'cpu_demo_lime1.py')], train.DEFAULTS)
    assert cfg['meta_shift'] == 1 and cfg['out_dir'] == 'out-cpu-demo-lime1' and cfg['metadata']  # and cpu_demo's


def test_autocast_is_nothing_on_cpu():
    from contextlib import nullcontext
    assert isinstance(common.autocast('cpu', 'float32'), nullcontext)
    assert isinstance(common.autocast('cpu', common.resolve_dtype('auto', 'cpu')), nullcontext)
    with pytest.raises(common.LimeError, match='dtype=bfloat16 needs a CUDA device'):
        common.resolve_dtype('bfloat16', 'cpu')


# --- atomic writes --------------------------------------------------------------------------

def temps(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith('.tmp'))


def test_write_atomic_bytes_str_and_callable(tmp_path):
    p = tmp_path / 'new' / 'f.json'  # the directory is made
    common.write_atomic(str(p), b'\x00\x01')
    assert p.read_bytes() == b'\x00\x01'
    common.write_atomic(str(p), 'é\n')
    assert p.read_bytes() == 'é\n'.encode()
    common.write_atomic(str(p), lambda f: f.write(b'abc'))
    assert p.read_bytes() == b'abc' and temps(p.parent) == []


def test_write_atomic_gives_the_mode_open_would_and_keeps_a_files_own(tmp_path, monkeypatch):
    (tmp_path / 'plain').write_bytes(b'')  # open() under the process's umask
    common.write_atomic(str(tmp_path / 'atomic'), b'')
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)
    assert mode('atomic') == mode('plain')
    monkeypatch.setattr(common, 'UMASK', 0o027)
    common.write_atomic(str(tmp_path / 'group'), b'a')
    assert mode('group') == 0o640  # not mkstemp's 0o600
    os.chmod(tmp_path / 'group', 0o604)
    common.write_atomic(str(tmp_path / 'group'), b'b')  # a file replaced keeps its mode
    assert mode('group') == 0o604 and (tmp_path / 'group').read_bytes() == b'b'


def test_write_atomic_failure_is_one_line_and_leaves_the_old_file(tmp_path):
    p = tmp_path / 'f'
    p.write_text('old')

    def full(f):
        f.write(b'half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(common.LimeError) as e:
        common.write_atomic(str(p), full)
    assert e.value.msg == f"{p}: cannot write (No space left on device)"
    assert p.read_text() == 'old' and temps(tmp_path) == []
    (tmp_path / 'file').write_text('')
    with pytest.raises(common.LimeError, match=re.escape(f"{tmp_path / 'file' / 'x'}: cannot write (")):
        common.write_atomic(str(tmp_path / 'file' / 'x'), b'')  # its directory is a file


def test_write_atomic_removes_only_dead_writers_temp_files(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    stale = f'.f.{dead}.abcd_123.tmp'
    keep = [f'.f.{os.getpid()}.abcd_123.tmp',  # a live writer's
            f'.g.{dead}.abcd_123.tmp', f'f.{dead}.abcd_123.tmp', f'.f.{dead}.abcd_123.tmp.bak', 'f.tmp-1']
    for name in [stale] + keep:
        (tmp_path / name).write_text('x')
    common.write_atomic(str(tmp_path / 'f'), b'new')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ['f'])


def test_a_locked_out_dir_loses_all_our_temp_files_and_nothing_else(tmp_path):
    # train.py holds out_dir's lock: every write_atomic temp file there is a killed run's, even with a live pid
    ours = [f'.ckpt.pt.{os.getpid()}.abcd_123.tmp', '.log.jsonl.1.abcdefgh.tmp', '.ckpt_best.pt.7.hardlink.tmp']
    theirs = ['notes.tmp', 'ckpt.pt.tmp-1', '.ckpt.pt.x.abcdefgh.tmp']
    for name in ours + theirs:
        (tmp_path / name).write_text('x')
    (tmp_path / 'log.jsonl').write_text('')
    C = type('C', (), dict(init_from='resume', out_dir=str(tmp_path)))
    train.prepare_out_dir(C, str(tmp_path / 'ckpt.pt'), str(tmp_path / 'log.jsonl'), 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + ['log.jsonl'])


def test_the_scripts_share_one_atomic_writer():
    import harness
    import metadata
    assert not hasattr(harness, 'write_atomic') and not hasattr(metadata, '_atomic_write')
    assert train.write_atomic is common.write_atomic and metadata.write_atomic is common.write_atomic


# --- stream names ----------------------------------------------------------------------------

def test_stream_name_rule():
    assert md.is_causal('pos_causal') and not md.is_causal('pos') and not md.is_causal('causal_pos')
    assert [md.base_stream(s) for s in ('pos', 'pos_causal', 'ner_causal', 'word')] == ['pos', 'pos', 'ner', 'word']
    assert md.stream_tags('ner_causal', 'binary') == md.stream_tags('ner', 'binary')


# --- checkpoints, text files, the log --------------------------------------------------------

def test_load_model_names_the_missing_checkpoint(tmp_path):
    with pytest.raises(common.LimeError) as e:
        common.load_model(str(tmp_path / 'run'))
    assert e.value.msg == f"{tmp_path / 'run' / 'ckpt.pt'}: not found (train a model with train.py first)"
    (tmp_path / 'x.pt').write_bytes(b'not a checkpoint')
    assert common.checkpoint_path(str(tmp_path / 'x.pt')) == str(tmp_path / 'x.pt')
    with pytest.raises(common.LimeError, match=re.escape(f"{tmp_path / 'x.pt'}: not a readable checkpoint")):
        common.load_model(str(tmp_path / 'x.pt'))


def test_read_text(tmp_path):
    (tmp_path / 'a.txt').write_bytes('\ufeffhé\r\n'.encode())
    assert common.read_text(str(tmp_path / 'a.txt')) == 'hé\r\n'  # BOM dropped, the rest as is
    (tmp_path / 'b.txt').write_bytes(b'ok\xff')
    with pytest.raises(common.LimeError, match=re.escape(f"{tmp_path / 'b.txt'}: not valid UTF-8 (byte 2)")):
        common.read_text(str(tmp_path / 'b.txt'))
    with pytest.raises(common.LimeError, match=re.escape(f"{tmp_path / 'a.txt'}: larger than 3 bytes")):
        common.read_text(str(tmp_path / 'a.txt'), 3)
    os.mkfifo(tmp_path / 'fifo')  # never read (it would block)
    with pytest.raises(common.LimeError, match=re.escape(f"{tmp_path / 'fifo'}: not a regular file")):
        common.read_text(str(tmp_path / 'fifo'))


def test_read_log(tmp_path, capsys):
    row = '{"iter": 0, "tokens": 0, "val_loss": 1.0, "val_ppl": 2.7, "val_acc": 0.1}\n'
    p = tmp_path / 'log.jsonl'
    p.write_text(row + row[:20])  # a live run's cut-off last line: skipped with a note
    assert len(common.read_log(p)) == 1 and 'cut off' in capsys.readouterr().err
    p.write_text(row + '[1]\n' + row)
    with pytest.raises(common.LimeError, match=re.escape(f"{p}:2: not a row of train.py's log")):
        common.read_log(p)


# --- the import graph -------------------------------------------------------------------------

def project_imports(name):
    """{imported project module: 'module' (at module level) or 'function'} of ROOT/name.py."""
    tree = ast.parse((ROOT / f'{name}.py').read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split('.')[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split('.')[0]]
        else:
            continue
        level = 'module' if node in tree.body else 'function'
        for n in names:
            if (ROOT / f'{n}.py').is_file() and n != name:
                found[n] = 'module' if found.get(n) == 'module' else level
    return found


# a script imports the core, model.py and metadata.py, and another script only where that one is its
# engine (named in its docstring): harness scores with sample.generate; experiments steers with
# sample.generate and scores downstream with harness (train.py it runs as a subprocess)
ENGINES = {'harness': {'sample'}, 'experiments': {'sample', 'harness'}}


def test_import_graph_has_no_circle_and_scripts_do_not_import_scripts():
    every = sorted(p.stem for p in ROOT.glob('*.py'))  # a new script is checked too
    scripts = [m for m in every if m not in LIBRARY]
    assert set(SCRIPTS) | {'bench', 'experiments'} <= set(scripts)
    graph = {m: project_imports(m) for m in every}
    for m in every:  # at module level or inside a function
        others = set(graph[m]) & set(scripts)
        assert others == ENGINES.get(m, set()), (m, others)
        doc = ast.get_docstring(ast.parse((ROOT / f'{m}.py').read_text())) or ''
        assert all(re.search(rf'\b{e}\b', doc) for e in others), (m, 'engines not in the docstring')

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path + [m])}"
        for n in graph.get(m, {}):
            visit(n, path + [m])
    for m in graph:
        visit(m, [])


def test_functions_fit_a_screen():
    # issue 22: no function over 80 lines, outside the tagger internals (metadata.py, nltk_fast.py)
    long = []
    for path in sorted(ROOT.glob('*.py')):
        if path.stem in ('metadata', 'nltk_fast'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f'{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)')
    assert not long, long


def test_the_tagging_cli_starts_without_torch():
    code = "import sys, common, metadata; print(sorted(m for m in ('torch', 'model', 'train') if m in sys.modules))"
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.stdout.strip() == '[]', r.stdout + r.stderr


# --- the data reader: the token and tag files prepare.py writes (train, bench and experiments read them) ---

def test_eval_windows_are_fixed_and_in_range():
    # the fixed validation windows: a function of the data length and eval config only
    starts = common.eval_starts(4000, 32, 8)
    assert starts == common.eval_starts(4000, 32, 8) and len(starts) == 8
    assert (min(starts), max(starts)) == (0, 4000 - 33)  # the last window's targets end at the last token


def test_eval_windows_are_shared_out_between_documents():
    # documents of 100, 5000, 101, 14800 and 100 tokens (each ends with its <|endoftext|>)
    ends = np.array([99, 5099, 5200, 20000, 20100])
    n, T = 20101, 32
    for count in (3, 5, 12, 20, 400, 700):
        starts = common.eval_starts(n, T, count, ends)
        docs = common.window_docs(starts, ends)
        assert len(starts) == count and starts == sorted(starts) == common.eval_starts(n, T, count, ends)
        assert 0 <= min(starts) and max(starts) <= n - T - 1
        per = np.bincount(docs, minlength=5)
        room = np.array([3, 156, 3, 462, 3])  # windows each document holds without overlap
        # as even as the documents allow: those with room left are within one window of each other,
        # and no full document has more than one window more than they do
        under = per < room
        if under.any():
            assert per[under].max() - per[under].min() <= 1 and (per[~under] <= per[under].min() + 1).all()
        assert per.sum() == count and (count < 5 or (per > 0).all())
        if count <= sum(room):
            assert (per <= room).all()
    assert common.window_docs(common.eval_starts(n, T, 20, ends), ends) == [0] * 3 + [1] * 6 + [2] * 3 + [3] * 5 + [4] * 3
    # one document (or none known): evenly spaced over the split, as before
    assert common.eval_starts(4000, 32, 8, np.array([3999])) == common.eval_starts(4000, 32, 8)


def test_record_split_rule_is_prepares():
    # prepare.py's record split (common.record_in_val): seeded, per key and index, about val_fraction
    got = [common.record_in_val('brown', i, 1337, 0.1) for i in range(2000)]
    assert got == [common.record_in_val('brown', i, 1337, 0.1) for i in range(2000)]
    assert 150 < sum(got) < 250 and got != [common.record_in_val('brown', i, 1338, 0.1) for i in range(2000)]


def test_meta_shift_alignment(dataset):
    tok = np.fromfile(dataset / 'train.bin', np.uint16)
    pos = np.fromfile(dataset / 'train.pos.bin', np.uint16)
    for shift in (0, 1):
        x, y, meta = common.Split(dataset, 'train', ['pos'], shift).windows([0, 100], 32)
        assert (x[1].numpy() == tok[100:132]).all() and (y[1].numpy() == tok[101:133]).all()
        assert (meta['pos'][1].numpy() == pos[100 + shift:132 + shift]).all()


def test_meta_shuffle(dataset):
    for n in (1000, 4096, 4000):
        a, b = common.affine_perm(n, 7, 'pos')
        assert sorted((a * p + b) % n for p in range(n)) == list(range(n))
    T = 40
    plain = common.Split(dataset, 'val', ['pos', 'ner'], 0)
    shuf = common.Split(dataset, 'val', ['pos', 'ner'], 0, shuffle_seed=7)
    starts = list(range(0, 3900, T))
    x0, y0, m0 = plain.windows(starts, T)
    x1, y1, m1 = shuf.windows(starts, T)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)  # tokens untouched
    for s in ('pos', 'ner'):
        assert (m0[s] == m1[s]).float().mean() < 0.6  # no alignment (chance level: 1/8 for pos, 1/2 for ner)
        # read through the permutation, the whole stream keeps its tag counts
        every = list(range(0, 4000, T))
        a = plain._read(plain.paths[s], every, T)
        b = shuf._read(shuf.paths[s], every, T, shuf.perm[s])
        assert torch.equal(torch.sort(a.flatten())[0], torch.sort(b.flatten())[0])
    again = common.Split(dataset, 'val', ['pos'], 0, shuffle_seed=7).windows(starts, T)[2]['pos']
    other = common.Split(dataset, 'val', ['pos'], 0, shuffle_seed=8).windows(starts, T)[2]['pos']
    assert torch.equal(m1['pos'], again) and not torch.equal(m1['pos'], other)


# --- the GPU configs offer every arm of the comparison ----------------------------------------

# train.py's GPU configs: a family runs every arm of "what LIME's honest gain is made of" on one
# model and data; each config documents its arms one a line, `#   <arm>: <flags>` (experiments.py's
# ARMS names; the flags in shell syntax, a trailing `# remark` allowed, added after the config)
GPU_FAMILIES = {'gpt2_124m': ['gpt2_124m_baseline', 'gpt2_124m_lime', 'gpt2_124m_lime1', 'gpt2_124m_predict'],
                **{n: [n] for n in ('gpt_500m', 'gpt_1b', 'gpt_2b', 'gemma_500m', 'gemma_1b', 'gemma_2b')}}
GPU_ARMS = {'baseline', 'lime_causal', 'lime1_predict', 'predict_token_classes', 'predict_random_classes',
            'aux_loss', 'lime', 'lime1'}
ARM_KEYS = ('metadata', 'meta_shift', 'meta_predict', 'meta_classes', 'meta_weight', 'meta_shuffle')


def documented_arms(path):
    """{arm: [flags]} from a config's header lines `#   <arm>: <flags>`."""
    import shlex
    arms = {}
    for line in path.read_text().splitlines():
        m = re.match(r'#   ([a-z0-9_]+):(.*)$', line)
        if m:
            assert m[1] not in arms, f"{path.name}: arm {m[1]} documented twice"
            arms[m[1]] = shlex.split(m[2], comments=True)
    return arms


def test_gpu_configs_document_every_arm_of_the_comparison():
    import experiments
    shipped = {p.stem for p in (ROOT / 'configs').glob('*.py') if p.name.startswith(('gpt2_124m_', 'gpt_', 'gemma_'))}
    assert shipped == {n for names in GPU_FAMILIES.values() for n in names}  # a new GPU config joins a family here
    for family, names in GPU_FAMILIES.items():
        runs, shared = {}, []
        for name in names:
            path = ROOT / 'configs' / f'{name}.py'
            default, _ = common.configure([str(path)], train.DEFAULTS)
            # tags that read the next words only where the config's name says so (the paper's oracle LIME+1)
            streams = [s.strip() for s in default['metadata'].split(',') if s.strip()]
            assert 'lime1' in name or all(md.is_causal(s) for s in streams), (name, default['metadata'])
            arms = documented_arms(path)
            assert arms, f"{name}: no `#   <arm>: <flags>` lines"
            for arm, flags in arms.items():
                assert arm in GPU_ARMS and arm not in runs, (name, arm)
                cfg, _ = common.configure([str(path)] + flags, train.DEFAULTS)
                train.check_config(dict(cfg, device='cpu', dtype='float32'))
                want = {k: experiments.ARMS[arm].get(k, train.DEFAULTS[k]) for k in ARM_KEYS}
                assert {k: cfg[k] for k in ARM_KEYS} == want, (name, arm, flags)
                assert (not flags) == (cfg['out_dir'] == default['out_dir']), (name, arm)  # its own, or the default
                runs[arm] = cfg['out_dir']
                shared.append({k: v for k, v in cfg.items() if k not in ARM_KEYS + ('out_dir',)})
        assert set(runs) == GPU_ARMS, (family, GPU_ARMS - set(runs))
        assert len(set(runs.values())) == len(runs), (family, runs)  # a distinct out_dir per arm
        assert all(s == shared[0] for s in shared), family  # the arms share everything else: model, data, steps
