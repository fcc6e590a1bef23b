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


def test_cached_greedy_decoding_equals_uncached():
    m = build(**META)
    idx, meta = batch(B=2, T=4)
    g = torch.Generator().manual_seed(3)
    future = {k: torch.randint(v.max().item() + 1, (2, 12), generator=g) for k, v in meta.items()}
    full_meta = {k: torch.cat([meta[k], future[k]], 1) for k in meta}
    with torch.no_grad():
        a = idx
        for t in range(12):  # uncached: rerun the whole prefix
            T = a.size(1)
            lg, _ = m(a, {k: v[:, :T] for k, v in full_meta.items()})
            a = torch.cat([a, lg[:, -1].argmax(-1, keepdim=True)], 1)
        cache = m.new_kv_cache(2)
        b, pos = idx, 0
        for t in range(12):
            T = b.size(1)
            lg, _ = m(b[:, pos:], {k: v[:, pos:T] for k, v in full_meta.items()}, kv_cache=cache, start_pos=pos)
            pos = T
            b = torch.cat([b, lg[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(a, b)


# --- self-predicted metadata (meta_predict) ----------------------------------------------

PRED = dict(META, meta_predict=True, meta_inject_layer=1)


def pieces(m, idx, meta, nxt):
    """Tag-head logits and token logits at every position."""
    with torch.no_grad():
        h = m.lower(idx, meta)
        tags = m.tag_logits(h)
        logits, _ = m.upper(m.inject(h, nxt), targets=idx)
    return tags, logits


def test_meta_predict_is_causal():
    # everything at position t depends on tokens and tags <= t and the next tags given at <= t only
    m = build(**PRED)
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


def test_meta_predict_kv_cache_matches_full_forward():
    m = build(**PRED)
    idx, meta = batch(B=2, T=20)
    _, nxt = batch(B=2, T=20, seed=2)
    tags, full = pieces(m, idx, meta, nxt)
    cache, pos, got, got_tags = m.new_kv_cache(batch_size=2), 0, [], []
    with torch.no_grad():
        for n in (7, 5) + (1,) * 8:
            sl = slice(pos, pos + n)
            h = m.lower(idx[:, sl], {k: v[:, sl] for k, v in meta.items()}, kv_cache=cache, start_pos=pos)
            got_tags.append(m.tag_logits(h)[0])
            lg, _ = m.upper(m.inject(h, {k: v[:, sl] for k, v in nxt.items()}), targets=idx[:, sl],
                            kv_cache=cache, start_pos=pos)
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
