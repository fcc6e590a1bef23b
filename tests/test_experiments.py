"""experiments.py end to end on tiny presets: the efficiency runs (train.py subprocesses), curves,
steering, the GPU check's experiments part and downstream write well-formed JSON; the arms' train.py
command lines are pinned. Helpers and the tiny dataset: tests/test_bench.py."""
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_bench import TINY_MODEL, all_finite, load, run_script
from test_bench import tiny_data  # noqa: F401 (a fixture: the tiny dataset, built once per module)

import experiments


EFF_RUNS = ['baseline', 'lime', 'lime_causal', 'lime1', 'lime1_predict', 'predict_token_classes',
            'predict_random_classes', 'aux_loss', 'shuffled', 'baseline_plain']


def run_experiments(cwd, *args, timeout=300):
    return run_script('experiments.py', cwd, *args, timeout=timeout)


@pytest.fixture(scope='module')
def eff(tiny_data):
    d, data, _ = tiny_data
    out = d / 'eff.json'
    run_experiments(d, '--mode=efficiency', f'--data_dir={data}', f'--data_input={data.parent / "docs"}',
                    f'--eff_dir={d / "eff"}', f'--out_json={out}', f'--eff_runs={",".join(EFF_RUNS)}',
                    '--max_iters=4', '--eval_interval=2', '--eval_iters=2', '--warmup_iters=1', '--plot=False',
                    *TINY_MODEL, timeout=900)  # 10 runs and two datasets: slow on a busy box
    return d, data, load(out)


def test_config_errors():
    with pytest.raises(SystemExit, match="unknown key 'eff_n_layer'"):  # n_layer is the runs' model: no shadow
        experiments.configure(['--eff_n_layer=3'])
    with pytest.raises(SystemExit, match='mode must be one of efficiency, tightness, steering, curves, downstream, gpu_check'):
        experiments.configure(['--mode=throughput'])
    with pytest.raises(SystemExit, match="unknown key 'tp_steps'"):  # bench.py's
        experiments.configure(['--tp_steps=3'])
    cfg = experiments.configure([str(ROOT / 'configs' / 'quickstart.py'), '--max_iters=2e3'])
    assert cfg['max_iters'] == 2000 and cfg['eff_runs'] == 'baseline,lime,lime_causal,lime1_predict'
    assert (cfg['data_input'], cfg['eff_seeds'], cfg['eff_archs']) == ('nltk_mix', 1, 'gpt2')
    cfg = experiments.configure([str(ROOT / 'configs' / 'bench_efficiency_cpu.py')])
    assert (cfg['eff_seeds'], cfg['eff_archs'], cfg['data_dir']) == (3, 'gpt2,gemma', 'data/nltk_mix_4k')


def test_each_shipped_config_is_one_programs():
    # every bench_*/experiments_*/quickstart config loads in exactly one of bench.py and experiments.py
    import bench
    owner = {}
    for path in sorted((ROOT / 'configs').glob('*.py')):
        if not path.name.startswith(('bench_', 'experiments_', 'quickstart')):
            continue  # train.py's
        ok = []
        for name, configure in (('bench', bench.configure), ('experiments', experiments.configure)):
            try:
                configure([str(path)])
                ok.append(name)
            except SystemExit:
                pass
        owner[path.name] = ok
    assert owner == {'bench_downstream_cpu.py': ['experiments'], 'bench_efficiency_124m.py': ['experiments'],
                     'bench_efficiency_cpu.py': ['experiments'], 'bench_efficiency_cpu_6l.py': ['experiments'],
                     'bench_efficiency_cpu_long.py': ['experiments'], 'bench_gpu_check.py': ['bench'],
                     'bench_throughput_124m.py': ['bench'], 'experiments_blimp_gpu.py': ['experiments'],
                     'experiments_gpu_check.py': ['experiments'],
                     'quickstart.py': ['experiments']}


def test_scripts_import_no_other_script():
    # experiments.py runs train.py as a subprocess and imports harness/sample/train only inside the
    # modes that use them as engines; bench.py never imports experiments.py
    code = ("import sys, bench; b = sorted(m for m in ('experiments', 'train', 'sample', 'harness') if m in sys.modules); "
            "import experiments; print(b, sorted(m for m in ('train', 'sample', 'harness') if m in sys.modules))")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '[] []', r.stdout + r.stderr[-2000:]


def quickstart_args(data, out, metadata, *extra):
    """train.py's arguments for one quickstart run, as bench.py generated them before the split."""
    return [f'--data_dir={data}', f'--out_dir={out}', f'--metadata={metadata}', '--meta_shift=0',
            '--meta_shuffle=False', '--seed=1337', '--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=128',
            '--batch_size=8', '--arch=gpt2', '--n_kv_head=0', '--mlp_hidden=0', '--bias=False', '--dropout=0.0',
            '--gradient_accumulation_steps=1', '--max_iters=600', '--lr_decay_iters=600', '--warmup_iters=30',
            '--learning_rate=0.003', '--min_lr=0.0003', '--weight_decay=0.1', '--eval_interval=100',
            '--eval_iters=3', '--log_interval=60', '--device=cpu', '--dtype=float32', '--compile=False',
            '--always_save_checkpoint=True', '--overwrite=True', *extra]


def test_quickstart_train_commands(tmp_path, monkeypatch):
    # the quickstart's runs start train.py with exactly the command lines bench.py gave it
    C = types.SimpleNamespace(**experiments.configure([str(ROOT / 'configs' / 'quickstart.py'),
                                                       f'--eff_dir={tmp_path}']))
    cmds = []

    class FinishedRun:  # a train.py that has finished: one log row in its out_dir
        returncode = 0

        def __init__(self, cmd, **kw):
            cmds.append(cmd)
            out = next(a for a in cmd if a.startswith('--out_dir='))[len('--out_dir='):]
            row = dict(iter=C.max_iters, tokens=1024, val_loss=3.0, val_ppl=20.0, val_acc=0.1)
            with open(os.path.join(out, 'log.jsonl'), 'w') as f:
                f.write(json.dumps(row) + '\n')

        def poll(self):
            return 0

    monkeypatch.setattr(experiments.subprocess, 'Popen', FinishedRun)
    names = C.eff_runs.split(',')
    experiments.train_runs(C, [(n, str(tmp_path / n)) for n in names])
    data = os.path.abspath('data/nltk_mix_4k')
    assert [c[:2] for c in cmds] == [[sys.executable, str(ROOT / 'train.py')]] * 4
    assert [c[2:] for c in cmds] == [
        quickstart_args(data, tmp_path / 'baseline', ''), quickstart_args(data, tmp_path / 'lime', 'pos,ner'),
        quickstart_args(data, tmp_path / 'lime_causal', 'pos_causal,ner_causal'),
        quickstart_args(data, tmp_path / 'lime1_predict', 'pos_causal,ner_causal', '--meta_predict=True',
                        '--meta_inject_layer=0', '--marginal_k=8')]
    # the CPU preset's other arms differ from the baseline in their own keys only
    C = types.SimpleNamespace(**experiments.configure([str(ROOT / 'configs' / 'bench_efficiency_cpu.py')]))
    base = experiments.train_args(C, 'baseline', 'OUT')
    diff = {n: sorted(set(experiments.train_args(C, n, 'OUT')) - set(base)) for n in EFF_RUNS}
    predict = ['--marginal_k=8', '--meta_inject_layer=0', '--meta_predict=True', '--metadata=pos_causal,ner_causal']
    assert diff == {'baseline': [], 'lime': ['--metadata=pos,ner'], 'lime_causal': ['--metadata=pos_causal,ner_causal'],
                    'lime1': ['--meta_shift=1', '--metadata=pos,ner'], 'lime1_predict': predict,
                    'predict_token_classes': sorted(predict + ['--meta_classes=token']),
                    'predict_random_classes': sorted(predict + ['--meta_classes=random']),
                    'aux_loss': sorted(predict + ['--meta_weight=0.0']),
                    'shuffled': ['--meta_shuffle=True', '--metadata=pos,ner'],
                    'baseline_plain': [f"--data_dir={os.path.abspath('data/nltk_mix_4k_plain')}"]}
    # seed index i: seed + i in every arm (the same initial weights and batches across arms)
    assert sorted(set(experiments.train_args(C, 'lime_causal', 'OUT', 2)) - set(base)) == [
        '--metadata=pos_causal,ner_causal', '--seed=1339']
    assert experiments.run_name('aux_loss', 0) == 'aux_loss' and experiments.run_name('aux_loss', 2) == 'aux_loss_seed3'


def test_first_reach_interpolates():
    rows = [dict(tokens=0, val_loss=5.0), dict(tokens=100, val_loss=3.0), dict(tokens=200, val_loss=2.0)]
    assert experiments.first_reach(rows, 'val_loss', 2.5, lambda v, t: v <= t) == pytest.approx(150)
    assert experiments.first_reach(rows, 'val_loss', 1.0, lambda v, t: v <= t) is None


def test_efficiency(eff):
    d, data, res = eff
    assert all_finite(res)
    out = res['result']['archs']['gpt2']
    runs = out['runs']
    assert list(runs) == EFF_RUNS
    for name, r in runs.items():
        for k in ('final_val_loss', 'final_val_ppl', 'final_val_acc', 'final_val_acc_word_start',
                  'final_val_acc_word_cont'):
            assert isinstance(r[k], float), (name, k)
        assert r['curve']['iter'] == [0, 2, 4] and len(r['curve']['val_loss']) == 3
        for k in ('frac_tokens_to_baseline_loss', 'frac_tokens_to_baseline_acc'):
            assert r[k] is None or r[k] >= 0
    assert runs['baseline']['frac_tokens_to_baseline_loss'] == pytest.approx(1.0)
    # val_nll exists exactly for the runs that read nothing of the future
    honest = {n for n, r in runs.items() if not r['reads_future']}
    assert honest == set(EFF_RUNS) - {'lime', 'lime1', 'shuffled'}
    for n, r in runs.items():
        assert (r['final_val_nll'] is None) == r['reads_future'] == (r['final_val_bpb'] is None)
        assert r['final_val_bytes_per_token'] > 0 and r['other_tokens'] == (n == 'baseline_plain')
        if not r['reads_future']:  # bits per byte: val_nll / (ln 2 * bytes per target token)
            assert r['final_val_bpb'] == pytest.approx(r['final_val_nll'] / (math.log(2) * r['final_val_bytes_per_token']))
        if r['reads_future']:
            assert r['frac_tokens_to_baseline_nll'] is None and experiments.reach_cell(r, 'frac_tokens_to_baseline_nll') == 'n/a'
    # the self-predicting arms: val_nll is the exact marginal at the end, below the joint bound
    for n in ('lime1_predict', 'predict_token_classes', 'predict_random_classes'):
        last = load_log(d / 'eff' / n)[-1]
        assert last['val_nll_kind'] == 'exact' and last['val_nll'] < last['val_loss_bound']
    aux = load_log(d / 'eff' / 'aux_loss')[-1]
    assert aux['val_nll'] == pytest.approx(aux['val_loss'], rel=1e-12)  # meta_weight 0: the tags add nothing
    # the decomposition: one seed here, so the standard errors count documents only; every honest arm
    # paired with the baseline
    dec = out['decomposition']
    rows = {r['arm']: r for r in dec['rows']}
    assert list(rows) == [n for n in EFF_RUNS if n != 'baseline_plain']
    assert all(rows[n]['reads_future'] for n in ('lime', 'lime1', 'shuffled'))
    for n in honest - {'baseline_plain'}:
        r = rows[n]
        assert r['val_nll'] == pytest.approx(runs[n]['final_val_nll'], rel=1e-9) and r['seeds'] == 1
        assert r['val_nll_se'] > 0 and r['tagger'] == (n in ('lime_causal', 'lime1_predict'))
        if n != 'baseline':
            assert r['delta'] == pytest.approx(r['val_nll'] - rows['baseline']['val_nll'], abs=1e-9)
        assert 0 < r['eval_share'] < 1
    assert dec['baseline_final_val_nll'] == pytest.approx(runs['baseline']['final_val_nll'])
    # the plain-tokenization arm: the same documents and split, GPT-2's own encoding, compared by bpb only
    plain = runs['baseline_plain']
    assert plain['frac_tokens_to_baseline_nll'] is None and plain['frac_tokens_to_baseline_loss'] is None
    assert experiments.reach_cell(plain, 'frac_tokens_to_baseline_nll') == 'n/a'
    assert experiments.reach_cell(plain, 'frac_tokens_to_baseline_bpb') != 'n/a'
    assert runs['baseline']['frac_tokens_to_baseline_bpb'] == pytest.approx(1.0)
    lime_meta, plain_meta = load(data / 'meta.json'), load(str(data) + '_plain/meta.json')
    assert plain_meta['tokenization'] == 'plain' and lime_meta['tokenization'] == 'lime'
    for k in ('train_docs', 'val_docs', 'tokenizer', 'inputs', 'seed'):
        assert plain_meta[k] == lime_meta[k]
    assert res['result']['plain_data_dir'] == str(data) + '_plain'
    args = load(d / 'eff' / 'baseline_plain' / 'bench_args.json')['args']
    assert f'--data_dir={data}_plain' in args
    assert (d / 'eff' / 'lime1' / 'ckpt.pt').exists()
    # a second call reuses the finished runs instead of training again
    r = run_experiments(d, '--mode=efficiency', f'--data_dir={data}', f'--eff_dir={d / "eff"}',
                  f'--out_json={d / "eff2.json"}', '--max_iters=4', '--eval_interval=2', '--eval_iters=2',
                  '--warmup_iters=1', '--plot=False', '--eff_runs=baseline,lime', *TINY_MODEL)
    assert 'reusing' in r.stdout


def test_tightness(eff):
    # the table behind marginal_k: on the run's own val windows, the exact marginal is its last val_nll,
    # and every top-k bound is above it
    d, _, _ = eff
    out = d / 'tight.json'
    run_experiments(d, '--mode=tightness', f'--ckpt_dir={d / "eff" / "lime1_predict"}', '--tight_ks=1,2,500',
                    f'--out_json={out}', '--device=cpu', '--dtype=float32')
    r = load(out)['result']
    rows = {x['k']: x for x in r['rows']}
    assert rows['exact']['val_nll'] == pytest.approx(load_log(d / 'eff' / 'lime1_predict')[-1]['val_nll'], rel=1e-6)
    assert rows[1]['val_nll'] >= rows[2]['val_nll'] >= rows['exact']['val_nll'] and rows[1]['gap'] > 0
    assert rows[500]['gap'] == pytest.approx(0, abs=1e-6) and r['combinations'] == 288 and r['windows'] == 8
    with pytest.raises(SystemExit, match='not a self-predicting model on causal streams'):
        experiments.run_tightness(types.SimpleNamespace(ckpt_dir=str(d / 'eff' / 'lime_causal'), device='cpu'))


def load_log(run_dir):
    return experiments.read_log(str(run_dir / 'log.jsonl'))


def test_seeds_and_archs(tiny_data):
    # two seeds of two arms in two archs: the runs' directories, and statistics over seeds and documents
    d, data, _ = tiny_data
    out = d / 'seeds.json'
    run_experiments(d, '--mode=efficiency', f'--data_dir={data}', f'--eff_dir={d / "sa"}', f'--out_json={out}',
                    '--eff_runs=baseline,lime1_predict', '--eff_seeds=2', '--eff_archs=gpt2,gemma', '--n_kv_head=1',
                    '--max_iters=4', '--eval_interval=2', '--eval_iters=2', '--warmup_iters=1', '--plot=False',
                    *TINY_MODEL, timeout=600)
    res = load(out)['result']
    assert set(res['archs']) == {'gpt2', 'gemma'} and res['seeds'] == 2
    for arch in ('gpt2', 'gemma'):
        dirs = res['archs'][arch]['run_dirs']
        assert dirs['lime1_predict'] == [str(d / 'sa' / arch / 'lime1_predict'), str(d / 'sa' / arch / 'lime1_predict_seed2')]
        args = load(d / 'sa' / arch / 'lime1_predict_seed2' / 'bench_args.json')['args']
        assert '--seed=1338' in args and f'--arch={arch}' in args
        rows = {r['arm']: r for r in res['archs'][arch]['decomposition']['rows']}
        finals = {n: [load_log(d / 'sa' / arch / experiments.run_name(n, i))[-1]['val_nll'] for i in range(2)]
                  for n in rows}
        for n, r in rows.items():
            assert r['val_nll_seeds'] == pytest.approx(finals[n], rel=1e-9) and r['val_nll_se'] > 0
        p = rows['lime1_predict']
        diffs = [a - b for a, b in zip(finals['lime1_predict'], finals['baseline'])]
        assert p['delta'] == pytest.approx(sum(diffs) / 2, abs=1e-9) and p['delta_se'] > 0


def test_bootstrap_counts_seeds_and_documents():
    # identical documents and seeds: no spread; the seed-to-seed spread alone shows up, and so does the documents'
    N = [10.0] * 6
    assert experiments.boot_se([[20.0] * 6] * 3, N, 500) == (pytest.approx(2.0), pytest.approx(0.0, abs=1e-12))
    seeds = [[v] * 6 for v in (10.0, 20.0, 30.0)]  # per-seed means 1, 2, 3
    m, se = experiments.boot_se(seeds, N, 4000)
    assert m == pytest.approx(2.0) and se == pytest.approx(np.std([1, 2, 3]) / math.sqrt(3), rel=0.15)
    docs = [[0.0, 10.0, 20.0, 30.0, 40.0, 50.0]] * 3  # per-document means 0 .. 5, the same in every seed
    m, se = experiments.boot_se(docs, N, 4000)
    assert m == pytest.approx(2.5) and se == pytest.approx(np.std(np.arange(6)) / math.sqrt(6), rel=0.15)
    assert experiments.boot_se([[1.0, 2.0]], [1.0, 1.0], 0) == (1.5, None)


def test_curves(eff, monkeypatch, capsys):
    d, _, _ = eff
    runs = [str(d / 'eff' / n) for n in ('baseline', 'lime', 'lime_causal', 'lime1_predict')]
    out, png = d / 'curves.json', d / 'curves.png'
    run_experiments(d, '--mode=curves', *runs, f'--out_json={out}', f'--curves_png={png}')
    r = load(out)['result']
    assert r['baseline'] == 'baseline' and set(r['runs']) == {'baseline', 'lime', 'lime_causal', 'lime1_predict'}
    assert r['runs']['lime']['reads_future'] and not r['runs']['lime_causal']['reads_future']
    pytest.importorskip('matplotlib')
    assert png.stat().st_size > 10000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # without matplotlib: one line naming the package, and the numbers still come
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert experiments.draw_curves({'b': experiments.read_log(d / 'eff' / 'baseline' / 'log.jsonl')}, 'b', str(d / 'x.png')) is None
    assert 'pip install matplotlib' in capsys.readouterr().out and not (d / 'x.png').exists()
    with pytest.raises(SystemExit, match='log.jsonl: not found'):
        experiments.run_curves(types.SimpleNamespace(curves_baseline='', curves_png=str(png)), [str(d)])


def test_steering(eff):
    d, _, _ = eff
    out = d / 'steer.json'
    run_experiments(d, '--mode=steering', f'--ckpt_dir={d / "eff" / "lime1"}', f'--base_ckpt_dir={d / "eff" / "baseline"}',
              f'--out_json={out}', '--steer_windows=4', '--steer_samples=2', '--steer_prompt=6',
              '--steer_new_tokens=5', '--device=cpu', '--dtype=float32')
    res = load(out)
    assert all_finite(res)
    r = res['result']
    assert set(r['accuracy']) == {'oracle_hints', 'unk_hints', 'baseline', 'predict_oracle_tags', 'predict_own_tags'}
    assert set(r['generation']) == {'hinted', 'unhinted_unk', 'predict_hinted', 'predict_unhinted', 'baseline'}
    assert r['predict_ckpt_dir'].endswith('lime1_predict') and r['generation']['predict_unhinted']['target'] == 'own tags'
    for g in r['generation'].values():
        for k in ('match_pos', 'match_ner', 'match_all'):
            assert 0.0 <= g[k] <= 1.0
    for a in r['accuracy'].values():
        assert 0.0 <= a['acc'] <= 1.0 and a['loss'] > 0


def test_gpu_check_plumbing_on_cpu(tiny_data):
    # the GPU check's experiments part: efficiency runs, then steering on their checkpoints
    d, data, _ = tiny_data
    out = d / 'gpu_check.json'
    run_experiments(d, str(ROOT / 'configs' / 'experiments_gpu_check.py'), f'--data_dir={data}',
                    f'--eff_dir={d / "gc"}', f'--out_json={out}', '--max_iters=2', '--eval_interval=2',
                    '--eval_iters=1', '--eff_runs=baseline,lime1_predict,lime1', '--eff_seeds=1', '--eff_parallel=1',
                    '--train_threads=1', '--plot=False', '--steer_windows=2', '--n_kv_head=1',
                    '--steer_samples=2', '--steer_prompt=4', '--steer_new_tokens=3', *TINY_MODEL,
                    '--blimp=False', timeout=600)  # BLiMP in the runner: test_blimp_of_every_arm_...
    res = load(out)
    assert res['mode'] == 'gpu_check' and all_finite(res)
    assert set(res['result']) == {'efficiency', 'steering', 'wall_s'}
    for arch in ('gpt2', 'gemma'):  # both archs, each steered on its own checkpoints
        assert set(res['result']['efficiency']['archs'][arch]['runs']) == {'baseline', 'lime1_predict', 'lime1'}
        steer = res['result']['steering'][arch]
        assert steer['generator'].startswith('sample.generate') and steer['predict_ckpt_dir'] == str(d / 'gc' / arch / 'lime1_predict')
        args = load(d / 'gc' / arch / 'lime1' / 'bench_args.json')['args']
        assert '--compile=False' in args and f'--arch={arch}' in args


def test_downstream(tiny_data):
    """The downstream mode end to end on tiny data: arithmetic mixed in (no test problem), offline
    tasks through harness.py, a row per model and tag policy, the oracle marked."""
    pytest.importorskip('lm_eval')
    d, _, docs = tiny_data
    out = d / 'ds.json'
    run_experiments(d, '--mode=downstream', f'--data_dir={d / "ds_data"}', f'--data_input={docs}', '--data_tokenizer=gpt2-512',
              f'--ds_task_dir={d / "tasks"}', '--ds_cloze_n=5', '--ds_arith_n=2', '--ds_arith_problems=300',
              f'--eff_dir={d / "ds"}', f'--out_json={out}', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
              '--warmup_iters=1', '--ds_runs=lime1', '--ds_limit=2', '--lime1_meta_dropout=0.1',
              '--ds_tasks=lime_cloze,lime_arithmetic_hinted', *TINY_MODEL, timeout=600)
    res = load(out)['result']
    assert [(r['run'], r['policy'], r['reads_future']) for r in res['rows']] == [
        ('lime1', 'causal', False), ('lime1', 'oracle', True), ('lime1', 'unk', False)]
    for r in res['rows']:
        assert 0 <= r['cloze_acc'] <= 1 and r['cloze_ll'] < 0
        # generation has no oracle
        assert (r['arith_em_hinted'] is None) == (r['policy'] == 'oracle') and r['arith_em'] is None
        assert r['policy'] == 'oracle' or set(r['arith_em_hinted_by_kind']) == {'1da'}  # the first 2 problems
    assert res['test_problems'] == 12  # 2 per kind
    # held apart: no test problem in the training documents
    test = {json.loads(l)['context'] for l in open(d / 'tasks' / 'arithmetic.jsonl')}
    train = open(d / 'ds_data-docs' / 'arithmetic.jsonl').read()
    assert len(test) == 12 and not any(json.dumps(t)[1:-1] + ' ' in train for t in test)
    assert 'Question: What is' in train and load(d / 'ds_data' / 'meta.json')['train_docs'] > 0


# --- curves on logs being written, or damaged (issue 21) ---------------------------------------

def write_log(d, n_rows, tail=b''):
    """A train.py log.jsonl with n_rows evaluation rows, then tail (raw bytes)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = [dict(iter=i, tokens=100 * i, lr=1e-3, train_loss=3.0 - 0.1 * i, val_loss=3.0 - 0.1 * i,
                 val_ppl=math.exp(3.0 - 0.1 * i), val_acc=0.1 + 0.01 * i, val_nll=3.0 - 0.1 * i)
            for i in range(1, n_rows + 1)]
    (d / 'log.jsonl').write_bytes(b''.join(json.dumps(r).encode() + b'\n' for r in rows) + tail)
    return d


def test_curves_skip_a_cut_off_last_line_with_a_note(tmp_path, capsys):
    a = write_log(tmp_path / 'a', 3)
    b = write_log(tmp_path / 'b', 2, b'{"iter": 3, "tokens": 300, "val_lo')  # a run still writing its log
    C = types.SimpleNamespace(curves_baseline='', curves_png=str(tmp_path / 'c.png'))
    res = experiments.run_curves(C, [str(a), str(b)])
    assert res['runs']['b']['curve']['iter'] == [1, 2] and res['runs']['a']['curve']['iter'] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err == f"note: {b / 'log.jsonl'}:3: the last line is cut off (a run still writing, or killed): skipped\n"
    write_log(b, 0, b'{"iter": 1, "tok')  # nothing but a cut-off line: no rows yet
    with pytest.raises(SystemExit, match=f"{b / 'log.jsonl'}: no evaluation rows yet"):
        experiments.run_curves(C, [str(a), str(b)])


@pytest.mark.parametrize('bad', [b'{"iter": 2, "tok', b'\xff\xfe', b'[1, 2]', b'{"iter": 2}'])
def test_curves_refuse_a_corrupt_line_in_the_middle(tmp_path, bad):
    a = write_log(tmp_path / 'a', 2)
    log = a / 'log.jsonl'
    lines = log.read_bytes().split(b'\n')
    log.write_bytes(b'\n'.join([lines[0], bad] + lines[1:]))  # line 2 of 3 rows
    msg = (f"{log}:2: not a row of train.py's log (a JSON object with iter, tokens, val_loss, val_ppl, val_acc)")
    with pytest.raises(SystemExit, match='^' + msg.replace('(', r'\(').replace(')', r'\)') + '$'):
        experiments.read_log(log)
    if bad != b'{"iter": 2, "tok':
        return
    # through the script (once): exit 1, that one line, no traceback
    r = subprocess.run([sys.executable, str(ROOT / 'experiments.py'), '--mode=curves', str(a),
                        f'--out_json={tmp_path / "c.json"}', f'--curves_png={tmp_path / "c.png"}'],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1 and r.stderr == f'experiments.py: error: {msg}\n' and not (tmp_path / 'c.json').exists(), r.stderr


def test_blimp_of_every_arm_paired_with_the_baseline(tiny_data, tmp_path):
    # two seeds of the baseline and a self-predicting arm, scored on BLiMP-format files with published
    # results beside them; snapshots give BLiMP against tokens; a rerun reuses every score
    from test_harness import BLIMP, write_blimp
    d, data, _ = tiny_data
    bdir = write_blimp(tmp_path / 'blimp' / 'data')
    pub = {u: dict(ngram=0.5 + 0.01 * i, lstm=0.6, txl=0.7, gpt2=0.8 + 0.01 * i) for i, u in enumerate(BLIMP)}
    (tmp_path / 'blimp' / 'models_summary.jsonl').write_text(''.join(json.dumps(dict(UID=u, **v)) + '\n'
                                                                    for u, v in pub.items()))
    out, eff_dir = d / 'blimp.json', d / 'bl'
    args = ['--mode=efficiency', f'--data_dir={data}', f'--eff_dir={eff_dir}', f'--out_json={out}',
            '--eff_runs=baseline,lime1_predict', '--eff_seeds=2', '--max_iters=4', '--eval_interval=2',
            '--eval_iters=2', '--warmup_iters=1', '--plot=False', *TINY_MODEL, '--block_size=48', '--blimp=True',
            f'--blimp_dir={bdir}', '--blimp_marginal_k=0', '--keep_checkpoints=3', '--blimp_snapshots=baseline']
    run_experiments(d, *args, timeout=600)
    res = load(out)['result']['archs']['gpt2']['blimp']
    rows = {r['arm']: r for r in res['rows']}
    assert res['pairs'] == sum(len(p) for _, p in BLIMP.values()) and res['paradigms'] == len(BLIMP)
    own = {n: [load(eff_dir / experiments.run_name(n, i) / 'ckpt.blimp.json')['entries'][-1]['blimp']
               for i in range(2)] for n in rows}
    for n, r in rows.items():
        assert r['overall_seeds'] == [b['overall'] for b in own[n]]
        assert r['overall'] == pytest.approx(np.mean(r['overall_seeds']))
    assert rows['lime1_predict']['likelihood'] == 'exact marginal' and rows['baseline']['delta'] is None
    diffs = [a['overall'] - b['overall'] for a, b in zip(own['lime1_predict'], own['baseline'])]
    assert rows['lime1_predict']['delta'] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert res['published']['gpt2']['overall'] == pytest.approx(np.mean([v['gpt2'] for v in pub.values()]))
    assert res['published']['ngram']['fields']['morphology'] == pytest.approx(0.505)
    table = (eff_dir / 'blimp_paradigms.md').read_text()
    assert all(f'| {u} | {f} |' in table for u, (f, _) in BLIMP.items())
    tpi = 4 * 48
    assert [t for t, _ in res['curves']['baseline']] == [2 * tpi, 4 * tpi]
    assert res['curves']['baseline'][-1][1] == pytest.approx(own['baseline'][0]['overall'])
    cache = {n: eff_dir / n / 'ckpt.blimp.json' for n in rows}
    stamp = {n: os.path.getmtime(f) for n, f in cache.items()}
    run_experiments(d, *args, timeout=600)
    assert {n: os.path.getmtime(f) for n, f in cache.items()} == stamp
    assert load(out)['result']['archs']['gpt2']['blimp']['rows'] == res['rows']
    # another marginal_k scores the self-predicting runs again, beside the exact scores; the baseline's stand
    run_experiments(d, *[a.replace('--blimp_marginal_k=0', '--blimp_marginal_k=8') for a in args], timeout=600)
    k8 = {r['arm']: r for r in load(out)['result']['archs']['gpt2']['blimp']['rows']}
    assert k8['lime1_predict']['likelihood'] == 'top-k bound (k=8)' and k8['baseline'] == rows['baseline']
    assert os.path.getmtime(cache['baseline']) == stamp['baseline'] and len(load(cache['baseline'])['entries']) == 1
    assert [e['want']['marginal_k'] for e in load(cache['lime1_predict'])['entries']] == [0, 8]
    stamp = os.path.getmtime(cache['lime1_predict'])
    run_experiments(d, *args, timeout=600)  # both settings are kept: the exact scores are read again
    assert os.path.getmtime(cache['lime1_predict']) == stamp
    assert load(out)['result']['archs']['gpt2']['blimp']['rows'] == res['rows']


def test_cooldown_arms_end_as_plain_models(tiny_data):
    # LIME trained with tags (full or causal), the last tenth without: its final val_nll has no tags, so
    # it is compared with the baseline's like any plain model; reaching the baseline counts plain models
    # only: the run's no-tag rows and its branches (cool_branches), cooled down from earlier snapshots
    d, data, _ = tiny_data
    out = d / 'cool.json'
    args = ['--mode=efficiency', f'--data_dir={data}', f'--eff_dir={d / "cool"}', f'--out_json={out}',
            '--eff_runs=baseline,lime_cooldown,lime_causal_cooldown,shuffled_cooldown', '--max_iters=10', '--eval_interval=5',
            '--eval_iters=2', '--warmup_iters=1', '--plot=False', '--cool_branches=True', *TINY_MODEL]
    run_experiments(d, *args, timeout=600)
    res = load(out)['result']['archs']['gpt2']
    rows = {r['arm']: r for r in res['decomposition']['rows']}
    base_log = load_log(d / 'cool' / 'baseline')
    tpi = base_log[-1]['tokens'] // 10
    for n in ('lime_cooldown', 'lime_causal_cooldown', 'shuffled_cooldown'):
        args_n = load(d / 'cool' / n / 'bench_args.json')['args']
        assert '--meta_cooldown=0.1' in args_n and '--keep_checkpoints=3' in args_n
        log = load_log(d / 'cool' / n)
        assert [r['val_no_tags'] for r in log] == [False, False, True]  # iterations 9-10 cooled
        assert log[-1]['val_nll'] == log[-1]['val_loss'] and log[-1]['val_nll_kind'] == 'exact'
        # the branch from iter 5: a budget of round(5 / 0.9) = 6 iterations, the last one without tags
        br = d / 'cool' / f'{n}_branch000005'
        b_args = load(br / 'bench_args.json')['args']
        assert f"--branch_from={d / 'cool' / n / 'ckpt_000005.pt'}" in b_args and '--max_iters=6' in b_args
        assert f'--meta_cooldown={1 / 6!r}' in b_args and '--lr_decay_iters=10' in b_args
        b_log = load_log(br)
        assert [(r['iter'], r['val_no_tags']) for r in b_log] == [(5, False), (6, True)]
        assert b_log[0]['val_loss'] == pytest.approx(log[1]['val_loss'], rel=1e-6)  # the snapshot it started from
        r = rows[n]
        assert not r['reads_future'] and r['tagger'] is False and r['val_nll_seeds'] == [pytest.approx(log[-1]['val_nll'])]
        base = base_log[-1]['val_nll']
        assert r['delta'] == pytest.approx(log[-1]['val_nll'] - base, abs=1e-9)
        # reaching the baseline's final: between the plain models at 6 and 10 iterations, never a row with tags
        pts = [b_log[-1], log[-1]]
        assert r['reached'] == int(any(p['val_nll'] <= base for p in pts))
        if r['reached']:
            assert r['reach_frac'] * base_log[-1]['tokens'] == pytest.approx(
                experiments.first_reach(pts, 'val_nll', base, lambda v, t: v <= t))
        cb = res['decomposition']['cooldown_budgets'][n]
        assert [(c['tokens'], c['branched_at']) for c in cb] == [(6 * tpi, 5), (10 * tpi, None)]
        assert cb[0]['val_nll'] == pytest.approx(b_log[-1]['val_nll'], abs=1e-6)
        base6 = base_log[1]['val_nll'] + (base_log[2]['val_nll'] - base_log[1]['val_nll']) / 5
        assert cb[0]['baseline_val_nll'] == pytest.approx(base6) and cb[1]['baseline_val_nll'] == pytest.approx(base)
        assert cb[0]['delta'] == pytest.approx(b_log[-1]['val_nll'] - base6)
    # a second run reuses the branches; a rerun of their source retrains them
    stamp = d / 'cool' / 'lime_cooldown_branch000005' / 'bench_args.json'
    t = os.path.getmtime(stamp)
    run_experiments(d, *args, timeout=600)
    assert os.path.getmtime(stamp) == t
    snap = d / 'cool' / 'lime_cooldown' / 'ckpt_000005.pt'
    os.utime(snap, (t + 10, t + 10))  # as if the source run had been trained again after the branch
    run_experiments(d, *args, timeout=600)
    assert os.path.getmtime(stamp) > t
    assert load_log(d / 'cool' / 'lime_cooldown')[1]['val_nll'] is None  # full tags read the future
