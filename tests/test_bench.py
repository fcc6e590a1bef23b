"""bench.py end to end on tiny presets: every mode runs and writes well-formed JSON.
A tiny real dataset (prepare.py on a few paragraphs, GPT-2's first 512 ranks) is built once."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT

import bench

TINY_MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4', '--device=cpu',
              '--dtype=float32', '--threads=1']

TEXT = ("The old man walked to the harbour in the morning. Mr. Smith sold 3 boats to the Navy in 1901, "
        "and the people of London cheered. She said that it would rain, but it did not. \"Where are you "
        "going?\" asked Alice. The Queen of Hearts shouted at the White Rabbit, who ran away quickly. ")


def run_bench(cwd, *args, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'bench.py'), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def load(path):
    with open(path) as f:
        text = f.read()
    assert 'NaN' not in text and 'Infinity' not in text
    return json.loads(text)


def all_finite(obj):
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('bench')
    docs = d / 'docs'
    docs.mkdir()
    for i in range(6):
        (docs / f'd{i}.txt').write_text(' '.join([TEXT] * (3 + i)))
    out = d / 'data'
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), '--input', str(docs), '--out_dir', str(out),
                        '--tokenizer', 'gpt2-512', '--ner', 'binary', '--workers', '1', '--no_progress',
                        '--val_fraction', '0.34'], capture_output=True, text=True, cwd=d)
    assert r.returncode == 0, r.stderr
    return d, out, docs


@pytest.fixture(scope='module')
def eff(tiny_data):
    d, data, _ = tiny_data
    out = d / 'eff.json'
    run_bench(d, '--mode=efficiency', f'--data_dir={data}', f'--eff_dir={d / "eff"}', f'--out_json={out}',
              '--max_iters=4', '--eval_interval=2', '--eval_iters=2', '--warmup_iters=1', '--plot=False',
              '--marginal_positions=6', *TINY_MODEL, timeout=900)  # 8 runs and two datasets: slow on a busy box
    return d, data, load(out)


def test_config_errors():
    with pytest.raises(SystemExit, match="unknown key 'tp_step'"):
        bench.configure(['--tp_step=3'])
    with pytest.raises(SystemExit, match='mode must be one of'):
        bench.configure(['--mode=fast'])
    with pytest.raises(SystemExit, match='tp_rounds must be int'):
        bench.configure(['--tp_rounds=two'])
    cfg = bench.configure(['--max_iters=2e3', '--compile=True'])
    assert cfg['max_iters'] == 2000 and cfg['compile'] is True


def test_first_reach_interpolates():
    rows = [dict(tokens=0, val_loss=5.0), dict(tokens=100, val_loss=3.0), dict(tokens=200, val_loss=2.0)]
    assert bench.first_reach(rows, 'val_loss', 2.5, lambda v, t: v <= t) == pytest.approx(150)
    assert bench.first_reach(rows, 'val_loss', 1.0, lambda v, t: v <= t) is None


def test_throughput(tmp_path):
    out = tmp_path / 'tp.json'
    run_bench(tmp_path, '--mode=throughput', f'--out_json={out}', '--tp_rounds=2', '--tp_steps=2',
              '--tp_warmup=1', '--vocab_size=64', *TINY_MODEL)
    res = load(out)
    assert res['mode'] == 'throughput' and all_finite(res)
    v = res['result']['variants']
    assert set(v) == {'baseline', 'lime', 'lime1', 'lime1_predict'}
    assert v['baseline']['param_overhead'] == 0 and v['lime']['param_overhead'] == (48 + 6) * 16
    # self-predicting: input tables, next-tag tables, and per stream a head (norm weight + linear)
    assert v['lime1_predict']['param_overhead'] == 3 * (48 + 6) * 16 + 2 * 16
    for r in v.values():
        assert r['tokens_per_sec_median'] > 0 and len(r['tokens_per_sec_rounds']) == 2
        assert r['ratio_vs_baseline'] > 0 and r['mfu'] is None  # no MFU on CPU


def test_throughput_gemma(tmp_path):
    out = tmp_path / 'tp.json'
    run_bench(tmp_path, '--mode=throughput', '--arch=gemma', '--n_kv_head=1', f'--out_json={out}', '--tp_rounds=1',
              '--tp_steps=1', '--tp_warmup=1', '--vocab_size=64', *TINY_MODEL)
    res = load(out)['result']
    assert res['arch'] == 'gemma' and res['n_kv_head'] == 1 and res['mlp_hidden'] == 64 and all_finite(res)
    v = res['variants']
    L, C, V, F = 2, 16, 64, 64  # 2 layers, 2 query heads of 8, 1 key/value head, GeGLU 4 * 16
    n = L * (C * (2 + 2) * 8 + C * C + 3 * C * F + 2 * C) + V * C + C
    assert v['baseline']['n_params'] == n and v['lime']['param_overhead'] == (48 + 6) * C
    # n_kv_head is gemma's: the same preset runs gpt2 with all heads
    out2 = tmp_path / 'tp2.json'
    run_bench(tmp_path, '--mode=throughput', '--n_kv_head=1', f'--out_json={out2}', '--tp_rounds=1', '--tp_steps=1',
              '--tp_warmup=1', '--vocab_size=64', '--tp_variants=baseline', *TINY_MODEL)
    assert load(out2)['result']['n_kv_head'] == 2


def test_throughput_real_data(tiny_data, tmp_path):
    _, data, _ = tiny_data
    out = tmp_path / 'tp.json'
    run_bench(tmp_path, '--mode=throughput', '--tp_data=real', f'--data_dir={data}', f'--out_json={out}',
              '--tp_rounds=1', '--tp_steps=1', '--tp_warmup=1', '--tp_variants=baseline,lime1,lime1_predict', *TINY_MODEL)
    res = load(out)['result']
    assert res['vocab_size'] == 513 and set(res['variants']) == {'baseline', 'lime1', 'lime1_predict'}


def test_tagging(tiny_data):
    d, _, docs = tiny_data
    out = d / 'tag.json'
    run_bench(d, '--mode=tagging', f'--data_input={docs}', f'--out_json={out}', '--tag_warm_words=200',
              '--tag_time_words=300', '--tag_ref_words=100', '--tag_doc_chars=1000', '--tag_workers=2')
    res = load(out)
    assert all_finite(res)
    r = res['result']
    names = {(x['name'], x['procs'], x['cache']) for x in r['rows']}
    for key in [('tiktoken', 1, '-'), ('full fast', 1, 'cold'), ('full fast', 1, 'warm'), ('full NLTK', 1, '-'),
                ('causal fast', 1, 'warm'), ('causal NLTK', 1, '-'), ('full fast', 2, 'warm')]:
        assert key in names
    for x in r['rows']:
        assert x['words'] > 0 and x['words_per_sec'] > 0
    assert set(r['speedup_fast_over_nltk']) == {'full_warm', 'full_cold', 'causal_warm'}


def test_startup(tmp_path, monkeypatch):
    # fresh processes from an empty model cache (the first builds it): every step is timed, the
    # steps add up to 'ready to tag', and tagging imports only nltk_fast.STARTUP_MODULES' part of NLTK
    out = tmp_path / 'startup.json'
    monkeypatch.setenv('LIME_CACHE_DIR', str(tmp_path / 'cache'))
    run_bench(tmp_path, '--mode=startup', '--startup_runs=2', f'--out_json={out}')
    r = load(out)['result']
    rows = {x['step']: x for x in r['rows']}
    steps = ['import numpy', 'import metadata', 'import nltk', 'punkt', 'POS tagger', 'NE chunker', 'GPT-2',
             'first sentence']
    assert list(rows) == ['python -c pass', 'metadata.py CLI, one sentence'] + steps + ['ready to tag']
    assert all(0 < x['min_s'] <= x['median_s'] <= x['max_s'] for x in rows.values())
    assert sum(rows[s]['min_s'] for s in steps) <= rows['ready to tag']['max_s']
    assert r['first_cli_s'] > 0 and sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [
        'file-hashes.json', 'gpt2.tables', 'ne_binary.tables', 'pos.tables', 'punkt.tables']
    assert len(r['nltk_modules']) == 1 and r['nltk_modules'][0] < 40   # not the ~245 of a plain import


def test_efficiency(eff):
    d, data, res = eff
    assert all_finite(res)
    runs = res['result']['runs']
    assert list(runs) == ['baseline', 'lime', 'lime_causal', 'lime1', 'lime1_predict', 'shuffled', 'baseline_seed2',
                          'baseline_plain']
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
    assert honest == {'baseline', 'lime_causal', 'lime1_predict', 'baseline_seed2', 'baseline_plain'}
    for n, r in runs.items():
        assert (r['final_val_nll'] is None) == r['reads_future'] == (r['final_val_bpb'] is None)
        assert r['final_val_bytes_per_token'] > 0 and r['other_tokens'] == (n == 'baseline_plain')
        if not r['reads_future']:  # bits per byte: val_nll / (ln 2 * bytes per target token)
            assert r['final_val_bpb'] == pytest.approx(r['final_val_nll'] / (math.log(2) * r['final_val_bytes_per_token']))
        if r['reads_future']:
            assert r['frac_tokens_to_baseline_nll'] is None and bench.reach_cell(r, 'frac_tokens_to_baseline_nll') == 'n/a'
    p = runs['lime1_predict']
    assert p['final_val_nll'] == pytest.approx(p['final_val_loss_bound']) and p['final_val_nll'] > p['final_val_loss']
    # the plain-tokenization arm: the same documents and split, GPT-2's own encoding, compared by bpb only
    plain = runs['baseline_plain']
    assert plain['frac_tokens_to_baseline_nll'] is None and plain['frac_tokens_to_baseline_loss'] is None
    assert bench.reach_cell(plain, 'frac_tokens_to_baseline_nll') == 'n/a'
    assert bench.reach_cell(plain, 'frac_tokens_to_baseline_bpb') != 'n/a'
    assert runs['baseline']['frac_tokens_to_baseline_bpb'] == pytest.approx(1.0)
    lime_meta, plain_meta = load(data / 'meta.json'), load(str(data) + '_plain/meta.json')
    assert plain_meta['tokenization'] == 'plain' and lime_meta['tokenization'] == 'lime'
    for k in ('train_docs', 'val_docs', 'tokenizer', 'inputs', 'seed'):
        assert plain_meta[k] == lime_meta[k]
    assert res['result']['plain_data_dir'] == str(data) + '_plain'
    args = load(d / 'eff' / 'baseline_plain' / 'bench_args.json')['args']
    assert f'--data_dir={data}_plain' in args
    m = res['result']['marginal']
    assert m['positions'] == 6 and m['marginalised'] == ['pos_causal', 'ner_causal'] and m['values'] == 48 * 6
    assert 0 <= m['gap'] and m['marginal'] <= m['bound'] and 0 < m['tag_cost'] < m['bound']
    # the honest runs at the same positions, for scale: the baseline's mean is its own loss there
    same = m['same_positions']
    assert set(same) == {'baseline', 'lime_causal'} and same['baseline']['se'] > 0
    assert same['baseline']['marginal_minus'] == pytest.approx(m['marginal'] - same['baseline']['nll'])
    from model import GPT
    from train import Split, eval_starts, load_checkpoint
    base = GPT.from_checkpoint(load_checkpoint(str(d / 'eff' / 'baseline' / 'ckpt.pt')), 'cpu').eval()
    sp, nll = Split(str(data), 'val', [], 0), []
    for i in eval_starts(sp.n, base.config.block_size, 6):
        x, y, _ = sp.windows([i], base.config.block_size)
        with torch.no_grad():
            nll.append(-torch.log_softmax(base(x)[0][0, -1], -1)[y[0, -1]].item())
    assert same['baseline']['nll'] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert (d / 'eff' / 'lime1' / 'ckpt.pt').exists()
    # a second call reuses the finished runs instead of training again
    r = run_bench(d, '--mode=efficiency', f'--data_dir={data}', f'--eff_dir={d / "eff"}',
                  f'--out_json={d / "eff2.json"}', '--max_iters=4', '--eval_interval=2', '--eval_iters=2',
                  '--warmup_iters=1', '--plot=False', '--eff_runs=baseline,lime', *TINY_MODEL)
    assert 'reusing' in r.stdout


def test_curves(eff, monkeypatch, capsys):
    d, _, _ = eff
    runs = [str(d / 'eff' / n) for n in ('baseline', 'lime', 'lime_causal', 'lime1_predict')]
    out, png = d / 'curves.json', d / 'curves.png'
    run_bench(d, '--mode=curves', *runs, f'--out_json={out}', f'--curves_png={png}')
    r = load(out)['result']
    assert r['baseline'] == 'baseline' and set(r['runs']) == {'baseline', 'lime', 'lime_causal', 'lime1_predict'}
    assert r['runs']['lime']['reads_future'] and not r['runs']['lime_causal']['reads_future']
    pytest.importorskip('matplotlib')
    assert png.stat().st_size > 10000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # without matplotlib: one line naming the package, and the numbers still come
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert bench.draw_curves({'b': bench.read_log(d / 'eff' / 'baseline' / 'log.jsonl')}, 'b', str(d / 'x.png')) is None
    assert 'pip install matplotlib' in capsys.readouterr().out and not (d / 'x.png').exists()
    with pytest.raises(SystemExit, match='log.jsonl: not found'):
        bench.run_curves(types.SimpleNamespace(curves_baseline='', curves_png=str(png)), [str(d)])


def test_steering(eff):
    d, _, _ = eff
    out = d / 'steer.json'
    run_bench(d, '--mode=steering', f'--ckpt_dir={d / "eff" / "lime1"}', f'--base_ckpt_dir={d / "eff" / "baseline"}',
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
    d, data, _ = tiny_data
    out = d / 'gpu_check.json'
    run_bench(d, str(ROOT / 'configs' / 'bench_gpu_check.py'), f'--data_dir={data}', f'--eff_dir={d / "gc"}',
              f'--out_json={out}', '--tp_rounds=1', '--tp_steps=1', '--tp_warmup=1', '--vocab_size=64',
              '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--eff_runs=baseline,lime1', '--plot=False',
              '--steer_windows=2', '--steer_samples=2', '--steer_prompt=4', '--steer_new_tokens=3', *TINY_MODEL,
              '--eff_n_layer=0', '--eff_n_head=0', '--eff_n_embd=0', '--eff_block_size=0', '--eff_batch_size=0',
              '--n_kv_head=1', '--compile=False')  # inductor on CPU needs a C++ toolchain and minutes; CUDA compiles in the real check
    res = load(out)
    assert res['mode'] == 'gpu_check' and all_finite(res)
    assert {'throughput', 'throughput_gemma', 'efficiency', 'steering'} <= set(res['result'])
    assert res['result']['throughput_gemma']['arch'] == 'gemma' and res['result']['throughput']['arch'] == 'gpt2'
    assert set(res['result']['throughput_gemma']['variants']) == {'lime'}
    assert res['result']['steering']['generator'].startswith('sample.generate')


def test_downstream(tiny_data):
    """The downstream mode end to end on tiny data: arithmetic mixed in (no test problem), offline
    tasks through harness.py, a row per model and tag policy, the oracle marked."""
    pytest.importorskip('lm_eval')
    d, _, docs = tiny_data
    out = d / 'ds.json'
    run_bench(d, '--mode=downstream', f'--data_dir={d / "ds_data"}', f'--data_input={docs}', '--data_tokenizer=gpt2-512',
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
