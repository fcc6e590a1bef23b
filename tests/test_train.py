import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, write_dataset
from model import GPT, GPTConfig

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the box is shared

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
        '--eval_iters=4', '--log_interval=1000', '--warmup_iters=10', '--learning_rate=3e-3',
        '--min_lr=3e-4', '--device=cpu', '--dtype=float32']


def run(data, out, *extra):
    train.main(TINY + [f'--data_dir={data}', f'--out_dir={out}', *extra])
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def script(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}, cwd='/')


# --- configuration -----------------------------------------------------------

def test_config_types_and_unknown_keys(tmp_path):
    cfg, explicit = train.configure(['--max_iters=2e4', '--learning_rate=1', '--metadata=pos,ner', '--compile=True'])
    assert cfg['max_iters'] == 20000 and type(cfg['max_iters']) is int
    assert cfg['learning_rate'] == 1.0 and cfg['metadata'] == 'pos,ner' and cfg['compile'] is True
    assert explicit == {'max_iters', 'learning_rate', 'metadata', 'compile'}
    assert train.configure(['--meta_weight=[1.0, 0.5]'])[0]['meta_weight'] == [1.0, 0.5]
    for bad, msg in [('--max_iters=2.5', 'max_iters must be int'), ('--max_iters=abc', 'max_iters must be int'),
                     ('--compile=1', 'compile must be bool'), ('--learning_rate=fast', 'learning_rate must be float'),
                     ('--batch_sise=4', "unknown key 'batch_sise'"), ('--device=3', 'device must be str')]:
        with pytest.raises(SystemExit, match=msg):
            train.configure([bad])
    f = tmp_path / 'c.py'
    f.write_text("import math\nn_layer = 2\nlerning_rate = 1e-3\n")
    with pytest.raises(SystemExit, match=f"unknown key 'lerning_rate' .*{f.name}"):
        train.configure([str(f)])
    f.write_text("n_layer = 2\nmax_iters = 1e3\n")
    assert train.configure([str(f), '--n_layer=3'])[0]['n_layer'] == 3


def test_config_error_is_one_line_without_traceback():
    r = script('--no_such_key=1')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip() == "config error: unknown key 'no_such_key' (--no_such_key=1)"


# --- data checks ---------------------------------------------------------------

def test_data_errors(tmp_path, dataset):
    with pytest.raises(SystemExit, match=r"meta.json: unknown metadata stream 'dep'"):
        run(dataset, tmp_path / 'o', '--metadata=pos,dep', '--max_iters=1')
    with pytest.raises(SystemExit, match=r"no_data.*meta.json: not found"):
        run(tmp_path / 'no_data', tmp_path / 'o', '--max_iters=1')
    bad = write_dataset(tmp_path / 'bad')
    np.zeros(10, np.uint16).tofile(bad / 'val.ner.bin')
    with pytest.raises(SystemExit, match=r"val.ner.bin: 10 tags but .*val.bin has 4000 tokens"):
        run(bad, tmp_path / 'o', '--metadata=ner', '--max_iters=1')
    run(bad, tmp_path / 'o', '--metadata=pos', '--max_iters=1')  # an unused bad stream is fine


def test_resume_refuses_other_tag_vocabulary(tmp_path, dataset):
    out = tmp_path / 'o'
    run(dataset, out, '--metadata=pos', '--max_iters=2')
    meta = json.loads((dataset / 'meta.json').read_text())
    meta['streams']['pos']['tags'][3] = 'NOUN'
    (dataset / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"ckpt.pt: tag vocabulary of stream 'pos' differs from .*meta.json"):
        run(dataset, out, '--init_from=resume', '--max_iters=4')
    meta['streams']['pos']['tags'][3] = 'T0'
    meta['tokenizer'] = 'gpt2'
    (dataset / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"ckpt.pt: checkpoint tokenizer 'test' differs from 'gpt2'"):
        run(dataset, out, '--init_from=resume', '--max_iters=4')


# --- batches, metadata dropout, shuffle -----------------------------------------

def test_batches_are_a_function_of_seed_and_iteration(dataset):
    sp = train.Split(dataset, 'train', ['pos'], 0)
    a = train.sample_batch(sp, 1, 5, 16, 32, ['pos'], 0.0)
    assert a == train.sample_batch(sp, 1, 5, 16, 32, ['pos'], 0.0)
    assert a[0] != train.sample_batch(sp, 1, 6, 16, 32, ['pos'], 0.0)[0]
    assert a[0] != train.sample_batch(sp, 2, 5, 16, 32, ['pos'], 0.0)[0]
    # fixed validation windows: a function of the data length and eval config only
    assert train.eval_starts(4000, 32, 8) == train.eval_starts(4000, 32, 8)
    assert max(train.eval_starts(4000, 32, 8)) == 4000 - 33


def test_meta_shift_alignment(dataset):
    tok = np.fromfile(dataset / 'train.bin', np.uint16)
    pos = np.fromfile(dataset / 'train.pos.bin', np.uint16)
    for shift in (0, 1):
        x, y, meta = train.Split(dataset, 'train', ['pos'], shift).windows([0, 100], 32)
        assert (x[1].numpy() == tok[100:132]).all() and (y[1].numpy() == tok[101:133]).all()
        assert (meta['pos'][1].numpy() == pos[100 + shift:132 + shift]).all()


def test_meta_dropout(dataset):
    sp = train.Split(dataset, 'train', ['pos', 'ner'], 0)
    starts, masks = train.sample_batch(sp, 0, 3, 64, 32, ['pos', 'ner'], 0.25)
    assert set(masks) == {'pos', 'ner'} and not torch.equal(masks['pos'], masks['ner'])
    assert abs(masks['pos'].float().mean().item() - 0.25) < 0.03
    _, _, meta = sp.windows(starts, 32)
    dropped = train.apply_meta_dropout(meta, masks)
    for s in ('pos', 'ner'):
        assert (dropped[s][masks[s]] == train.UNK).all()
        assert torch.equal(dropped[s][~masks[s]], meta[s][~masks[s]])
    # the same (seed, iteration) drops the same tags; p = 0 draws nothing
    assert all(torch.equal(masks[s], train.sample_batch(sp, 0, 3, 64, 32, ['pos', 'ner'], 0.25)[1][s]) for s in masks)
    assert train.sample_batch(sp, 0, 3, 64, 32, ['pos'], 0.0)[1] == {}


def test_meta_shuffle(dataset):
    for n in (1000, 4096, 4000):
        a, b = train.affine_perm(n, 7, 'pos')
        assert sorted((a * p + b) % n for p in range(n)) == list(range(n))
    T = 40
    plain = train.Split(dataset, 'val', ['pos', 'ner'], 0)
    shuf = train.Split(dataset, 'val', ['pos', 'ner'], 0, shuffle_seed=7)
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
    again = train.Split(dataset, 'val', ['pos'], 0, shuffle_seed=7).windows(starts, T)[2]['pos']
    other = train.Split(dataset, 'val', ['pos'], 0, shuffle_seed=8).windows(starts, T)[2]['pos']
    assert torch.equal(m1['pos'], again) and not torch.equal(m1['pos'], other)


def test_lime_plus_one_uses_next_tokens_metadata(tmp_path, dataset):
    # the next token is a function of its own tag only, so only LIME+1 can predict it
    common = ['--max_iters=150', '--eval_interval=150', '--lr_decay_iters=150', '--batch_size=16']
    base = run(dataset, tmp_path / 'b', *common)[-1]
    lime = run(dataset, tmp_path / 'l', *common, '--metadata=pos')[-1]
    lime1 = run(dataset, tmp_path / 'l1', *common, '--metadata=pos', '--meta_shift=1')[-1]
    print(base['val_loss'], lime['val_loss'], lime1['val_loss'])
    assert {'iter', 'tokens', 'lr', 'train_loss', 'val_loss', 'val_ppl', 'val_acc', 'val_acc_word_start',
            'val_acc_word_cont', 'tokens_per_sec', 'mfu', 'elapsed_s'} <= set(base)
    assert base['tokens'] == 150 * 16 * 32 and base['mfu'] is None  # no peak FLOP/s known on CPU
    assert base['val_loss'] > 1.8 and lime['val_loss'] > 1.8  # log(8) = 2.08
    assert lime1['val_loss'] < 0.3 and lime1['val_acc'] > 0.99
    assert lime1['val_acc_word_start'] > 0.99 and lime1['val_acc_word_cont'] > 0.99
    # the meta_shuffle control destroys the signal
    shuf = run(dataset, tmp_path / 's', *common, '--metadata=pos', '--meta_shift=1', '--meta_shuffle=True')[-1]
    assert shuf['val_loss'] > 1.8


def test_resume_continues_the_same_run(tmp_path, dataset):
    args = ['--metadata=pos,ner', '--meta_dropout=0.1', '--dropout=0.1', '--eval_interval=5', '--lr_decay_iters=20',
            '--gradient_accumulation_steps=2']
    full = run(dataset, tmp_path / 'a', *args, '--max_iters=20')
    run(dataset, tmp_path / 'b', *args, '--max_iters=10')
    resumed = run(dataset, tmp_path / 'b', '--init_from=resume', '--max_iters=20')  # config comes from the ckpt
    assert [r['iter'] for r in resumed] == [0, 5, 10, 15, 20]
    for a, b in zip(full, resumed):
        for k in ('lr', 'train_loss', 'val_loss', 'val_acc', 'tokens'):
            if a[k] is None or b[k] is None:  # train_loss at iteration 0: nothing trained yet
                assert a[k] is None and b[k] is None, (a['iter'], k)
            else:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a['iter'], k)
    # the checkpoint alone rebuilds the model
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 20 and ckpt['dataset']['streams']['pos']['tags'][3] == 'T0'
    m = GPT.from_checkpoint(ckpt).eval()
    x, y, meta = train.Split(dataset, 'val', ['pos', 'ner'], 0).windows(train.eval_starts(4000, 32, 4 * 8), 32)
    with torch.no_grad():
        _, loss = m(x, meta, targets=y)
    assert loss.item() == pytest.approx(resumed[-1]['val_loss'], rel=1e-4)


GEMMA = ['--arch=gemma', '--n_head=4', '--n_kv_head=2']  # head size 8, grouped-query attention


@pytest.mark.parametrize('arch', [[], GEMMA + ['--n_kv_head=1']], ids=['gpt2', 'gemma'])
def test_ddp_matches_single_process(tmp_path, dataset, arch):
    args = TINY + arch + [f'--data_dir={dataset}', '--metadata=pos', '--meta_dropout=0.2', '--max_iters=6',
                          '--eval_interval=3', '--gradient_accumulation_steps=4', '--lr_decay_iters=6']
    r1 = script(*args, f'--out_dir={tmp_path / "one"}')
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                         str(ROOT / 'train.py'), *args, f'--out_dir={tmp_path / "two"}'],
                        capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, cwd='/')
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = [json.loads(l) for l in open(tmp_path / 'one' / 'log.jsonl')]
    two = [json.loads(l) for l in open(tmp_path / 'two' / 'log.jsonl')]
    assert [r['iter'] for r in two] == [0, 3, 6]
    for a, b in zip(one, two):
        assert a['tokens'] == b['tokens']
        for k in ('val_loss', 'val_acc', 'train_loss'):
            if a[k] is None or b[k] is None:
                assert a[k] is None and b[k] is None, (a['iter'], k)
            else:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a['iter'], k)


@pytest.mark.parametrize('arch', [[], GEMMA], ids=['gpt2', 'gemma'])
def test_compiled_training_step(tmp_path, dataset, arch):
    rows = run(dataset, tmp_path / 'c', *arch, '--compile=True', '--metadata=pos', '--max_iters=1', '--eval_iters=1')
    assert rows[-1]['iter'] == 1 and np.isfinite(rows[-1]['train_loss'])
    if arch:  # the compiled gemma model computes what the eager one does
        ckpt = torch.load(tmp_path / 'c' / 'ckpt.pt', weights_only=False)
        m = GPT.from_checkpoint(ckpt).eval()
        assert m.config.arch == 'gemma' and m.config.n_kv_head == 2
        x, y, meta = train.Split(dataset, 'val', ['pos'], 0).windows(train.eval_starts(4000, 32, 8), 32)
        with torch.no_grad():
            _, loss = m(x, meta, targets=y)
        assert loss.item() == pytest.approx(rows[-1]['val_loss'], rel=1e-4)


def test_gemma_lime_plus_one_uses_next_tokens_metadata(tmp_path, dataset):
    # test_lime_plus_one_uses_next_tokens_metadata on the Gemma-style model: the same task, steps, limits
    common = [*GEMMA, '--max_iters=150', '--eval_interval=150', '--lr_decay_iters=150', '--batch_size=16']
    base = run(dataset, tmp_path / 'b', *common)[-1]
    lime = run(dataset, tmp_path / 'l', *common, '--metadata=pos')[-1]
    lime1 = run(dataset, tmp_path / 'l1', *common, '--metadata=pos', '--meta_shift=1')[-1]
    print(base['val_loss'], lime['val_loss'], lime1['val_loss'])
    assert base['val_loss'] > 1.8 and lime['val_loss'] > 1.8  # log(8) = 2.08
    assert lime1['val_loss'] < 0.3 and lime1['val_acc'] > 0.99
    ckpt = torch.load(tmp_path / 'l1' / 'ckpt.pt', weights_only=False)
    assert ckpt['model_args']['arch'] == 'gemma' and 'transformer.wpe.weight' not in ckpt['model']


def test_arch_comes_from_the_checkpoint_on_resume(tmp_path, dataset):
    args = ['--metadata=pos', '--eval_interval=5', '--lr_decay_iters=10']
    full = run(dataset, tmp_path / 'a', *GEMMA, *args, '--max_iters=10')
    run(dataset, tmp_path / 'b', *GEMMA, *args, '--max_iters=5')
    resumed = run(dataset, tmp_path / 'b', '--init_from=resume', '--max_iters=10')  # no arch flags
    assert resumed[-1]['val_loss'] == pytest.approx(full[-1]['val_loss'], rel=1e-6)
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=False)['model_args']['n_kv_head'] == 2
    # a checkpoint written before the arch keys existed resumes as gpt2
    run(dataset, tmp_path / 'old', *args, '--max_iters=5')
    path = tmp_path / 'old' / 'ckpt.pt'
    ckpt = torch.load(path, weights_only=False)
    for k in ('arch', 'n_kv_head', 'mlp_hidden'):
        del ckpt['model_args'][k]
        del ckpt['config'][k]
    torch.save(ckpt, path)
    rows = run(dataset, tmp_path / 'old', '--init_from=resume', '--max_iters=10')
    assert rows[-1]['iter'] == 10
    assert torch.load(path, weights_only=False)['model_args']['arch'] == 'gpt2'


def test_bad_model_shape_is_a_one_line_error(tmp_path, dataset):
    r = script(*TINY, f'--data_dir={dataset}', f'--out_dir={tmp_path}', '--arch=gemma', '--n_head=4', '--n_kv_head=3')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "config error: n_head=4 is not a multiple of n_kv_head=3"
    r = script(*TINY, f'--data_dir={dataset}', f'--out_dir={tmp_path}', '--n_kv_head=1')
    assert r.returncode != 0 and "grouped-query attention needs arch='gemma'" in r.stderr


@pytest.mark.parametrize('name', ['gemma_500m', 'gemma_1b', 'gemma_2b', 'cpu_demo_gemma'])
def test_gemma_configs_build_with_the_sizes_they_state(name):
    import re
    path = ROOT / 'configs' / f'{name}.py'
    cfg, _ = train.configure([str(path)])
    assert cfg['arch'] == 'gemma' and cfg['n_head'] % cfg['n_kv_head'] == 0
    kw = {k: cfg[k] for k in train.MODEL_KEYS}
    with torch.device('meta'):  # sizes without memory
        base = GPT(GPTConfig(**kw, vocab_size=50257))
        lime = GPT(GPTConfig(**kw, vocab_size=50257, meta_streams=('pos', 'ner'), meta_n_tags=(48, 6)))
    m = re.search(r'# parameters: ([\d,]+) \(meta device\); \+([\d,]+) with', path.read_text())
    if name.startswith('gemma_'):  # the GPU configs say their size; GPT-2's vocabulary, 48 POS + 6 NER tags
        assert m, name
        assert base.get_num_params() == int(m[1].replace(',', ''))
        assert lime.get_num_params() - base.get_num_params() == int(m[2].replace(',', ''))
        tokens = cfg['batch_size'] * cfg['gradient_accumulation_steps'] * cfg['block_size']
        assert f"= {tokens:,}" in path.read_text()
