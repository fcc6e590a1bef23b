import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
META = dict(meta_streams=('pos', 'ner'), meta_n_tags=(11, 5))


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def batch(B=3, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(64, (B, T), generator=g)
    meta = {'pos': torch.randint(11, (B, T), generator=g), 'ner': torch.randint(5, (B, T), generator=g)}
    return idx, meta


def test_zero_meta_weight_is_baseline():
    base, lime = build(), build(meta_weight=0.0, **META)
    # shared parameters are drawn first from the same seed, so they start identical
    bsd, lsd = base.state_dict(), lime.state_dict()
    assert all(torch.equal(v, lsd[k]) for k, v in bsd.items())
    idx, meta = batch()
    y = torch.randint(64, idx.shape)
    lb, loss_b = base(idx, targets=y)
    ll, loss_l = lime(idx, meta, targets=y)
    assert torch.equal(lb, ll) and torch.equal(loss_b, loss_l)
    # and a nonzero weight does change the output
    lime2 = build(meta_weight=[1.0, 0.5], **META)
    assert not torch.equal(lime2(idx, meta, targets=y)[0], lb)


def test_no_metadata_is_exact_baseline_parameter_set():
    m = build()
    names = {k for k, _ in m.named_parameters()}
    assert not any('meta' in k for k in names) and not hasattr(m, 'meta_emb')
    expected = {'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.ln_f.weight', 'transformer.ln_f.bias'}
    for i in range(2):
        for p in ('ln_1', 'ln_2', 'attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'):
            expected |= {f'transformer.h.{i}.{p}.weight', f'transformer.h.{i}.{p}.bias'}
    assert names == expected  # lm_head.weight is tied to wte
    C, V, L = 32, 64, 2
    n = V * C + 32 * C + L * (12 * C * C + 13 * C) + 2 * C
    assert m.get_num_params() == n and m.get_num_meta_params() == 0
    lime = build(**META)
    assert lime.get_num_params() == n + (11 + 5) * C
    assert {k for k, _ in lime.named_parameters()} == expected | {'meta_emb.0.weight', 'meta_emb.1.weight'}
    # metadata tables use wte's init scale
    assert abs(lime.meta_emb[0].weight.std().item() - 0.02) < 0.01


def test_missing_stream_is_an_error():
    lime = build(**META)
    idx, meta = batch()
    with pytest.raises(ValueError, match='ner'):
        lime(idx, {'pos': meta['pos']})
    with pytest.raises(ValueError):
        lime(idx)


def test_mfu_counts_embedding_lookups_as_zero():
    base, lime = build(), build(**META)
    assert base.flops_per_token() == lime.flops_per_token()
    assert lime.get_num_params(non_embedding=True) == base.get_num_params(non_embedding=True)
    mfu = base.estimate_mfu(fwdbwd_per_iter=10, dt=0.5, peak_flops=1e12)
    assert mfu == pytest.approx(base.flops_per_token() * 32 * 10 / 0.5 / 1e12)
    if not torch.cuda.is_available():
        assert base.estimate_mfu(10, 0.5) is None


@pytest.mark.parametrize('meta_kw', [{}, META])
def test_kv_cache_matches_full_forward(meta_kw):
    m = build(**meta_kw)
    idx, meta = batch(B=2, T=20)
    meta = meta if meta_kw else None
    with torch.no_grad():
        full, _ = m(idx, meta, targets=idx)  # logits at every position
        # prefill 7 tokens, then a chunk of 5, then one token at a time
        cache = m.new_kv_cache(batch_size=2)
        pieces, pos = [], 0
        for n in (7, 5) + (1,) * 8:
            sl = slice(pos, pos + n)
            lg, _ = m(idx[:, sl], {k: v[:, sl] for k, v in meta.items()} if meta else None,
                      targets=idx[:, sl], kv_cache=cache, start_pos=pos)
            pieces.append(lg)
            pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def greedy_uncached_and_cached(m, idx, meta, steps=12):
    """Greedy decoding of `steps` tokens after idx (B=2), with random tags for the new positions:
    once rerunning the whole prefix each step, once through the KV cache."""
    g = torch.Generator().manual_seed(3)
    future = {k: torch.randint(v.max().item() + 1, (2, steps), generator=g) for k, v in meta.items()}
    full_meta = {k: torch.cat([meta[k], future[k]], 1) for k in meta}
    with torch.no_grad():
        a = idx
        for t in range(steps):  # uncached: rerun the whole prefix
            T = a.size(1)
            lg, _ = m(a, {k: v[:, :T] for k, v in full_meta.items()})
            a = torch.cat([a, lg[:, -1].argmax(-1, keepdim=True)], 1)
        cache = m.new_kv_cache(2)
        b, pos = idx, 0
        for t in range(steps):
            T = b.size(1)
            lg, _ = m(b[:, pos:], {k: v[:, pos:T] for k, v in full_meta.items()}, kv_cache=cache, start_pos=pos)
            pos = T
            b = torch.cat([b, lg[:, -1].argmax(-1, keepdim=True)], 1)
    return a, b


def test_cached_greedy_decoding_equals_uncached():
    m = build(**META)
    idx, meta = batch(B=2, T=4)
    a, b = greedy_uncached_and_cached(m, idx, meta)
    assert torch.equal(a, b)


# --- self-predicted metadata (meta_predict) ----------------------------------------------

PRED = dict(META, meta_predict=True, meta_inject_layer=1)


def pieces(m, idx, meta, nxt):
    """Tag-head logits and token logits at every position."""
    with torch.no_grad():
        logits, _, tags, _ = m.forward_predict(idx, meta, nxt, targets=idx)
    return tags, logits


def by_hand(m, idx, meta, nxt, targets):
    """The meta_predict forward spelled out from the modules: blocks 1..k, heads, next tags added, k+1..L."""
    k, x = m.config.meta_inject_layer, m.transformer.wte(idx) + m.transformer.wpe(torch.arange(idx.size(1)))
    x = x + sum(w * e(meta[s]) for s, w, e in zip(m.config.meta_streams, m.config.meta_weight, m.meta_emb))
    for block in m.transformer.h[:k]:
        x = block(x)
    tags = [head(x) for head in m.tag_head]
    x = x + sum(w * e(nxt[s]) for s, w, e in zip(m.config.meta_streams, m.config.meta_weight, m.meta_next_emb))
    for block in m.transformer.h[k:]:
        x = block(x)
    logits = m.lm_head(m.transformer.ln_f(x))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)), tags


def test_forward_predict_is_the_teacher_forced_forward():
    m = build(**dict(PRED, n_layer=4, meta_inject_layer=2))
    idx, meta = batch()
    _, nxt = batch(seed=2)
    y = torch.randint(64, idx.shape)
    with torch.no_grad():
        logits, loss, tags, h = m.forward_predict(idx, meta, nxt, targets=y)
        want_logits, want_loss, want_tags = by_hand(m, idx, meta, nxt, y)
        f_logits, f_loss = m(idx, meta, targets=y, next_meta=nxt)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want_loss)  # the tokens' loss only
    for a, b in zip(tags, want_tags):
        torch.testing.assert_close(a, b)
    # GPT.forward is the same pass, its loss adds the tag heads' cross-entropy
    assert torch.equal(f_logits, logits)
    tag = sum(F.cross_entropy(tl.reshape(-1, tl.size(-1)), nxt[d].view(-1)) for d, tl in zip(('pos', 'ner'), tags))
    torch.testing.assert_close(f_loss, loss + tag)
    # without targets: the last position's token and tag logits
    with torch.no_grad():
        last, none, last_tags, _ = m.forward_predict(idx, meta, nxt)
    assert none is None and last.shape == (3, 1, 64) and last_tags[0].shape == (3, 1, 11)
    torch.testing.assert_close(last, logits[:, -1:])
    for a, b in zip(last_tags, tags):
        torch.testing.assert_close(a, b[:, -1:])
    with pytest.raises(ValueError, match='next_meta or choose'):
        m.forward_predict(idx, meta)


def test_forward_predict_own_tags():
    # choose=argmax_tags: the heads' own argmax tags injected, from one lower pass or a reused one (h=)
    m = build(**PRED)
    idx, meta = batch()
    _, nxt = batch(seed=2)
    y = torch.randint(64, idx.shape)
    seen = []
    with torch.no_grad():
        _, _, tags, h = m.forward_predict(idx, meta, nxt, targets=y)
        own = {d: tl.argmax(-1) for d, tl in zip(('pos', 'ner'), tags)}
        want = by_hand(m, idx, meta, own, y)
        got = m.forward_predict(idx, meta, targets=y, choose=lambda tl: seen.append(tl) or m.argmax_tags(tl))
        again = m.forward_predict(idx, meta, targets=y, choose=m.argmax_tags, h=h)
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], tags))
    assert not all(torch.equal(own[d], nxt[d]) for d in own)  # the own-tag path is another input
    for out in (got, again):
        torch.testing.assert_close(out[0], want[0])
        torch.testing.assert_close(out[1], want[1])


def test_forward_predict_candidates_after_one_prefix():
    # bench.predict_marginal: the prefix once into a cache, then one row of the last position with n
    # candidate next tags there; each row equals a full forward with that candidate
    m = build(**PRED)
    idx, meta = batch(B=1, T=9)
    _, nxt = batch(B=1, T=9, seed=2)
    cands = torch.tensor([0, 3, 7, 10])
    n = len(cands)
    with torch.no_grad():
        cache = m.new_kv_cache(1)
        m.forward_predict(idx[:, :-1], {d: v[:, :-1] for d, v in meta.items()},
                          {d: v[:, :-1] for d, v in nxt.items()}, kv_cache=cache)
        cache.k, cache.v = cache.k.repeat(1, n, 1, 1, 1), cache.v.repeat(1, n, 1, 1, 1)
        nm = {d: v[:, -1:].repeat(n, 1) for d, v in nxt.items()}
        nm['pos'][:, -1] = cands
        logits, _, tags, _ = m.forward_predict(idx[:, -1:], {d: v[:, -1:] for d, v in meta.items()}, nm,
                                               kv_cache=cache, start_pos=8)
        assert logits.shape == (n, 1, 64) and tags[0].shape == (1, 1, 11)
        for r, c in enumerate(cands):
            one = {d: v.clone() for d, v in nxt.items()}
            one['pos'][0, -1] = c
            full, _, full_tags, _ = m.forward_predict(idx, meta, one)
            torch.testing.assert_close(logits[r], full[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tags[0][0], full_tags[0][0], rtol=1e-5, atol=1e-5)


def test_meta_inject_layer_default_resolved_once():
    # 0: the middle block, resolved by GPTConfig (train.py and bench.py pass 0 through); saved resolved
    six = dict(TINY, n_layer=6)
    assert GPTConfig(**{**six, **PRED, 'meta_inject_layer': 0}).meta_inject_layer == 3
    assert GPTConfig(**{**six, **PRED, 'meta_inject_layer': 4}).meta_inject_layer == 4
    assert GPTConfig(**{**six, **META, 'meta_inject_layer': 0}).meta_inject_layer == 0  # not predicting
    m = build(**dict(PRED, n_layer=6, meta_inject_layer=0))
    assert m.n_lower == 3 and dict(vars(m.config))['meta_inject_layer'] == 3


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_meta_predict_is_causal(arch):
    # everything at position t depends on tokens and tags <= t and the next tags given at <= t only
    m = build(**PRED, **(dict(arch='gemma', n_head=4, n_kv_head=2) if arch == 'gemma' else {}))
    idx, meta = batch(B=2, T=20)
    _, nxt = batch(B=2, T=20, seed=2)
    tags, logits = pieces(m, idx, meta, nxt)
    t = 9
    idx2, meta2 = idx.clone(), {k: v.clone() for k, v in meta.items()}
    nxt2 = {k: v.clone() for k, v in nxt.items()}
    g = torch.Generator().manual_seed(5)
    idx2[:, t + 1:] = torch.randint(64, (2, 20 - t - 1), generator=g)
    for d, n in (('pos', 11), ('ner', 5)):
        meta2[d][:, t + 1:] = torch.randint(n, (2, 20 - t - 1), generator=g)
        nxt2[d][:, t + 1:] = torch.randint(n, (2, 20 - t - 1), generator=g)
    tags2, logits2 = pieces(m, idx2, meta2, nxt2)
    assert torch.equal(logits[:, :t + 1], logits2[:, :t + 1]) and not torch.equal(logits, logits2)
    for a, b in zip(tags, tags2):
        assert torch.equal(a[:, :t + 1], b[:, :t + 1]) and not torch.equal(a, b)
    # the heads at t read nothing of the next tags given at t; the token logits at t do
    nxt3 = {k: v.clone() for k, v in nxt.items()}
    nxt3['pos'][:, t] = (nxt3['pos'][:, t] + 1) % 11
    tags3, logits3 = pieces(m, idx, meta, nxt3)
    assert all(torch.equal(a, b) for a, b in zip(tags, tags3))
    assert torch.equal(logits[:, :t], logits3[:, :t]) and not torch.equal(logits[:, t], logits3[:, t])


def test_meta_predict_forward_loss_and_parameters():
    lime, m = build(**META), build(**PRED)
    # built after everything else: the shared weights are the LIME model's of the same seed
    lsd = lime.state_dict()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in lsd.items())
    C = 32
    heads = sum(C * 2 + C * n for n in (11, 5))  # LayerNorm (weight, bias) + linear, per stream
    assert m.get_num_meta_params() == lime.get_num_meta_params() * 2 + heads
    assert m.get_num_params(non_embedding=True) == lime.get_num_params(non_embedding=True) + heads
    idx, meta = batch()
    _, nxt = batch(seed=2)
    y = torch.randint(64, idx.shape)
    with torch.no_grad():
        _, loss = m(idx, meta, targets=y, next_meta=nxt)
        tags, logits = pieces(m, idx, meta, nxt)
    tok = F.cross_entropy(logits.view(-1, 64), y.view(-1))
    tag = sum(F.cross_entropy(tl.reshape(-1, tl.size(-1)), nxt[d].view(-1)) for d, tl in zip(('pos', 'ner'), tags))
    torch.testing.assert_close(loss, tok + tag)
    with pytest.raises(ValueError, match='next_meta'):
        m(idx, meta, targets=y)


def test_old_checkpoint_args_load_as_plain_lime():
    # model_args saved before meta_predict existed: the same model, bit for bit
    old = dict(TINY, **META, meta_weight=(1.0, 1.0), meta_shift=1)
    cfg = GPTConfig(**old)
    assert cfg.meta_predict is False
    a, b = build(**old), build(**dict(old, meta_predict=False, meta_inject_layer=0, meta_loss_weight=1.0))
    idx, meta = batch()
    assert torch.equal(a(idx, meta)[0], b(idx, meta)[0])


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_meta_predict_kv_cache_matches_full_forward(arch):
    m = build(**PRED, **(dict(arch='gemma', n_head=4, n_kv_head=2) if arch == 'gemma' else {}))
    idx, meta = batch(B=2, T=20)
    _, nxt = batch(B=2, T=20, seed=2)
    tags, full = pieces(m, idx, meta, nxt)
    cache, pos, got, got_tags = m.new_kv_cache(batch_size=2), 0, [], []
    with torch.no_grad():
        for n in (7, 5) + (1,) * 8:
            sl = slice(pos, pos + n)
            lg, _, tl, _ = m.forward_predict(idx[:, sl], {k: v[:, sl] for k, v in meta.items()},
                                             {k: v[:, sl] for k, v in nxt.items()}, targets=idx[:, sl],
                                             kv_cache=cache, start_pos=pos)
            got_tags.append(tl[0])
            got.append(lg)
            pos += n
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got_tags, 1), tags[0], rtol=1e-5, atol=1e-5)

def test_from_checkpoint_path_never_runs_code(tmp_path):
    import pickle
    from conftest import RunsCode
    m = build(**META)
    ck = dict(model=m.state_dict(), model_args=dict(vars(m.config)))
    torch.save(ck, tmp_path / 'ok.pt')
    again = GPT.from_checkpoint(str(tmp_path / 'ok.pt'))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in m.state_dict().items())
    marker = tmp_path / 'pwned'
    torch.save(dict(ck, extra=RunsCode(marker)), tmp_path / 'evil.pt')
    with pytest.raises(pickle.UnpicklingError, match='posix.system'):
        GPT.from_checkpoint(str(tmp_path / 'evil.pt'))
    assert not marker.exists()


# --- arch='gpt2' is the model it was before the gemma arch existed ---------------------------------

# recorded with model.py at e4d39d2 (before arch='gemma'), by gpt2_reference_values() below:
# [loss, sum of logits, sum of squared logits, logits[0,0,0], logits[1,7,13], logits[2,15,63], sum of parameters]
GPT2_REFERENCE = {
    'baseline': [4.158453464508057, 16.63646285836876, 47.461600855269396, 0.13196444511413574, 0.1291774958372116, 0.036216381937265396, 162.05067553213826],
    'lime': [4.154613971710205, 13.905087989802723, 44.738570218369375, 0.04397901892662048, 0.18222889304161072, 0.0697709396481514, 161.6806971960084],
    'lime1': [4.148941993713379, -3.283820660188212, 41.07188356279565, -0.27664604783058167, 0.01592118851840496, -0.14510317146778107, 167.30423634825974],
    'baseline_x4': [5.477395534515381, 67.63444026363686, 10375.882668128292, -0.2104576826095581, -2.517760753631592, -0.14761857688426971, 633.7971023249879],
}
GPT2_REFERENCE_GREEDY = [37, 43, 12, 8, 15, 15, 15, 15, 15, 50, 21, 63, 15, 51]  # 4 prompt tokens + 10 cached greedy steps


def gpt2_reference_values():
    """Logit/loss summaries of fixed-seed tiny GPT-2 models (baseline, LIME with per-stream weights,
    LIME+1 without biases, a baseline with 4x weights so the nonlinearities matter) and a cached
    greedy decode. Unchanged since the values above were recorded."""
    cases = {'baseline': dict(), 'lime': dict(meta_weight=[1.0, 0.5], **META),
             'lime1': dict(seed=3, bias=False, meta_shift=1, **META), 'baseline_x4': dict(seed=5)}
    idx, meta = batch()
    y = torch.roll(idx, -1, 1)
    out = {}
    for name, kw in cases.items():
        m = build(**kw)
        if name.endswith('_x4'):  # larger weights: the nonlinearities matter more
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(4.0)
        with torch.no_grad():
            lg, loss = m(idx, meta if 'meta_streams' in kw else None, targets=y)
            d = lg.double()
            out[name] = [loss.item(), d.sum().item(), (d * d).sum().item(),
                         lg[0, 0, 0].item(), lg[1, 7, 13].item(), lg[2, 15, 63].item(),
                         sum(p.double().sum().item() for p in m.parameters())]
    # greedy decoding with the KV cache from the x4 model
    m = build(seed=5, **META)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
        cache, toks, pos = m.new_kv_cache(1), idx[:1, :4], 0
        mt = {k: v[:1] for k, v in meta.items()}
        for t in range(10):
            T = toks.size(1)
            lg, _ = m(toks[:, pos:], {k: v[:, pos:T] for k, v in mt.items()}, kv_cache=cache, start_pos=pos)
            pos = T
            toks = torch.cat([toks, lg[:, -1].argmax(-1, keepdim=True)], 1)
    return out, toks[0].tolist()


def test_gpt2_matches_values_recorded_before_the_gemma_arch():
    # on the machine that recorded them the values are bit-identical (so were the state dicts and
    # gradients); the tolerance only allows for another CPU's float rounding, while any change to the
    # gpt2 computation or its init order moves these numbers by orders of magnitude more
    out, greedy = gpt2_reference_values()
    assert set(out) == set(GPT2_REFERENCE)
    for name, want in GPT2_REFERENCE.items():
        assert out[name] == pytest.approx(want, rel=1e-5, abs=1e-5), name
    assert greedy == GPT2_REFERENCE_GREEDY
    assert build().config.arch == 'gpt2' and build().config.n_kv_head == 2  # the defaults


def test_old_checkpoint_without_arch_keys_loads_as_gpt2():
    m = build(**META)
    old_args = {k: v for k, v in vars(m.config).items() if k not in ('arch', 'n_kv_head', 'mlp_hidden')}
    m2 = GPT.from_checkpoint(dict(model=m.state_dict(), model_args=old_args)).eval()
    assert m2.config.arch == 'gpt2' and m2.config.n_kv_head == 2 and m2.config.mlp_hidden == 4 * 32
    idx, meta = batch()
    with torch.no_grad():
        assert torch.equal(m(idx, meta, targets=idx)[0], m2(idx, meta, targets=idx)[0])


def test_config_errors_are_value_errors():
    for kw, msg in [(dict(arch='llama'), 'arch must be'), (dict(n_kv_head=1), "needs arch='gemma'"),
                    (dict(arch='gemma', n_head=4, n_kv_head=3), 'multiple of n_kv_head'),
                    (dict(n_head=3), 'multiple of n_head'), (dict(arch='gemma', n_head=32), 'even head size')]:
        with pytest.raises(ValueError, match=msg):
            GPTConfig(**{**TINY, **kw})


# --- arch='gemma' ------------------------------------------------------------------------------------

from model import apply_rotary, rotary_tables  # noqa: E402

GEMMA = dict(arch='gemma', n_head=4, n_kv_head=2)  # head size 8, two query heads per key/value head


def test_gemma_parameters_and_flops():
    m = build(**GEMMA)  # bias=True in TINY: gemma has none regardless
    C, V, L, H, K, Q, F = 32, 64, 2, 4, 2, 8, 128
    names = {k: tuple(p.shape) for k, p in m.named_parameters()}
    expected = {'transformer.wte.weight': (V, C), 'transformer.ln_f.weight': (C,)}
    for i in range(L):
        expected |= {f'transformer.h.{i}.ln_1.weight': (C,), f'transformer.h.{i}.ln_2.weight': (C,),
                     f'transformer.h.{i}.attn.c_attn.weight': ((H + 2 * K) * Q, C),
                     f'transformer.h.{i}.attn.c_proj.weight': (C, H * Q),
                     f'transformer.h.{i}.mlp.c_fc.weight': (2 * F, C),  # gate and up
                     f'transformer.h.{i}.mlp.c_proj.weight': (C, F)}
    assert names == expected  # no wpe, no biases; lm_head.weight is wte's
    assert m.lm_head.weight is m.transformer.wte.weight and not m.config.bias
    assert all(torch.equal(p, torch.zeros(C)) for k, p in m.named_parameters() if k.endswith('ln_1.weight'))
    assert not any(k.startswith('rope') for k in m.state_dict())  # derived buffers are not saved
    matmul = L * (C * (H + 2 * K) * Q + C * C + C * 2 * F + F * C) + V * C
    n = matmul + (2 * L + 1) * C
    assert m.get_num_params() == n == m.get_num_params(non_embedding=True)
    assert m.flops_per_token() == 6 * n + 12 * L * H * Q * 32
    lime = build(**GEMMA, **META)
    assert lime.get_num_params() == n + (11 + 5) * C and lime.get_num_meta_params() == 16 * C
    assert lime.flops_per_token() == m.flops_per_token()  # metadata lookups are 0 FLOPs
    assert abs(lime.meta_emb[0].weight.std().item() - 0.02 * C ** 0.5) < 0.03  # the scaled token input's scale
    # multi-query: one key/value head
    mq = build(arch='gemma', n_head=4, n_kv_head=1)
    assert mq.get_num_params() == n - L * 2 * C * Q
    with torch.device('meta'):  # sizes can be counted without memory
        big = GPT(GPTConfig(arch='gemma', n_layer=18, n_head=8, n_kv_head=1, n_embd=2048, mlp_hidden=16384))
    assert big.get_num_params() == 18 * (2048 * 10 * 256 + 2048 ** 2 + 3 * 2048 * 16384 + 2 * 2048) + 50257 * 2048 + 2048


def test_gemma_input_norm_mlp_and_attention_by_hand():
    m = build(**GEMMA, **META, meta_weight=[1.0, 0.5])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norm weights away from 0 too
    idx, meta = batch(B=2, T=10)
    seen = {}
    m.transformer.drop.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        m(idx, meta)
        wte = m.transformer.wte.weight
        want = wte[idx] * 32 ** 0.5 + m.meta_emb[0].weight[meta['pos']] + 0.5 * m.meta_emb[1].weight[meta['ner']]
        torch.testing.assert_close(seen['x'], want)
        x = torch.randn(2, 10, 32)
        blk = m.transformer.h[0]
        # RMSNorm with Gemma's (1 + weight)
        rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(blk.ln_1(x), rms * (1 + blk.ln_1.weight))
        # GeGLU: c_proj(gelu_tanh(x W_gate) * (x W_up))
        wg, wu = blk.mlp.c_fc.weight.chunk(2, 0)
        h = F.gelu(x @ wg.T, approximate='tanh') * (x @ wu.T)
        torch.testing.assert_close(blk.mlp(x), h @ blk.mlp.c_proj.weight.T)
        # grouped-query attention: query heads 0,1 read kv head 0, heads 2,3 kv head 1; rotary q and k
        q, k, v = (x @ blk.attn.c_attn.weight.T).split([32, 16, 16], -1)
        q, k, v = (t.view(2, 10, -1, 8).transpose(1, 2) for t in (q, k, v))
        cos, sin = rotary_tables(8, 10)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        att = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(torch.ones(10, 10).triu(1).bool(), float('-inf'))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
        torch.testing.assert_close(blk.attn(x, (cos, sin)), y @ blk.attn.c_proj.weight.T)


def test_rotary_is_relative_and_offset_by_position():
    cos, sin = rotary_tables(8, 64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    rot = lambda x, p: apply_rotary(x, cos[p:p + 1], sin[p:p + 1])
    dot = lambda m, n: (rot(q, m) * rot(k, n)).sum().item()
    assert torch.equal(rot(q, 0), q)  # position 0: no rotation
    assert rot(q, 17).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    # q.k depends only on the distance: what makes a cached key valid for every later query
    for m, n in [(3, 1), (13, 11), (50, 48)]:
        assert dot(m, n) == pytest.approx(dot(2, 0), rel=1e-5, abs=1e-6)
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-3 and abs(dot(5, 5) - dot(5, 0)) > 1e-3
    # the highest frequency turns by 1 radian per position, the lowest by theta^(-6/8)
    assert cos[1, 0].item() == pytest.approx(math.cos(1.0)) and sin[1, 3].item() == pytest.approx(math.sin(1e4 ** -0.75))


@pytest.mark.parametrize('kw', [dict(n_kv_head=2), dict(n_kv_head=1), dict(n_kv_head=4, **META)])
def test_gemma_kv_cache_matches_full_forward(kw):
    m = build(arch='gemma', n_head=4, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # sharper attention: a wrong rotary offset shows clearly
    idx, meta = batch(B=2, T=20)
    meta = meta if 'meta_streams' in kw else None
    with torch.no_grad():
        full, _ = m(idx, meta, targets=idx)
        cache = m.new_kv_cache(batch_size=2)
        assert cache.k.shape == (2, 2, kw['n_kv_head'], 32, 8)  # the cache holds n_kv_head heads
        pieces, pos = [], 0
        for n in (7, 5) + (1,) * 8:  # prefill, a chunk past position 0, then one token at a time
            sl = slice(pos, pos + n)
            lg, _ = m(idx[:, sl], {k: v[:, sl] for k, v in meta.items()} if meta else None,
                      targets=idx[:, sl], kv_cache=cache, start_pos=pos)
            pieces.append(lg)
            pos += n
        inc = torch.cat(pieces, 1)
        torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)
        # the same chunks with rotary positions restarting at 0 in every call would not match
        cos, sin = m.rope_cos.clone(), m.rope_sin.clone()
        cache, pos, wrong = m.new_kv_cache(batch_size=2), 0, []
        for n in (7, 5):
            m.rope_cos[pos:pos + n], m.rope_sin[pos:pos + n] = cos[:n], sin[:n]
            sl = slice(pos, pos + n)
            lg, _ = m(idx[:, sl], {k: v[:, sl] for k, v in meta.items()} if meta else None,
                      targets=idx[:, sl], kv_cache=cache, start_pos=pos)
            wrong.append(lg)
            pos += n
        m.rope_cos.copy_(cos), m.rope_sin.copy_(sin)
    assert (wrong[1] - full[:, 7:12]).abs().max() > 1e-3  # 100x the tolerance above


def test_gemma_cached_greedy_decoding_equals_uncached():
    m = build(**GEMMA, **META)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != 'transformer.wte.weight':  # at init the tied sqrt(d)-scaled table would just repeat the last token
                p.mul_(8.0)
    idx, meta = batch(B=2, T=4)
    a, b = greedy_uncached_and_cached(m, idx, meta)
    assert torch.equal(a, b) and len(set(a[1, 4:].tolist())) > 5


def test_gemma_zero_meta_weight_is_baseline():
    base, lime = build(**GEMMA), build(**GEMMA, meta_weight=0.0, **META)
    bsd, lsd = base.state_dict(), lime.state_dict()
    assert all(torch.equal(v, lsd[k]) for k, v in bsd.items())
    idx, meta = batch()
    y = torch.randint(64, idx.shape)
    lb, loss_b = base(idx, targets=y)
    ll, loss_l = lime(idx, meta, targets=y)
    assert torch.equal(lb, ll) and torch.equal(loss_b, loss_l)
    lime2 = build(**GEMMA, meta_weight=[1.0, 0.5], **META)
    assert not torch.equal(lime2(idx, meta, targets=y)[0], lb)
    with pytest.raises(ValueError, match='ner'):
        lime2(idx, {'pos': meta['pos']})


def test_gemma_bf16_autocast_forward_backward():
    # rotary and RMSNorm run in float32 and hand back the activation dtype, so SDPA sees one dtype
    m = build(**GEMMA, **META).train()
    idx, meta = batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss = m(idx, meta, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())


# --- meta_predict: the marginal likelihood, next tags summed out (GPT.marginal) --------------------

MV, MT = 11, 8  # vocabulary and block size of the marginal's tiny models


def marginal_model(arch, n_tags=(3, 4), seed=0):
    """A tiny meta_predict model (3 blocks, next tags injected after block 1; gemma: multi-query) whose
    tag heads and next-tag tables are scaled up, so the next tags matter: each candidate next tag gives
    the token another distribution, and a candidate that read the data's own tag would be caught."""
    kw = dict(arch='gemma', n_kv_head=1) if arch == 'gemma' else {}
    m = build(seed, block_size=MT, vocab_size=MV, n_layer=3, n_head=2, n_embd=16, meta_predict=True,
              meta_inject_layer=1, meta_streams=('pos', 'ner'), meta_n_tags=n_tags, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for e in m.meta_next_emb:
            e.weight.copy_(torch.randn(e.weight.shape, generator=g))
        for head in m.tag_head:
            head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=g))
    return m


def marginal_batch(m, B=2, T=MT, seed=1):
    """(idx, meta, next_meta, targets) from token sequences of length T+1: targets are the next tokens."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(MV, (B, T + 1), generator=g)
    meta = {s: torch.randint(n, (B, T), generator=g) for s, n in zip(m.config.meta_streams, m.config.meta_n_tags)}
    nxt = {s: torch.randint(n, (B, T), generator=g) for s, n in zip(m.config.meta_streams, m.config.meta_n_tags)}
    return seq[:, :-1], meta, nxt, seq[:, 1:]


def combos(m):
    return list(itertools.product(*(range(n) for n in m.config.meta_n_tags)))


def explicit_terms(m, idx, meta, nxt, targets):
    """(B, T, G): log p(g | past) + log p(target_t | past, g) at every position t for every combination g
    of next tags (itertools.product order), each by a plain full forward pass of one row with next_meta
    at t set to g (no cache, no batching of candidates)."""
    B, T = idx.shape
    cs = combos(m)
    out = torch.empty(B, T, len(cs), dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            x, mb = idx[b:b + 1], {s: v[b:b + 1] for s, v in meta.items()}
            for t in range(T):
                for c, g in enumerate(cs):
                    nm = {s: v[b:b + 1].clone() for s, v in nxt.items()}
                    for s, tag in zip(m.config.meta_streams, g):
                        nm[s][0, t] = tag
                    logits, _, tag_logits, _ = m.forward_predict(x, mb, nm, targets=targets[b:b + 1])
                    lp = F.log_softmax(logits[0, t], -1)[targets[b, t]]
                    lp = lp + sum(F.log_softmax(tl[0, t], -1)[tag] for tl, tag in zip(tag_logits, g))
                    out[b, t, c] = lp.double()
    return out


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_is_the_explicit_sum_over_every_tag_combination(arch):
    # the oracle leak (every candidate reading the data's own next tags) would give log p(target | data's
    # tags) here, since the tag probabilities then sum to 1: far from the explicit sum
    m = marginal_model(arch)
    idx, meta, nxt, y = marginal_batch(m)
    terms = explicit_terms(m, idx, meta, nxt, y)
    want = terms.logsumexp(-1)
    got = m.marginal(idx, meta, nxt, y)
    assert got.shape == (2, MT) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # the next tags matter: what the oracle leak would return, log p(target | the data's next tags), is far off
    with torch.no_grad():
        logits, _, _, _ = m.forward_predict(idx, meta, nxt, targets=y)
    leak = F.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    assert (leak.double() - want).abs().max() > 0.1


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_sums_to_one_over_the_vocabulary(arch):
    m = marginal_model(arch, seed=3)
    idx, meta, nxt, _ = marginal_batch(m, B=1, seed=4)
    probs = sum(m.marginal(idx, meta, nxt, torch.full_like(idx, v)).double().exp() for v in range(MV))
    torch.testing.assert_close(probs, torch.ones_like(probs), rtol=0, atol=1e-5)  # at every position


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_reads_nothing_from_the_target_on(arch):
    m = marginal_model(arch, seed=5)
    idx, meta, nxt, y = marginal_batch(m, seed=6)
    base = m.marginal(idx, meta, nxt, y)
    g = torch.Generator().manual_seed(7)
    for t in (0, 3, MT - 1):
        rnd = lambda v, n, lo: torch.cat([v[:, :lo], torch.randint(n, (v.size(0), v.size(1) - lo), generator=g)], 1)
        # the target at t and everything after it: later tokens, their tags, the next tags from t on
        y2 = rnd(y, MV, t)
        y2[:, t] = (y[:, t] + 1) % MV
        idx2 = torch.cat([idx[:, :t + 1], y2[:, t:-1]], 1)  # the targets are the next inputs
        meta2 = {s: rnd(v, n, t + 1) for (s, v), n in zip(meta.items(), (3, 4))}
        nxt2 = {s: rnd(v, n, t) for (s, v), n in zip(nxt.items(), (3, 4))}
        for s, n in zip(nxt, (3, 4)):
            nxt2[s][:, t] = (nxt[s][:, t] + 1) % n  # the data's next tags at t surely changed
        got = m.marginal(idx2, meta2, nxt2, y2)
        torch.testing.assert_close(got[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (got[:, t] - base[:, t]).abs().min() > 0  # the target itself does count
        # the target at t kept, everything after it changed: position t unmoved (the data's next tags at t
        # are the oracle's: a candidate reading them would move it)
        y3 = y2.clone()
        y3[:, t] = y[:, t]
        idx3 = torch.cat([idx[:, :t + 1], y3[:, t:-1]], 1)
        got = m.marginal(idx3, meta2, nxt2, y3)
        torch.testing.assert_close(got[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_batched_and_chunked_equal_one_row_unchunked(arch):
    m = marginal_model(arch, seed=8)
    idx, meta, nxt, y = marginal_batch(m, B=3, seed=9)
    for k in (0, 2, 5):
        whole = m.marginal(idx, meta, nxt, y, top_k=k)
        for b in range(3):
            one = m.marginal(idx[b:b + 1], {s: v[b:b + 1] for s, v in meta.items()},
                             {s: v[b:b + 1] for s, v in nxt.items()}, y[b:b + 1], top_k=k)
            torch.testing.assert_close(one[0], whole[b], rtol=0, atol=1e-6)
        for per_chunk in (1, 5):  # chunks of 1 and 5 candidates (exact: 12 = 5 + 5 + 2; top-5 + data: 5 + 1)
            m.MARGINAL_CHUNK = per_chunk * MT * MV
            torch.testing.assert_close(m.marginal(idx, meta, nxt, y, top_k=k), whole, rtol=0, atol=1e-6)
            del m.MARGINAL_CHUNK  # back to the class's


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_at_some_positions_equals_the_whole_marginal_there(arch):
    # BLiMP scores only the positions a pair does not share: the rest must not change what is computed
    m = marginal_model(arch, seed=12)
    idx, meta, nxt, y = marginal_batch(m, B=3, seed=13)
    g = torch.Generator().manual_seed(14)
    pos = torch.rand(idx.shape, generator=g) < 0.4
    pos[1] = False  # a row with nothing to compute
    pos[2, -1] = True  # the last position (it reads every earlier one)
    for k in (0, 2):
        whole = m.marginal(idx, meta, nxt, y, top_k=k)
        part = m.marginal(idx, meta, nxt, y, top_k=k, positions=pos)
        torch.testing.assert_close(part[pos], whole[pos], rtol=0, atol=1e-6)
        assert torch.isnan(part[~pos]).all()


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_top_k_is_a_bound_over_top_k_and_the_data_tags(arch):
    m = marginal_model(arch, seed=10)
    idx, meta, nxt, y = marginal_batch(m, seed=11)
    terms = explicit_terms(m, idx, meta, nxt, y)  # (B, T, 12)
    exact = m.marginal(idx, meta, nxt, y)
    with torch.no_grad():
        _, _, tag_logits, _ = m.forward_predict(idx, meta, nxt, targets=y)
    cs = torch.tensor(combos(m))
    joint = sum(F.log_softmax(tl, -1)[..., cs[:, d]] for d, tl in enumerate(tag_logits))  # (B, T, 12)
    data = nxt['pos'] * 4 + nxt['ner']
    G = len(cs)
    for k in (1, 2, 5, G - 1, G, G + 3):
        m.MARGINAL_CHUNK = 2 * MT * MV  # chunks of 2: the data's combination in a chunk of its own or not
        got = m.marginal(idx, meta, nxt, y, top_k=k)
        del m.MARGINAL_CHUNK
        assert (got <= exact + 1e-6).all(), k  # a part of the sum: minus it bounds the NLL from above
        if k >= G:
            torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
            continue
        keep = torch.zeros(joint.shape, dtype=torch.bool)
        keep.scatter_(-1, joint.topk(k, -1).indices, True)
        keep.scatter_(-1, data[..., None], True)  # the data's combination, once (a set: no double count)
        want = terms.masked_fill(~keep, float('-inf')).logsumexp(-1)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
        if k == 1:
            assert (keep.sum(-1) == 2).any()  # positions where the data's combination is not the top one
    # k=1 where the top combination IS the data's: exactly that one term (not counted twice)
    top = {s: tl.argmax(-1) for s, tl in zip(('pos', 'ner'), tag_logits)}  # the heads read no next tags
    got = m.marginal(idx, meta, top, y, top_k=1)
    with torch.no_grad():
        logits, _, tl2, _ = m.forward_predict(idx, meta, top, targets=y)
    one = F.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    one = one + sum(F.log_softmax(t, -1).gather(-1, top[s][..., None])[..., 0] for s, t in zip(('pos', 'ner'), tl2))
    torch.testing.assert_close(got, one, rtol=0, atol=1e-5)
    assert (m.marginal(idx, meta, top, y) > got + 1e-3).all()  # the other 11 combinations do add


@pytest.mark.parametrize('arch', ['gpt2', 'gemma'])
def test_marginal_sums_typed_ner_sized_products_exactly(arch):
    # 49 x 17 = 833 combinations (PTB tags x typed NER tags, with the special tags), many chunks
    m = marginal_model(arch, n_tags=(49, 17), seed=12)
    T = 3
    idx, meta, nxt, y = marginal_batch(m, B=1, T=T, seed=13)
    m.MARGINAL_CHUNK = 64 * T * MV  # 64 candidates a chunk: 14 chunks, the last one partial
    got = m.marginal(idx, meta, nxt, y)
    cs = torch.tensor(combos(m))  # (833, 2)
    want = torch.empty(T)
    with torch.no_grad():
        for t in range(T):  # all 833 candidates at position t as next_meta rows after one prefix
            nm = {s: v.repeat(len(cs), 1) for s, v in nxt.items()}
            nm['pos'][:, t], nm['ner'][:, t] = cs[:, 0], cs[:, 1]
            logits, _, tag_logits, _ = m.forward_predict(idx, meta, nm, targets=y.repeat(len(cs), 1))
            lp = F.log_softmax(logits[:, t], -1)[:, y[0, t]]
            lp = lp + sum(F.log_softmax(tl[0, t], -1)[cs[:, d]] for d, tl in enumerate(tag_logits))
            want[t] = torch.logsumexp(lp, 0)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)
    k = m.marginal(idx, meta, nxt, y, top_k=40)
    assert (k[0] <= got[0] + 1e-6).all()
