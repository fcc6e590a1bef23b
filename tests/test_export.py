"""export.py: transformers' models of our checkpoints give our logits and greedy tokens, with GPT-2's
tokenizer rebuilt offline; and train.py's metadata cooldown, which makes a LIME model exportable."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import export
import sample
import train
from conftest import ROOT, write_dataset
from model import GPT, GPTConfig

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the box is shared

# transformers and safetensors are optional extras (requirements-dev.txt pins them)
needs_hf = pytest.mark.skipif(importlib.util.find_spec('transformers') is None
                              or importlib.util.find_spec('safetensors') is None,
                              reason='transformers/safetensors not installed (pip install -r requirements-dev.txt)')

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
        '--eval_iters=4', '--log_interval=1000', '--warmup_iters=10', '--learning_rate=3e-3',
        '--min_lr=3e-4', '--device=cpu', '--dtype=float32']
GEMMA_GQA = ['--arch=gemma', '--n_head=4', '--n_kv_head=2']  # head size 8, two query heads per key/value head


def run(data, out, *extra):
    train.main(TINY + [f'--data_dir={data}', f'--out_dir={out}', *extra])
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def export_main(*args, capsys=None):
    if capsys:
        capsys.readouterr()  # only what this call prints
    rc = export.main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ''
    return rc, err


def save_ckpt(model, path, tokenizer='test'):
    """A checkpoint as train.py writes one (what load_checkpoint needs) of a model made here."""
    c = model.config
    streams = {s: {'tags': [f'T{i}' for i in range(n)]} for s, n in zip(c.meta_streams, c.meta_n_tags)}
    torch.save(dict(model=model.state_dict(), model_args=dict(vars(c)), config={},
                    dataset=dict(tokenizer=tokenizer, tokenization='plain', streams=streams), iter_num=0), path)
    return path


def perturbed(seed, **kw):
    """A random tiny model whose norm weights and biases are moved well away from their init (ones or
    zeros), so that a norm read as w instead of 1 + w, or a dropped bias, shows in the logits; and
    whose matrices are 10x their init, so that activations are O(1) (at init the MLP inputs are too
    small for the erf and tanh GELUs to differ, and attention is nearly uniform over positions)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64, **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
            else:
                p.mul_(10)
    return m.eval()


def ours(model, idx):
    """All positions' logits; a cooled-down LIME model without tags (meta=None), as exported."""
    with torch.no_grad():
        return model(idx, None, targets=idx)[0]


def max_logit_diff(model, hf, seed=0):
    """Max |our logits - transformers' logits| over random sequences of 1, 7 and block_size tokens."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for T in (1, 7, model.config.block_size):
        idx = torch.randint(0, model.config.vocab_size, (3, T), generator=g)
        with torch.no_grad():
            theirs = hf(idx).logits
        worst = max(worst, (ours(model, idx) - theirs).abs().max().item())
    return worst


def load_hf(d):
    import transformers
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    # every tensor of the model came from the file and nothing in the file was left over
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    return hf.eval()


# --- equality with transformers ------------------------------------------------

RANDOM = {'gpt2_bias': dict(bias=True), 'gpt2_no_bias': dict(bias=False),
          'gemma_gqa': dict(arch='gemma', n_kv_head=2), 'gemma_mqa': dict(arch='gemma', n_kv_head=1)}


@needs_hf
@pytest.mark.parametrize('name', sorted(RANDOM))
def test_random_models_give_our_logits_in_transformers(tmp_path, name):
    model = perturbed(1, **RANDOM[name])
    d = tmp_path / 'hf'
    export.export(save_ckpt(model, tmp_path / 'ckpt.pt'), d)
    hf = load_hf(d)
    assert type(hf).__name__ == ('GemmaForCausalLM' if 'gemma' in name else 'GPT2LMHeadModel')
    cfg = json.loads((d / 'config.json').read_text())
    assert 'auto_map' not in cfg  # no custom code
    assert (d / 'model.safetensors').is_file() and not (d / 'pytorch_model.bin').exists()
    diff = max_logit_diff(model, hf)
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Runs of train.py on the test data: LIME with a metadata cooldown (full tags: pos, ner) and
    baselines, both archs. {name: run dir}; gpt2_lime also keeps its snapshots (ckpt_000010.pt is
    from before its cooldown)."""
    d = tmp_path_factory.mktemp('trained')
    data = write_dataset(d / 'data')
    common = ['--max_iters=30', '--eval_interval=10', '--lr_decay_iters=30']
    runs = {'gpt2_lime': ['--bias=True', '--metadata=pos,ner', '--meta_cooldown=0.5', '--keep_checkpoints=5'],
            'gemma_lime': GEMMA_GQA + ['--metadata=pos', '--meta_cooldown=0.5'],
            'gpt2_base': [],
            'gemma_base': ['--arch=gemma', '--n_kv_head=1']}
    for name, args in runs.items():
        run(data, d / name, *common, *args)
    return {name: d / name for name in runs}


@needs_hf
@pytest.mark.parametrize('name', ['gpt2_lime', 'gemma_lime', 'gpt2_base', 'gemma_base'])
def test_trained_models_give_our_logits_and_greedy_tokens(tmp_path, trained, name, capsys):
    rc, err = export_main(f'--out_dir={trained[name]}', f'--hf_dir={tmp_path / "hf"}', capsys=capsys)
    assert rc == 0, err
    model, _ = common.load_model(str(trained[name] / 'ckpt.pt'))
    model.eval()
    hf = load_hf(tmp_path / 'hf')
    diff = max_logit_diff(model, hf, seed=1)
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    # greedy generation to the block size: transformers' generate and ours (sample.py; a cooled model
    # generates without a tagger: it feeds no tags)
    prompt = [5, 7, 1]
    n = model.config.block_size - len(prompt)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0].tolist()
    assert model.config.meta_cooled == bool(model.config.meta_streams)
    mine = sample.generate(model, prompt, n, temperature=0, top_k=1)['tokens']
    assert theirs == mine and len(mine) == model.config.block_size


# --- the tokenizer ---------------------------------------------------------------

@needs_hf
@pytest.mark.parametrize('tokenizer', ['gpt2', 'gpt2-300', 'gpt2-4096'])
def test_tokenizer_round_trips_our_vocabulary(tmp_path, tokenizer):
    import transformers
    from nltk.corpus import gutenberg

    import metadata as md
    md.set_tokenizer(tokenizer)
    enc = md.encoding()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=enc.n_vocab))
    export.export(save_ckpt(model, tmp_path / 'ckpt.pt', tokenizer), tmp_path / 'hf')
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
    assert len(tok) == enc.n_vocab and tok.eos_token_id == enc.eot_token == tok.convert_tokens_to_ids('<|endoftext|>')
    # every id is the same bytes (decoded alike: a lone piece of a UTF-8 character is U+FFFD in both)
    assert [tok.decode([i]) for i in range(enc.n_vocab)] == [enc.decode([i]) for i in range(enc.n_vocab)]
    text = (gutenberg.raw('austen-emma.txt')[:30000] + " naïve café 😀 ’tis\u00a0x 12345 3.14\r\n\t  x  \n\n"
            + gutenberg.raw('melville-moby_dick.txt')[-5000:])
    ids = enc.encode_ordinary(text)
    assert tok(text)['input_ids'] == ids and tok.decode(ids) == text
    gen = json.loads((tmp_path / 'hf' / 'generation_config.json').read_text())
    assert gen['eos_token_id'] == gen['bos_token_id'] == gen['pad_token_id'] == enc.eot_token


# --- refusals and the output directory ------------------------------------------

def one_line_error(rc, err):
    assert rc == 1 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@needs_hf
def test_a_model_that_needs_tags_is_refused(tmp_path, trained, capsys):
    before = trained['gpt2_lime'] / 'ckpt_000010.pt'  # LIME, before its cooldown (iterations 15..29)
    rc, err = export_main(f'--out_dir={before}', f'--hf_dir={tmp_path / "hf"}', capsys=capsys)
    assert one_line_error(rc, err) == (
        f"export.py: error: {before}: this model reads metadata tags (pos, ner) at every position, which a "
        "transformers model cannot be given; train it with a metadata cooldown (train.py --meta_cooldown=0.1) "
        "so that it ends without tags, and export that")
    torch.manual_seed(0)
    pred = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64, meta_streams=('pos',),
                         meta_n_tags=(5,), meta_predict=True, meta_inject_layer=1))
    rc, err = export_main(f'--out_dir={save_ckpt(pred, tmp_path / "p.pt")}', f'--hf_dir={tmp_path / "hf"}',
                          capsys=capsys)
    assert 'a meta_predict model predicts and reads tags between its blocks' in one_line_error(rc, err)
    assert not (tmp_path / 'hf').exists() and os.listdir(tmp_path) == ['p.pt']


@needs_hf
def test_the_output_directory_is_never_someone_elses(tmp_path, trained, capsys):
    src = trained['gpt2_base']
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'notes.txt').write_text('mine')
    rc, err = export_main(f'--out_dir={src}', f'--hf_dir={hf}', '--overwrite=True', capsys=capsys)
    assert one_line_error(rc, err) == (f"export.py: error: {hf}: exists and is not empty, and is not an earlier "
                                       "export of ours (it lacks lime_export.json or holds other files); choose "
                                       "another --hf_dir")
    assert os.listdir(hf) == ['notes.txt']
    (hf / 'notes.txt').unlink()  # an empty directory is filled
    assert export_main(f'--out_dir={src}', f'--hf_dir={hf}')[0] == 0
    first = (hf / 'model.safetensors').read_bytes()
    rc, err = export_main(f'--out_dir={src / "ckpt.pt"}', f'--hf_dir={hf}', capsys=capsys)
    assert 'holds an earlier export; replace it with --overwrite=True' in one_line_error(rc, err)
    rc, err = export_main(f'--out_dir={trained["gemma_base"]}', f'--hf_dir={hf}', '--overwrite=True', capsys=capsys)
    assert rc == 0, err
    assert (hf / 'model.safetensors').read_bytes() != first and load_hf(hf).config.model_type == 'gemma'
    (hf / 'my_eval.json').write_text('{}')  # a user's file in an export: the directory is no longer only ours
    rc, err = export_main(f'--out_dir={src}', f'--hf_dir={hf}', '--overwrite=True', capsys=capsys)
    assert 'exists and is not empty' in one_line_error(rc, err) and (hf / 'my_eval.json').exists()
    (tmp_path / 'file').write_text('x')
    rc, err = export_main(f'--out_dir={src}', f'--hf_dir={tmp_path / "file"}', capsys=capsys)
    assert 'exists and is not a directory' in one_line_error(rc, err)
    assert sorted(os.listdir(tmp_path)) == ['file', 'hf']  # no temporary or moved-aside directory left


@needs_hf
def test_a_failed_write_leaves_nothing(tmp_path, trained, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors.torch, 'save_file', full)
    rc, err = export_main(f'--out_dir={trained["gpt2_base"]}', f'--hf_dir={tmp_path / "hf"}', capsys=capsys)
    assert one_line_error(rc, err) == f"export.py: error: {tmp_path / 'hf'}: cannot write (No space left on device)"
    assert os.listdir(tmp_path) == []


def test_missing_transformers_is_one_line(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers: ImportError
    rc, err = export_main(f'--out_dir={trained["gpt2_base"]}', f'--hf_dir={tmp_path / "hf"}', capsys=capsys)
    assert 'the export needs transformers and safetensors (transformers is missing): pip install transformers==' \
        in one_line_error(rc, err)
    assert not (tmp_path / 'hf').exists()


@needs_hf
def test_the_script(tmp_path, trained):
    r = subprocess.run([sys.executable, str(ROOT / 'export.py'), f'--out_dir={trained["gemma_lime"]}',
                        f'--hf_dir={tmp_path / "hf"}'], capture_output=True, text=True, cwd='/',
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'hf'}: gemma model, no tokenizer (the dataset's is not GPT-2's)"
    info = json.loads((tmp_path / 'hf' / export.MARKER).read_text())
    assert info['meta_cooled'] and info['meta_streams'] == ['pos'] and info['iter_num'] == 30
    r = subprocess.run([sys.executable, str(ROOT / 'export.py'), f'--out_dir={tmp_path / "none"}',
                        f'--hf_dir={tmp_path / "hf2"}'], capture_output=True, text=True, cwd='/')
    assert r.returncode == 1 and r.stderr.strip() == f"export.py: error: {tmp_path / 'none' / 'ckpt.pt'}: not found " \
        "(train a model with train.py first)"


# --- train.py's metadata cooldown ------------------------------------------------

def test_cooldown_final_val_nll_is_a_plain_language_models(tmp_path):
    data = write_dataset(tmp_path / 'data')
    args = ['--metadata=pos', '--meta_cooldown=0.5', '--max_iters=20', '--eval_interval=5', '--lr_decay_iters=20',
            '--keep_checkpoints=10', '--meta_dropout=0.1']
    rows = run(data, tmp_path / 'a', *args)
    # full tags: no val_nll while the model reads them; iterations 10..19 train without them
    assert [(r['iter'], r['val_no_tags'], r['val_nll'] is None) for r in rows] == [
        (0, False, True), (5, False, True), (10, False, True), (15, True, False), (20, True, False)]
    assert rows[-1]['val_nll'] == rows[-1]['val_loss']
    # a fresh evaluation of the saved model, without tags, on the same windows
    ck = common.load_checkpoint(str(tmp_path / 'a' / 'ckpt.pt'))
    assert ck['model_args']['meta_cooled'] is True
    assert common.load_checkpoint(str(tmp_path / 'a' / 'ckpt_000010.pt'))['model_args']['meta_cooled'] is False
    model = GPT.from_checkpoint(ck).eval()
    x, y, _ = common.Split(data, 'val', ['pos'], 0).windows(common.eval_starts(4000, 32, 4 * 8, common.Split(data, 'val', [], 0).doc_ends(63)), 32)
    with torch.no_grad():
        logits, _ = model(x, None, targets=y)
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()
    assert nll == pytest.approx(rows[-1]['val_nll'], abs=1e-6)
    # the tables got no input in the cooldown: unchanged from its start (they did change before it)
    snap = lambda i: torch.load(tmp_path / 'a' / f'ckpt_{i:06d}.pt', weights_only=True)['model']
    s5, s10, s20 = snap(5), snap(10), snap(20)
    assert torch.equal(s10['meta_emb.0.weight'], s20['meta_emb.0.weight'])
    assert not torch.equal(s5['meta_emb.0.weight'], s10['meta_emb.0.weight'])
    assert not torch.equal(s10['lm_head.weight'], s20['lm_head.weight'])
    # and their values did not matter: the cooldown resumed on random tags ends with the same weights
    rand = tmp_path / 'rand'
    shutil.copytree(data, rand)
    rng = np.random.default_rng(1)
    for split in ('train', 'val'):
        p = rand / f'{split}.pos.bin'
        rng.integers(0, 11, os.path.getsize(p) // 2).astype(np.uint16).tofile(p)
    (tmp_path / 'b').mkdir()
    shutil.copy(tmp_path / 'a' / 'ckpt_000010.pt', tmp_path / 'b' / 'ckpt.pt')
    rows_b = run(rand, tmp_path / 'b', '--init_from=resume')
    assert rows_b[-1]['val_nll'] == rows[-1]['val_nll']
    final_b = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(final_b[k], s20[k]) for k in s20)


def test_a_lime_model_still_needs_its_tags_unless_cooled():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, meta_streams=('pos',),
                      meta_n_tags=(5,)))
    idx = torch.randint(0, 32, (2, 8))
    with pytest.raises(ValueError, match=r"this model needs metadata streams \['pos'\]"):
        m(idx, None)
    m.config.meta_cooled = True
    plain = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith('meta_emb')})
    assert torch.equal(m(idx, None)[0], plain(idx)[0])  # the tables add nothing


@pytest.mark.parametrize('flags,msg', [
    (['--meta_cooldown=1.0'], 'meta_cooldown must be in [0, 1) (a fraction of max_iters; 0 = off), got 1.0'),
    (['--meta_cooldown=-0.1'], 'meta_cooldown must be in [0, 1) (a fraction of max_iters; 0 = off), got -0.1'),
    (['--meta_cooldown=0.1', '--meta_predict=True', '--metadata=pos_causal'],
     'meta_cooldown must be 0 with meta_predict=True (such a model reads only the tags it predicts: it needs '
     'no given tags), got 0.1')])
def test_cooldown_config_errors(tmp_path, flags, msg):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f'--out_dir={tmp_path / "o"}', *flags])
    assert str(e.value) == msg
    assert not (tmp_path / 'o').exists()


def test_cooldown_under_ddp(tmp_path):
    # in the cooldown the tables get no gradient: DDP must expect unused parameters, or it fails
    data = write_dataset(tmp_path / 'data')
    args = TINY + [f'--data_dir={data}', '--metadata=pos', '--meta_cooldown=0.5', '--max_iters=4',
                   '--eval_interval=2', '--lr_decay_iters=4', '--gradient_accumulation_steps=2']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'train.py'), *args, f'--out_dir={tmp_path / "two"}']
    for attempt in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, cwd='/')
        if r.returncode == 0 or 'Address already in use' not in r.stderr:  # see test_train's DDP test
            break
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / 'two' / 'log.jsonl')]
    assert [(r['iter'], r['val_no_tags']) for r in rows] == [(0, False), (2, False), (4, True)]
