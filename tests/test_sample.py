"""sample.py (issue 5): KV cache equality, online causal metadata, LIME+1 hints, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import metadata as md
import sample
import train
from conftest import ROOT, RunsCode, write_dataset
from model import GPT, GPTConfig

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the box is shared

try:
    md.ensure_resources('binary')
    md.encoding()
    HAVE_NLTK = True
except Exception:  # no NLTK data / tiktoken cache here
    HAVE_NLTK = False
needs_nltk = pytest.mark.skipif(not HAVE_NLTK, reason='NLTK data or tiktoken cache unavailable')
NER = 'binary'
PROMPT = 'Mr. Smith went to Washington in 2024. He said "Stop!" Then'


@pytest.fixture(autouse=True)
def gpt2_tokenizer():
    yield
    md.set_tokenizer('gpt2')  # the tokenizer is process-global: leave it as the other tests expect


def make_ckpt(d, streams=(), shift=0, meta_dropout=0.0, tokenizer='gpt2-512', block_size=16, seed=0, predict=False,
              **model_kw):
    """A checkpoint in train.py's format from a random model (weights scaled up, so greedy decoding has
    no near-ties) and the dataset info prepare.py would write. model_kw: more GPTConfig keys (arch...)."""
    n = md.parse_tokenizer(tokenizer)
    vocab = (n + 1) if n else 50257
    tags = {s: md.stream_tags(s, NER) for s in streams}
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab, bias=False,
                              meta_streams=tuple(streams), meta_n_tags=tuple(len(t) for t in tags.values()),
                              meta_shift=shift, meta_predict=predict, meta_inject_layer=1 if predict else 0),
                       **model_kw})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    os.makedirs(d, exist_ok=True)
    ckpt = dict(model=model.state_dict(), model_args=dict(vars(model.config)),
                config=dict(train.DEFAULTS, meta_shift=shift, meta_dropout=meta_dropout, metadata=','.join(streams)),
                dataset=dict(vocab_size=vocab, tokenizer=tokenizer, tokenization='lime', ner=NER, eot_token=vocab - 1,
                             streams={s: {'tags': t} for s, t in tags.items()}))
    torch.save(ckpt, os.path.join(d, 'ckpt.pt'))
    return str(d)


def vocabs(ckpt):
    return {s: v['tags'] for s, v in ckpt['dataset']['streams'].items()}


def cli(*argv):
    """sample.main in a subprocess: (exit status, stdout, stderr)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'sample.py'), *argv], capture_output=True, text=True, env=env)
    return r.returncode, r.stdout, r.stderr


# --- online causal metadata ------------------------------------------------------

def _stream_equal(ids, chunks):
    cs = md.CausalStream(NER)
    got = {k: [] for k in cs.keys}
    i = 0
    for c in chunks:
        r = cs.extend(ids[i:i + c])
        i += c
        for k in got:
            got[k].extend(r[k].tolist())
    assert i == len(ids)
    ref = md.annotate_causal(np.array(ids), NER)
    for k in got:
        bad = np.nonzero(np.array(got[k]) != ref[k + '_causal'])[0]
        assert len(bad) == 0, (k, int(bad[0]), md.encoding().decode(ids[max(0, bad[0] - 40):bad[0] + 1]))
    return cs


@needs_nltk
def test_causal_stream_equals_annotate_causal():
    from nltk.corpus import gutenberg
    raw = gutenberg.raw('austen-emma.txt')
    rng = np.random.default_rng(0)
    enc = md.encoding()
    for how in ('lime', 'plain'):
        s = int(rng.integers(len(raw) - 4000))
        text = raw[s:s + 2500]
        ids = md.annotate_text(text, 'lime', NER)[0].tolist() if how == 'lime' else enc.encode_ordinary(text)
        ids[len(ids) // 2] = enc.eot_token  # a document boundary in the middle
        cs = _stream_equal(ids, [40] + [1] * (len(ids) - 40))  # a prompt, then one token at a time
        assert len(cs.doc) - cs.w < 200  # the window stays a few sentences long
    # generated-like streams: random GPT-2 tokens, and random tokens biased to sentence punctuation,
    # quotes, abbreviations, newlines and multi-byte characters
    ids = rng.integers(0, enc.eot_token, 300).tolist()
    _stream_equal(ids, [1] * len(ids))
    pieces = ['.', ' .', '."', ".'", '!', '?', ' "', '"', ')', ' (', ' Mr', ' Dr', ' U', '.S', ' The', ' he',
              ' said', ' John', ' Smith', ' New', ' York', '\n', '\n\n', ' ', ',', ' 3', '.14', '...', ' é',
              "'s", ' --', ' J', ' R', '—', '“', '”', ' 😀']
    vocab = sorted({t for p in pieces for t in enc.encode_ordinary(p)})
    ids = rng.choice(vocab, 500).tolist()
    _stream_equal(ids, [7] + [1] * 200 + [13] + [1] * 280)


# --- KV cache ------------------------------------------------------------------------

@needs_nltk
@pytest.mark.parametrize('kind', ['baseline', 'lime', 'lime1', 'predict', 'predict_gemma'])
def test_kv_cache_matches_recompute(tmp_path, kind):
    streams, shift = {'baseline': ((), 0), 'lime': (('pos_causal', 'ner_causal'), 0),
                      'lime1': (('pos_causal', 'ner_causal'), 1)}.get(kind, (('pos_causal', 'ner_causal'), 0))
    arch = dict(arch='gemma', n_kv_head=1, seed=1) if kind == 'predict_gemma' else {}  # seed 0: a constant stream
    model, ckpt = common.load_model(make_ckpt(tmp_path, streams, shift, predict=kind.startswith('predict'),
                                                   **arch), 'cpu')
    text = sample.Text(ckpt['dataset'])
    prompt = text.encode(PROMPT)
    assert len(prompt) > 16  # longer than block_size: the context is cropped from the start
    hints = sample.parse_hints('NNP _ VBD/O . B-NE', vocabs(ckpt)) if shift or kind.startswith('predict') else None
    runs = []
    for use_cache in (True, False):
        for temperature, top_k in ((0.0, 0), (1.0, 1)):  # both spellings of greedy
            r = sample.generate(model, prompt, 24, temperature, top_k, use_cache,
                                tagger=text.tagger() if streams else None, hints=hints)
            runs.append(r['tokens'])
        g = torch.Generator().manual_seed(3)  # sampling, same random numbers: same tokens
        runs.append(sample.generate(model, prompt, 24, 1.0, 50, use_cache,
                                    tagger=text.tagger() if streams else None, hints=hints, generator=g)['tokens'])
    assert runs[0] == runs[1] == runs[3] == runs[4]
    assert runs[2] == runs[5]
    assert len(set(runs[0][len(prompt):])) > 1  # not a degenerate constant stream


@needs_nltk
@pytest.mark.parametrize('kind', ['baseline', 'lime', 'lime1'])
def test_gemma_kv_cache_matches_recompute(tmp_path, kind):
    # a Gemma-style checkpoint (rotary, grouped-query attention): cached greedy decoding, through the
    # cache refills past block_size, gives what recomputing the context gives
    streams, shift = {'baseline': ((), 0), 'lime': (('pos_causal', 'ner_causal'), 0),
                      'lime1': (('pos_causal', 'ner_causal'), 1)}[kind]
    model, ckpt = common.load_model(make_ckpt(tmp_path, streams, shift, arch='gemma', n_head=4, n_kv_head=2),
                                         'cpu')
    assert model.config.arch == 'gemma' and 'wpe' not in model.transformer
    with torch.no_grad():  # the tied, sqrt(d)-scaled table at 5x would make the model repeat its last token
        model.transformer.wte.weight.mul_(0.1)
    text = sample.Text(ckpt['dataset'])
    prompt = text.encode(PROMPT)
    hints = sample.parse_hints('NNP _ VBD/O . B-NE', vocabs(ckpt)) if shift else None
    runs = [sample.generate(model, prompt, 24, 0.0, 0, use_cache, tagger=text.tagger() if streams else None,
                            hints=hints)['tokens'] for use_cache in (True, False)]
    assert runs[0] == runs[1]
    assert len(set(runs[0][len(prompt):])) > 1  # not a degenerate constant stream


@needs_nltk
def test_cli_cache_on_off_identical_and_gpt2_n(tmp_path):
    d = make_ckpt(tmp_path, ('pos_causal',), 0)
    outs = [cli(f'--out_dir={d}', f'--start={PROMPT}', '--max_new_tokens=20', '--top_k=1', '--num_samples=1',
                f'--kv_cache={c}') for c in (True, False)]
    assert outs[0][0] == 0, outs[0][2]
    assert outs[0][1] == outs[1][1] and PROMPT in outs[0][1]


# --- prompt metadata -------------------------------------------------------------------

@needs_nltk
@pytest.mark.parametrize('shift', [0, 1, 'predict'])
def test_prompt_metadata_is_causal_annotation(tmp_path, shift):
    predict = shift == 'predict'
    shift = 0 if predict else shift
    model, ckpt = common.load_model(make_ckpt(tmp_path, ('pos_causal', 'ner_causal'), shift, predict=predict),
                                         'cpu')
    text = sample.Text(ckpt['dataset'])
    prompt = text.encode('Alice met Bob in Paris.') + [text.eot] + text.encode(PROMPT)  # two documents
    ref = md.annotate_ids(prompt, NER, tags='causal')
    hints = sample.parse_hints('CD/B-NE', vocabs(ckpt))
    r = sample.generate(model, prompt, 3, 0.0, 0, True, tagger=text.tagger(),
                        hints=hints if shift or predict else None)
    P = len(prompt)
    for s in ('pos_causal', 'ner_causal'):
        if predict:  # own causal tags in the prompt; each generated token's tags are the ones picked for it
            assert r['meta'][s][:P] == ref[s].tolist()
            assert r['given'][s][0] == hints[0][s] and r['meta'][s][P:] == r['given'][s]
            continue
        if shift == 0:
            assert r['meta'][s][:P] == ref[s].tolist()
        else:  # position t sees token t+1; the last prompt position predicts generated token 1: hint 1
            assert r['meta'][s][:P - 1] == ref[s][1:].tolist()
            assert r['meta'][s][P - 1] == hints[0][s]
        # the causal tags of everything (prompt and generated) are annotate_causal's
        assert r['causal'][s[:-7]] == md.annotate_ids(r['tokens'], NER, tags='causal')[s].tolist()
    if predict:
        assert r['source'] == ['hinted', 'predicted', 'predicted'] and len(r['head']) == 3
    elif shift == 0:  # each generated token was fed its own online causal tags
        full = md.annotate_ids(r['tokens'], NER, tags='causal')
        assert r['meta']['pos_causal'] == full['pos_causal'].tolist()
        assert r['source'] == ['online'] * 3
    else:
        assert r['source'] == ['hinted', 'unk', 'unk']


# --- LIME+1 follows hints (synthetic data: each token is fixed by its tag) ----------------

class ClassTagger:
    """The synthetic data's 'causal tagger': write_dataset makes token (tag-3)*3+1 for tag."""

    def __init__(self, eot):
        self.eot = eot

    def extend(self, ids):
        ids = np.asarray(ids)
        tag = np.where((ids - 1) % 3 == 0, (ids - 1) // 3 + 3, md.SPACE)
        return {'pos': np.where(ids == self.eot, md.PAD, tag)}


def test_lime1_follows_hints(tmp_path):
    data = write_dataset(tmp_path / 'data')
    out = tmp_path / 'out'
    train.main(['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=2',
                '--log_interval=1000', '--eval_interval=1000', '--warmup_iters=10', '--learning_rate=3e-3',
                '--min_lr=3e-4', '--device=cpu', '--dtype=float32', '--max_iters=120', '--lr_decay_iters=120',
                '--metadata=pos', '--meta_shift=1', '--meta_dropout=0.1', f'--data_dir={data}', f'--out_dir={out}'])
    model, ckpt = common.load_model(out, 'cpu')
    tags = ckpt['dataset']['streams']['pos']['tags']
    rng = np.random.default_rng(0)
    want = rng.integers(3, len(tags), 40)
    hints = sample.parse_hints(' '.join(tags[t] for t in want), vocabs(ckpt))
    eot = ckpt['dataset']['eot_token']
    prompt = [1, 4, 7, 10]
    followed = 0
    for seed in range(2):
        r = sample.generate(model, prompt, len(want), 1.0, 0, True, tagger=ClassTagger(eot), hints=hints,
                            generator=torch.Generator().manual_seed(seed))
        got = r['causal']['pos'][len(prompt):]
        followed += sum(int(a == b) for a, b in zip(got, want))
        assert r['given']['pos'] == want.tolist()
    assert followed / (2 * len(want)) > 0.8  # chance is 1/8


def test_meta_predict_samples_its_own_tags_and_hints_override_them(tmp_path):
    # synthetic data: tags i.i.d., each token fixed by its own tag. The heads cannot know the next tag
    # (about 1/8 right), but a model that picks a tag then writes the token of that tag is consistent
    data = write_dataset(tmp_path / 'data')
    out = tmp_path / 'out'
    train.main(['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=2',
                '--log_interval=1000', '--eval_interval=1000', '--warmup_iters=10', '--learning_rate=3e-3',
                '--min_lr=3e-4', '--device=cpu', '--dtype=float32', '--max_iters=120', '--lr_decay_iters=120',
                '--metadata=pos', '--meta_predict=True', '--meta_inject_layer=1', f'--data_dir={data}',
                f'--out_dir={out}'])
    model, ckpt = common.load_model(out, 'cpu')
    tags = ckpt['dataset']['streams']['pos']['tags']
    eot = ckpt['dataset']['eot_token']
    want = np.random.default_rng(0).integers(3, len(tags), 30)
    hints = sample.parse_hints(' '.join(tags[t] for t in want), vocabs(ckpt))
    prompt = [1, 4, 7, 10]
    # hinted: the hint replaces the head's choice, and the tokens follow it
    r = sample.generate(model, prompt, len(want), 1.0, 0, True, tagger=ClassTagger(eot), hints=hints,
                        generator=torch.Generator().manual_seed(0))
    assert r['given']['pos'] == want.tolist() and set(r['source']) == {'hinted'}
    got = r['causal']['pos'][len(prompt):]
    assert np.mean([a == b for a, b in zip(got, want)]) > 0.8  # chance is 1/8
    # unhinted: the model's own tags, which its tokens then follow
    r = sample.generate(model, prompt, 30, 1.0, 0, True, tagger=ClassTagger(eot),
                        generator=torch.Generator().manual_seed(1))
    assert set(r['source']) == {'predicted'} and len(set(r['given']['pos'])) > 3  # drawn, not constant
    got = r['causal']['pos'][len(prompt):]
    assert np.mean([a == b for a, b in zip(got, r['given']['pos'])]) > 0.8
    # the head's top probability is that of a near-uniform guess over 8 tags
    assert all(p < 0.5 for h in r['head'] for _, p in h.values())


def test_generate_keeps_its_state_in_generation_not_closures():
    # issue 22: generate's state lives in sample.Generation (explicit), not in functions nested in it
    import inspect
    import types
    comprehension = ('<listcomp>', '<dictcomp>', '<setcomp>', '<genexpr>')
    code = inspect.unwrap(sample.generate).__code__
    assert [c.co_name for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name not in comprehension] == []


# --- errors -----------------------------------------------------------------------------

def test_parse_hints():
    vocabs = {'pos_causal': md.stream_tags('pos', NER), 'ner_causal': md.stream_tags('ner', NER)}
    pos, ner = vocabs['pos_causal'], vocabs['ner_causal']
    h = sample.parse_hints('CD  CD/O _\nB-NE', vocabs)
    assert h == [{'pos_causal': pos.index('CD')}, {'pos_causal': pos.index('CD'), 'ner_causal': ner.index('O')},
                 {}, {'ner_causal': ner.index('B-NE')}]
    with pytest.raises(common.LimeError, match=r"hint 2: unknown tag 'XX' \(valid: # \$ .* CD .* B-NE I-NE"):
        sample.parse_hints('CD XX', vocabs)
    with pytest.raises(common.LimeError, match="two tags for stream 'pos_causal'"):
        sample.parse_hints('CD/NN', vocabs)
    with pytest.raises(common.LimeError, match="unknown tag '<unk>'"):
        sample.parse_hints('<unk>', vocabs)


def test_configure_is_trains_with_config_files(tmp_path):
    f = tmp_path / 'gen.py'
    f.write_text("num_samples = 2\nmax_new_tokens = 1e2\nstart = 'Hello'\n")
    cfg = sample.configure([str(f), '--start=42', '--out_dir=2024'])
    # string options keep their raw text; the file's values are checked as train.py checks them
    assert cfg['start'] == '42' and cfg['out_dir'] == '2024' and cfg['num_samples'] == 2
    assert cfg['max_new_tokens'] == 100 and type(cfg['max_new_tokens']) is int
    with pytest.raises(common.LimeError, match="unknown key 'n_layer'"):
        sample.configure(['--n_layer=2'])


@needs_nltk
def test_cli_errors(tmp_path, capsys):
    base = make_ckpt(tmp_path / 'base')
    lime = make_ckpt(tmp_path / 'lime', ('pos_causal',), 0)
    lime1 = make_ckpt(tmp_path / 'lime1', ('pos_causal', 'ner_causal'), 1)
    classes = make_ckpt(tmp_path / 'classes', ('pos_causal',), 0)
    ck = torch.load(os.path.join(classes, 'ckpt.pt'), weights_only=True)
    ck['config']['meta_classes'] = 'token'  # a control arm: it read token classes, which no tagger gives
    torch.save(ck, os.path.join(classes, 'ckpt.pt'))
    cases = [
        ([f'--out_dir={tmp_path}/nothing'], 'ckpt.pt: not found'),
        ([f'--out_dir={classes}'], 'a meta_classes control reads token classes, not tags'),
        ([f'--out_dir={base}', '--hints=CD'], '--hints needs a LIME+1 checkpoint; this one is a baseline'),
        ([f'--out_dir={lime}', '--hints=CD'], '--hints needs a LIME+1 checkpoint (meta_shift=1)'),
        ([f'--out_dir={lime1}', '--hints=CD ZZ'], "hint 2: unknown tag 'ZZ' (valid: #"),
        ([f'--out_dir={lime1}', '--hints=CD CD', '--max_new_tokens=1'], '2 hints for max_new_tokens=1'),
        ([f'--out_dir={lime1}', f'--hints_file={tmp_path}/none.txt'],
         f'--hints_file: {tmp_path}/none.txt: cannot read'),
        ([f'--out_dir={lime1}', '--top_k=many'], 'top_k must be int'),
        (['--no_such=1'], "unknown key 'no_such'"),
    ]
    for argv, msg in cases:  # in process (fast), then one through the script: exit status, no traceback
        assert sample.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('sample.py: error: ') and msg in err, (argv, err)
    rc, out, err = cli(*cases[4][0])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and cases[4][1] in lines[0], err


@needs_nltk
def test_cli_show_tags_and_warnings(tmp_path, capsys):
    lime1 = make_ckpt(tmp_path / 'lime1', ('pos', 'ner'), 1)  # full streams, no meta_dropout
    (tmp_path / 'h.txt').write_text('CD _\nB-NE/NNP\n')
    assert sample.main([f'--out_dir={lime1}', '--start=FILE:' + str(ROOT / 'README.md'), '--max_new_tokens=5',
                        f'--hints_file={tmp_path}/h.txt', '--show_tags=True', '--num_samples=2', '--top_k=1']) == 0
    out, err = capsys.readouterr()
    assert 'generation can only give it causal metadata' in err
    assert 'trained without meta_dropout' in err
    assert out.count('(hinted)') == 4 and out.count('(unk)') == 6
    assert 'hints followed: ' in out and out.strip().endswith('/4')
    lime = make_ckpt(tmp_path / 'lime', ('pos_causal', 'ner_causal'), 0)
    assert sample.main([f'--out_dir={lime}', '--start=', '--max_new_tokens=4', '--show_tags=True',
                        '--num_samples=1']) == 0
    out, err = capsys.readouterr()
    assert out.count('(online)') == 4 and 'warning' not in err and 'note' not in err  # causal streams: no warning
    assert 'tokens/s' in err  # the speed line goes to stderr, never into the text



# --- reliability (issue 10) ----------------------------------------------------------------

def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('sample.py: error: ') and 'Traceback' not in err, err
    return err.strip()


def test_refuses_a_checkpoint_that_runs_code(tmp_path, capsys):
    d, marker = make_ckpt(tmp_path / 'c'), tmp_path / 'pwned'
    path = os.path.join(d, 'ckpt.pt')
    ck = torch.load(path, weights_only=True)
    ck['dataset']['note'] = RunsCode(marker)
    torch.save(ck, path)
    assert sample.main([f'--out_dir={d}', '--max_new_tokens=2']) == 1
    err = one_error_line(capsys)
    assert f'{path}: refused' in err and 'posix.system' in err and not marker.exists()
    rc, out, err = cli(f'--out_dir={d}', '--max_new_tokens=2')  # and through the script
    assert rc == 1 and len(err.strip().splitlines()) == 1 and 'refused' in err and not marker.exists(), err


@pytest.mark.parametrize('kind,msg', [('truncated', 'not a readable checkpoint, truncated'),
                                      ('foreign', 'not a LIME checkpoint written by train.py (no model_args'),
                                      ('text', 'not a readable checkpoint')])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, kind, msg):
    d = make_ckpt(tmp_path / 'c')
    path = os.path.join(d, 'ckpt.pt')
    if kind == 'truncated':
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    elif kind == 'foreign':
        torch.save({'model': {'w': torch.zeros(2)}, 'config': {}, 'dataset': {}}, path)
    else:
        open(path, 'w').write('not a checkpoint\n')
    assert sample.main([f'--out_dir={d}']) == 1
    err = one_error_line(capsys)
    assert f'{path}: {msg}' in err, err


BAD_OPTIONS = [
    ('--temperature=-1.0', 'temperature must be a finite number >= 0 (0: greedy), got -1.0'),
    ('--temperature=1e999', 'temperature must be a finite number >= 0 (0: greedy), got inf'),
    ('--top_k=-1', 'top_k must be an integer >= 0 (0: no top-k filtering), got -1'),
    ('--num_samples=0', 'num_samples must be an integer >= 1, got 0'),
    ('--max_new_tokens=-3', 'max_new_tokens must be an integer >= 0, got -3'),
    ('--seed=-1', 'seed must be an integer >= 0, got -1'),
    ('--meta_temperature=-0.5', 'meta_temperature must be -1 (the token temperature) or a finite number >= 0 '
                                '(0: argmax), got -0.5'),
    ('--meta_temperature=1e999', 'meta_temperature must be -1 (the token temperature) or a finite number >= 0'),
    ('--dtype=float16', 'dtype=float16 needs a CUDA device: on cpu the model computes in float32 only'),
    ('--dtype=fp8', 'dtype must be auto, float32, bfloat16 or float16'),
    ('--device=gpu', "device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
    pytest.param('--device=cuda', 'device=cuda but no CUDA GPU is available here (use --device=cpu)',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')),
]


@needs_nltk
@pytest.mark.parametrize('flag,msg', BAD_OPTIONS)
def test_bad_options_are_one_line_with_the_allowed_range(tmp_path, capsys, flag, msg):
    d = make_ckpt(tmp_path / 'c')
    assert sample.main([f'--out_dir={d}', '--max_new_tokens=2', '--num_samples=1', flag]) == 1
    assert one_error_line(capsys).startswith(f'sample.py: error: {msg}')


def test_any_positive_temperature_samples_safely():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50257, generator=g) * 30
    best = int(torch.argmax(logits))
    for t in (1e-45, 1e-300, 5e-324, 1e-30):  # 1e-45 once gave "probability tensor contains inf or nan"
        assert sample.pick(logits, t, 0, generator=g) == best
        assert sample.pick(logits, t, 50, generator=g) == best
    big = torch.full((10,), 3e38)  # huge logits: no inf - inf either
    big[7] = 3.4e38
    assert sample.pick(big, 1e-3, 0, generator=g) == 7
    # ordinary temperatures still sample the same distribution: frequencies match the softmax
    small = torch.tensor([0.0, 1.0, 2.0])
    n = 4000
    counts = np.bincount([sample.pick(small, 0.7, 0, generator=g) for _ in range(n)], minlength=3)
    p = torch.softmax(small / 0.7, -1).numpy()
    assert np.abs(counts / n - p).max() < 0.03


@needs_nltk
def test_tiny_temperature_through_the_cli_is_greedy(tmp_path, capsys):
    d = make_ckpt(tmp_path / 'c')
    args = [f'--out_dir={d}', f'--start={PROMPT}', '--max_new_tokens=8', '--num_samples=1']
    texts = []
    for t in ('1e-45', '0'):  # 1e-45 once ended in "probability tensor contains either inf, nan or element < 0"
        assert sample.main(args + [f'--temperature={t}']) == 0
        texts.append([l for l in capsys.readouterr().out.splitlines() if not l.startswith('number of parameters')])
    assert texts[0] == texts[1] and PROMPT in texts[0][0]


@needs_nltk
def test_literal_endoftext_is_text_as_in_prepare(tmp_path):
    """One rule for prepare.py, metadata.py and sample.py: text is text, the separator only falls between
    documents. A literal <|endoftext|> inside a prompt is the same ordinary tokens as inside a training
    document; a new document is started by an empty --start."""
    doc = 'He typed <|endoftext|> into the box.<|endoftext|>Then he left.'
    inp = tmp_path / 'in'
    inp.mkdir()
    (inp / 'a.txt').write_text(doc, encoding='utf-8')
    out = tmp_path / 'ds'
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), '--no_progress', '--input', str(inp),
                        '--out_dir', str(out), '--ner', 'binary', '--tags', 'full', '--val_fraction', '0'],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    trained = np.fromfile(out / 'train.bin', np.uint16).astype(np.int64).tolist()
    text = sample.Text(dict(tokenizer='gpt2', tokenization='lime', ner=NER))
    prompt = text.encode(doc)
    assert trained == prompt + [text.eot]  # the document, then the one separator prepare.py appends
    assert text.eot not in prompt and text.decode(prompt) == doc
    assert md.annotate_text(doc, 'lime', NER)[0].tolist() == prompt  # metadata.py: the same


# --- non-UTF-8 prompts and hints (issue 21) ----------------------------------------------------

@needs_nltk
def test_non_utf8_start_and_hints_are_one_line_before_the_checkpoint_loads(tmp_path, capsys):
    lime1 = make_ckpt(tmp_path / 'lime1', ('pos_causal', 'ner_causal'), 1)
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'CD \xff\xfe _\n')
    cases = [  # a non-UTF-8 byte in an argument arrives as a lone surrogate (surrogateescape)
        (f'--start=FILE:{bad}', f'--start: {bad}: not valid UTF-8 (byte 3)'),
        (f'--hints_file={bad}', f'--hints_file: {bad}: not valid UTF-8 (byte 3)'),
        ('--start=Hi \udcff there', '--start: not valid UTF-8 (byte 0xff at character 3)'),
        ('--hints=CD \udcff', '--hints: not valid UTF-8 (byte 0xff at character 3)'),
        (f'--start=FILE:{tmp_path}', f'--start: {tmp_path}: '),  # then prepare.py's reason (not a regular file)
        (f'--hints_file={tmp_path}/none.txt', f'--hints_file: {tmp_path}/none.txt: cannot read (No such file'),
    ]
    for flag, msg in cases:
        assert sample.main([f'--out_dir={lime1}', '--max_new_tokens=2', '--num_samples=1', flag]) == 1, flag
        assert one_error_line(capsys).startswith(f'sample.py: error: {msg}')
        # the text is read before the checkpoint: its error comes first, without a model loaded
        assert sample.main([f'--out_dir={tmp_path}/nothing', flag]) == 1
        assert one_error_line(capsys).startswith(f'sample.py: error: {msg}')
    for flag, msg in cases[1:3]:  # through the script: the real bytes on the command line, exit 1, no traceback
        rc, out, err = cli(f'--out_dir={lime1}', '--max_new_tokens=2', '--num_samples=1', flag)
        assert rc == 1 and err.strip().splitlines() == [f'sample.py: error: {msg}'], err
    # a UTF-8 file is read as prepare.py reads a document (a BOM is not text)
    (tmp_path / 'h.txt').write_bytes('\ufeffCD _'.encode('utf-8'))
    assert sample.main([f'--out_dir={lime1}', '--max_new_tokens=2', '--num_samples=1', '--top_k=1',
                        f'--hints_file={tmp_path}/h.txt', '--show_tags=True']) == 0
    assert capsys.readouterr().out.count('(hinted)') == 1


def test_crafted_checkpoint_is_refused_before_a_model_is_built(tmp_path, monkeypatch):
    """Issue 21: a checkpoint whose model_args ask for far more than its tensors hold (n_layer=10**6 would
    take minutes and gigabytes to build) or whose tokenizer overflows vocab_size is refused by sample.py
    and by the harness's loader in one line naming the mismatch, before any model is built."""
    import harness
    d = make_ckpt(tmp_path / 'c', ('pos_causal',))  # n_layer=2, n_embd=32, tokenizer gpt2-512: vocab_size=513
    path = os.path.join(d, 'ckpt.pt')
    ck = torch.load(path, weights_only=True)
    cases = [(dict(n_layer=10**6), {}, "model_args n_layer=1000000, but the file holds tensors of 2 layers"),
             (dict(n_layer=48, n_embd=4096), {}, "model_args n_layer=48, but the file holds tensors of 2 layers"),
             (dict(n_embd=4096), {}, "tensor transformer.h.0.ln_1.weight has shape (32,), model_args say (4096,)"),
             ({}, dict(tokenizer='gpt2'), "dataset tokenizer 'gpt2' has 50257 tokens, more than model_args vocab_size=513")]
    init = GPT.__init__

    def guarded(self, config):  # only shape checks on the meta device may build a GPT
        if torch.get_default_device().type != 'meta':
            raise AssertionError(f"a real GPT was built for n_layer={config.n_layer}, n_embd={config.n_embd}")
        init(self, config)

    for args, dataset, msg in cases:
        torch.save(dict(ck, model_args={**ck['model_args'], **args}, dataset={**ck['dataset'], **dataset}), path)
        with monkeypatch.context() as mp:
            mp.setattr(GPT, '__init__', guarded)
            with pytest.raises(common.LimeError) as e:
                common.load_model(d, 'cpu')
            assert str(e.value) == f"{path}: {msg}"
            with pytest.raises(common.LimeError) as e:
                harness.Scorer(d)
            assert str(e.value) == f"{path}: {msg}"
    rc, out, err = cli(f'--out_dir={d}', '--max_new_tokens=2')  # the script: exit 1, one line, no traceback
    assert rc == 1 and err.strip() == f"sample.py: error: {path}: {msg}"
