"""bench.py (the cost benchmarks) end to end on tiny presets: every mode runs and writes well-formed
JSON. A tiny real dataset (prepare.py on a few paragraphs, GPT-2's first 512 ranks) is built once;
tests/test_experiments.py uses these helpers too."""
import json
import math
import os
import subprocess
import sys
import types

import pytest

from conftest import ROOT

import bench

TINY_MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4', '--device=cpu',
              '--dtype=float32', '--threads=1']

TEXT = ("The old man walked to the harbour in the morning. Mr. Smith sold 3 boats to the Navy in 1901, "
        "and the people of London cheered. She said that it would rain, but it did not. \"Where are you "
        "going?\" asked Alice. The Queen of Hearts shouted at the White Rabbit, who ran away quickly. ")


def run_script(script, cwd, *args, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def run_bench(cwd, *args, timeout=300):
    return run_script('bench.py', cwd, *args, timeout=timeout)


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


def test_tagging_corpus_is_the_txt_files_prepare_reads(tmp_path):
    # bench.py reads data_input itself (it imports no other script): the .txt files prepare.py would
    # read, in its order; a file of another format named there is a one-line error
    import prepare
    (tmp_path / 'b' / 'c').mkdir(parents=True)
    for i, name in enumerate(['z.txt', 'b/c/y.txt', 'b/x.txt', 'a.txt', 'b/w.txt']):
        (tmp_path / name).write_text(f'\ufeffdocument {i}\r\n')
    args = bench.configure(['--data_input=' + ','.join([str(tmp_path / 'z.txt'), str(tmp_path)])])
    C = types.SimpleNamespace(**{**args, 'tag_doc_chars': 1})
    units = prepare.list_units(types.SimpleNamespace(hf_dataset=None, input=C.data_input.split(',')))[0]
    assert bench.corpus_docs(C) == [text for u in units for _, _, text in prepare.read_unit(u, 'text')]
    assert bench.corpus_docs(C)[:2] == ['document 0\r\n', 'document 3\r\n']  # BOM dropped, as prepare.py
    (tmp_path / 'd.jsonl').write_text('{"text": "a"}\n')
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'd.jsonl'}: the tagging corpus \\(data_input\\) is .txt files"):
        bench.txt_files([str(tmp_path / 'd.jsonl')])
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'no.txt'}: cannot read"):
        bench.corpus_docs(types.SimpleNamespace(data_input=str(tmp_path / 'no.txt'), tag_doc_chars=1))


def test_config_errors():
    with pytest.raises(SystemExit, match="unknown key 'tp_step'"):
        bench.configure(['--tp_step=3'])
    with pytest.raises(SystemExit, match='mode must be one of'):
        bench.configure(['--mode=fast'])
    with pytest.raises(SystemExit, match='tp_rounds must be int'):
        bench.configure(['--tp_rounds=two'])
    cfg = bench.configure(['--tp_steps=2e3', '--compile=True'])
    assert cfg['tp_steps'] == 2000 and cfg['compile'] is True
    # the experiments are experiments.py's: neither their modes nor their keys are bench.py's
    with pytest.raises(SystemExit, match='mode must be one of throughput, tagging, startup, gpu_check'):
        bench.configure(['--mode=efficiency'])
    for key in ('eff_n_layer', 'eff_runs', 'max_iters', 'steer_windows', 'ds_runs', 'curves_png'):
        with pytest.raises(SystemExit, match=f"unknown key '{key}'"):
            bench.configure([f'--{key}=1'])


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
    steps = ['import numpy', 'import metadata', 'import nltk', 'POS tagger', 'NE chunker', 'GPT-2',
             'punkt, first sentence']
    assert list(rows) == ['python -c pass', 'metadata.py CLI, one sentence'] + steps + ['ready to tag']
    assert all(0 < x['min_s'] <= x['median_s'] <= x['max_s'] for x in rows.values())
    assert sum(rows[s]['min_s'] for s in steps) <= rows['ready to tag']['max_s']
    assert r['first_cli_s'] > 0 and sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [
        'file-hashes.json', 'gpt2.tables', 'ne_binary.tables', 'pos.tables', 'punkt.tables']
    assert len(r['nltk_modules']) == 1 and r['nltk_modules'][0] < 40   # not the ~245 of a plain import


def test_gpu_check_plumbing_on_cpu(tmp_path):
    # the GPU check's cost part (its experiments part: tests/test_experiments.py)
    out = tmp_path / 'gpu_check.json'
    run_bench(tmp_path, str(ROOT / 'configs' / 'bench_gpu_check.py'), f'--out_json={out}', '--tp_rounds=1',
              '--tp_steps=1', '--tp_warmup=1', '--vocab_size=64', *TINY_MODEL, '--n_kv_head=1',
              '--compile=False')  # inductor on CPU needs a C++ toolchain and minutes; CUDA compiles in the real check
    res = load(out)
    assert res['mode'] == 'gpu_check' and all_finite(res)
    assert set(res['result']) == {'throughput', 'throughput_gemma', 'wall_s'}
    assert res['result']['throughput_gemma']['arch'] == 'gemma' and res['result']['throughput']['arch'] == 'gpt2'
    assert set(res['result']['throughput_gemma']['variants']) == {'lime'}


def test_startup_steps_is_a_script_mode_without_torch(tmp_path):
    # the start-up child is bench.py's own code path (public metadata functions), not a program in a
    # string; it runs before bench.py imports torch, so torch's import is not in what it times
    r = subprocess.run([sys.executable, '-X', 'importtime', str(ROOT / 'bench.py'), '--startup_steps',
                        'The old man the boat.', 'none'], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert list(got['laps']) == ['import numpy', 'import metadata', 'import nltk', 'POS tagger', 'GPT-2',
                                 'punkt, first sentence', 'ready to tag']
    imported = {line.split('|')[-1].strip() for line in r.stderr.splitlines() if line.startswith('import time:')}
    assert 'metadata' in imported and 'torch' not in imported
    assert not hasattr(bench, '_STARTUP_STEPS')
