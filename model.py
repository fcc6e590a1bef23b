"""
GPT language model with LIME metadata embeddings, in one file.

Two decoder architectures, chosen by config.arch, both pre-norm with causal attention and
tied input/output embeddings:
- 'gpt2' (default): nanoGPT's GPT-2: learned positions (wpe), LayerNorm, GELU MLP, optional biases.
- 'gemma': a Gemma-style (Gemma 1) decoder: rotary positions, RMSNorm with Gemma's (1 + weight)
  scale, GeGLU MLP (tanh-approximated GELU gate), grouped-query attention (n_kv_head key/value
  heads; 1 = multi-query), no biases, token embeddings scaled by sqrt(n_embd).
LIME adds one embedding table per metadata stream (e.g. POS tags, NER tags) whose rows are added
to the token input:

    gpt2:  x = wte(tok) + wpe(pos) + sum_d w_d * E_d(meta_d)
    gemma: x = sqrt(n_embd) * wte(tok) + sum_d w_d * E_d(meta_d)   (positions: rotary, inside attention)

Nothing else in the network or the loss looks at metadata, and with no
streams configured the model is exactly the baseline GPT.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # gpt2 only: Gemma has no biases (forced False for arch='gemma')
    arch: str = 'gpt2'  # 'gpt2' or 'gemma' (see the top of this file)
    n_kv_head: int = 0  # key/value heads, n_head a multiple of it; 0 = n_head; 1 = multi-query. gpt2: n_head
    mlp_hidden: int = 0  # MLP hidden width (gemma: of each of the gate and up projections); 0 = 4 * n_embd
    # metadata streams, in a fixed order; meta_n_tags[i] is the size of stream i's tag vocabulary
    meta_streams: tuple = ()
    meta_n_tags: tuple = ()
    meta_weight: object = 1.0  # one float for all streams, or one per stream (stored as a tuple)
    # not used by the model itself: records whether position t was trained on the metadata
    # of token t (0, LIME) or of token t+1 (1, LIME+1), so a sampler knows what to feed
    meta_shift: int = 0
    # self-predicted next-token metadata (LIME+1 without an oracle): after block meta_inject_layer
    # (k, 1 <= k < n_layer) one tag head per stream predicts the next token's tags; the next
    # token's tags (the data's in training, the head's choice or a hint at generation) are then
    # embedded with their own tables and added to the residual stream before block k+1
    meta_predict: bool = False
    meta_inject_layer: int = 0
    meta_loss_weight: float = 1.0  # loss = token CE + meta_loss_weight * sum over streams of tag CE
    # metadata cooldown (train.py's meta_cooldown): True once the model has been trained without tags;
    # then meta=None means no metadata, the tables add nothing, and the model is a plain language model
    meta_cooled: bool = False

    @property
    def input_streams(self):
        """The metadata streams a caller feeds at inference: none once the model has cooled down."""
        return [] if self.meta_cooled else list(self.meta_streams)

    def __post_init__(self):
        # a wrong model shape is a config mistake: ValueError with one line (train.py prints it)
        for k in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {getattr(self, k)}")
        for k in ('n_kv_head', 'mlp_hidden'):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be an integer >= 0 (0: the default), got {getattr(self, k)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch not in ('gpt2', 'gemma'):
            raise ValueError(f"arch must be 'gpt2' or 'gemma', got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_kv_head < 0 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.arch == 'gpt2' and self.n_kv_head != self.n_head:
            raise ValueError(f"n_kv_head={self.n_kv_head}: grouped-query attention needs arch='gemma'")
        if self.arch == 'gemma':
            self.bias = False
            if (self.n_embd // self.n_head) % 2:
                raise ValueError(f"rotary embeddings need an even head size, got {self.n_embd // self.n_head}")
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.meta_streams = tuple(self.meta_streams)
        self.meta_n_tags = tuple(int(n) for n in self.meta_n_tags)
        if any(n < 1 for n in self.meta_n_tags):
            raise ValueError(f"meta_n_tags must be integers >= 1, got {self.meta_n_tags}")
        w = self.meta_weight
        if isinstance(w, (int, float)):  # one weight for every stream
            w = (float(w),) * len(self.meta_streams)
        self.meta_weight = tuple(float(x) for x in w)
        assert len(self.meta_n_tags) == len(self.meta_streams), "meta_n_tags must match meta_streams"
        assert len(self.meta_weight) == len(self.meta_streams), "meta_weight must be a float or one per stream"
        if self.meta_predict:
            assert self.meta_streams, "meta_predict needs metadata streams"
            self.meta_inject_layer = self.meta_inject_layer or self.n_layer // 2  # 0: the middle block (README's sweep)
            assert 1 <= self.meta_inject_layer < self.n_layer, "meta_inject_layer must be in [1, n_layer)"


class KVCache:
    """Preallocated keys/values for incremental decoding: (n_layer, B, n_kv_head, max_len, head_dim).
    gemma: the keys are stored already rotated to their absolute positions."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


ROPE_THETA = 10000.0  # Gemma's rotary base


def rotary_tables(head_dim, max_len):
    """cos and sin of the rotary angles pos * theta^(-2i/head_dim), (max_len, head_dim/2), float32."""
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by its position's angle
    (Gemma's half-split layout); cos, sin: (T, hs/2). In float32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), computed in float32; weight starts at 0 (scale 1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def norm(config):
    return RMSNorm(config.n_embd) if config.arch == 'gemma' else nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.n_embd = config.n_embd
        self.hs = config.n_embd // config.n_head
        self.dropout = config.dropout
        # queries for n_head heads, keys and values for n_kv_head heads (gpt2: n_kv_head = n_head, 3 * n_embd)
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, start_pos=0):
        """rope: (cos, sin) of positions start_pos..start_pos+T-1 (gemma), None for gpt2."""
        B, T, C = x.size()
        kv = self.n_kv_head * self.hs
        q, k, v = self.c_attn(x).split([self.n_embd, kv, kv], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)
        if rope is not None:
            # rotated at their absolute positions before caching: a cached key needs no later fix-up,
            # and q.k then depends only on the distance between the two positions
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, is_causal = None, True
        if kv_cache is not None:
            end = start_pos + T
            kv_cache.k[self.layer_idx, :B, :, start_pos:end] = k
            kv_cache.v[self.layer_idx, :B, :, start_pos:end] = v
            k = kv_cache.k[self.layer_idx, :B, :, :end]
            v = kv_cache.v[self.layer_idx, :B, :, :end]
            if start_pos > 0:
                # queries sit at absolute positions start_pos..end-1 and may see every key up to themselves;
                # is_causal would align the mask to the top-left corner, which is wrong once keys outnumber queries
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        # grouped-query attention: query head h reads key/value head h // (n_head / n_kv_head)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def candidates(self, x, u, rope=None, at=None):
        """Attention of K candidate inputs per position: u (B, P, K, C) at position t = at[p] (default:
        P = T, at = 0..T-1) reads the keys and values of x (B, T, C) at positions s < t and its own at t,
        as if each candidate were x_t in the sequence x. (meta_predict's marginal: the upper blocks of
        every candidate next tag of every position at once, the past's own next tags in x.) Returns the
        output for u, (B, P, K, C)."""
        B, P, K, C = u.size()
        T = x.size(1)
        at = torch.arange(T, device=u.device) if at is None else at
        kv = self.n_kv_head * self.hs
        _, kx, vx = self.c_attn(x).split([self.n_embd, kv, kv], dim=2)
        qu, ku, vu = self.c_attn(u).split([self.n_embd, kv, kv], dim=3)
        kx = kx.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        vx = vx.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)
        qu = qu.view(B, P, K, self.n_head, self.hs).permute(0, 3, 1, 2, 4)  # (B, nh, P, K, hs)
        ku = ku.view(B, P, K, self.n_kv_head, self.hs).permute(0, 3, 1, 2, 4)
        vu = vu.view(B, P, K, self.n_kv_head, self.hs).permute(0, 3, 1, 2, 4)
        if rope is not None:
            cos, sin = rope
            kx = apply_rotary(kx, cos, sin)
            cu, su = cos[at][:, None], sin[at][:, None]
            qu, ku = apply_rotary(qu, cu, su), apply_rotary(ku, cu, su)
        rep = self.n_head // self.n_kv_head  # grouped-query attention: query head h reads key/value head h // rep
        if rep > 1:
            kx, vx, ku, vu = (t.repeat_interleave(rep, dim=1) for t in (kx, vx, ku, vu))
        scale = 1.0 / math.sqrt(self.hs)
        past = torch.einsum('bhtkd,bhsd->bhtks', qu, kx) * scale  # (B, nh, P, K, T)
        seen = torch.arange(T, device=u.device)[None] < at[:, None]  # (P, T): s < t
        past = past.masked_fill(~seen[:, None, :], float('-inf'))
        own = (qu * ku).sum(-1, keepdim=True) * scale
        a = torch.cat([past, own], dim=-1).float().softmax(-1).type_as(u)
        y = torch.einsum('bhtks,bhsd->bhtkd', a[..., :T], vx) + a[..., T:] * vu
        y = y.permute(0, 2, 3, 1, 4).reshape(B, P, K, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """gpt2: c_proj(gelu(c_fc(x))). gemma (GeGLU): c_fc holds the gate and up projections side by
    side, c_proj(gelu_tanh(x W_gate) * (x W_up))."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.arch == 'gemma'
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh' if self.gated else 'none')
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.gelu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, start_pos=0):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))

    def candidates(self, x, u, rope=None, at=None):
        """The block's output for candidate inputs u (B, P, K, C) at positions at beside the sequence x
        (B, T, C): see CausalSelfAttention.candidates (eval only: no dropout)."""
        u = u + self.attn.candidates(self.ln_1(x), self.ln_1(u), rope, at)
        return u + self.mlp(self.ln_2(u))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        gemma = config.arch == 'gemma'
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not gemma:  # gemma: positions are rotary, no table
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if gemma:
            # rotary cos/sin for every position: derived from the config, so not saved in checkpoints
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)

        # GPT-2 init for the baseline parameters first, so a LIME model built from the same seed
        # starts from exactly the baseline's weights and differs only by the metadata tables
        # (gemma too: N(0, 0.02) matrices and embeddings, RMSNorm weights 0 = scale 1)
        self.apply(self._init_weights)
        # residual projections scaled by 1/sqrt(2*n_layer), as in GPT-2
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        # metadata tables, created (and drawn from the RNG) last; absent entirely for the baseline.
        # Initialised at the scale of the token input they are added to: wte's std 0.02 for gpt2,
        # 0.02 * sqrt(n_embd) for gemma's scaled embedding (at 0.02 there they would start 1/sqrt(n_embd)
        # as large as the token signal, and LIME+1 learns the synthetic next-tag task several times slower)
        if config.meta_streams:
            std = 0.02 * (math.sqrt(config.n_embd) if gemma else 1.0)
            self.meta_emb = nn.ModuleList([nn.Embedding(n, config.n_embd) for n in config.meta_n_tags])
            for e in self.meta_emb:
                torch.nn.init.normal_(e.weight, mean=0.0, std=std)
        # self-predicted metadata: created after everything else, so a meta_predict model starts
        # from the LIME model's weights of the same seed; the next-tag tables at the metadata tables' scale
        if config.meta_predict:
            self.tag_head = nn.ModuleList([nn.Sequential(norm(config), nn.Linear(config.n_embd, n, bias=False))
                                           for n in config.meta_n_tags])
            self.meta_next_emb = nn.ModuleList([nn.Embedding(n, config.n_embd) for n in config.meta_n_tags])
            for head in self.tag_head:
                head.apply(self._init_weights)
            for e in self.meta_next_emb:
                torch.nn.init.normal_(e.weight, mean=0.0, std=std)

        if self.lm_head.weight.is_meta:
            return  # a shape check (meta_model), not a model to report
        n, n_meta = self.get_num_params(), self.get_num_meta_params()
        print(f"number of parameters: {n/1e6:.2f}M (metadata tables{' and tag heads' if config.meta_predict else ''}: "
              f"{n_meta:,} = {100*n_meta/n:.3f}%)")

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=False):
        """Total parameters (tied wte/lm_head counted once). non_embedding drops the lookup-only
        tables (wpe, gpt2 only, and metadata); wte stays because it is also the output projection."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.get_num_meta_params(lookup_only=True)
            if 'wpe' in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def get_num_meta_params(self, lookup_only=False):
        """Parameters LIME adds: the metadata tables (and, for meta_predict, the next-tag tables
        and the tag heads; lookup_only leaves the heads out, they are matmuls)."""
        mods = []
        if self.config.meta_streams:
            mods.append(self.meta_emb)
        if self.config.meta_predict:
            mods += [self.meta_next_emb] + ([] if lookup_only else [self.tag_head])
        return sum(p.numel() for m in mods for p in m.parameters())

    def forward(self, idx, meta=None, targets=None, kv_cache=None, start_pos=0, next_meta=None):
        """idx: (B, T) token ids. meta: dict {stream name: (B, T) tag ids} with every configured stream
        (ignored when the model has none). targets: (B, T) or None. With kv_cache (see new_kv_cache),
        idx holds the tokens at positions start_pos..start_pos+T-1 and earlier keys come from the cache.
        next_meta (meta_predict models only): {stream: (B, T)}, position t holds the tags of token t+1
        (the data's in training; the head's choice or a hint at generation, see sample.py); with
        targets, the loss adds meta_loss_weight * sum over streams of the tag heads' cross-entropy
        against next_meta. Returns (logits, loss): logits of every position with targets, else of
        the last one only."""
        if not self.config.meta_predict:
            return self.upper(self.lower(idx, meta, kv_cache, start_pos), targets, kv_cache, start_pos)
        if next_meta is None:
            raise ValueError("a meta_predict model needs next_meta: the next token's tags")
        logits, loss, tag_logits, _ = self.forward_predict(idx, meta, next_meta, targets, kv_cache, start_pos)
        if loss is not None:
            tag_loss = sum(F.cross_entropy(tl.view(-1, tl.size(-1)), next_meta[s].reshape(-1))
                           for s, tl in zip(self.config.meta_streams, tag_logits))
            loss = loss + self.config.meta_loss_weight * tag_loss
        return logits, loss

    def forward_predict(self, idx, meta=None, next_meta=None, targets=None, kv_cache=None, start_pos=0,
                        choose=None, h=None):
        """The meta_predict forward, the one place that runs it (training, evaluation, generation, the
        harness, the experiments): blocks 1..k, the tag heads, the next token's tags added, blocks k+1..L.
        The next tags {stream: (B, T)} are next_meta (the data's: teacher forcing), else
        choose(tag_logits) (generation: a draw or a hint; evaluation: argmax_tags). next_meta may hold
        n rows for one row of idx: n candidates after one prefix (the lower blocks run once; a kv_cache
        then needs n rows, equal up to start_pos). h: the lower blocks' output returned by an earlier
        call on the same idx and meta, to rerun only blocks k+1..L with other next tags.
        Returns (logits, loss, tag_logits, h): logits and loss (the tokens' only) as upper();
        tag_logits one (B, T, n_tags) per stream, of every position with targets, else of the last."""
        if h is None:
            h = self.lower(idx, meta, kv_cache, start_pos)
        tag_logits = [head(h if targets is not None else h[:, -1:]) for head in self.tag_head]
        if next_meta is None:
            if choose is None:
                raise ValueError("a meta_predict model needs the next token's tags: next_meta or choose")
            next_meta = choose(tag_logits)
        logits, loss = self.upper(self.add_next(h, next_meta), targets, kv_cache, start_pos)
        return logits, loss, tag_logits, h

    MARGINAL_CHUNK = 1 << 24  # logits values per candidate chunk of marginal() (64 MiB in float32)

    @torch.no_grad()
    def marginal(self, idx, meta, next_meta, targets, top_k=0, positions=None):
        """log p(targets_t | past) of a meta_predict model with position t's next tags summed out,
        log sum_g p(g | past) p(targets_t | past, g), g over every combination of every stream's tags
        (top_k=0: the exact sum), or over the top_k combinations by the heads' joint probability plus the
        data's own (a part of the sum, so minus it is an upper bound on the NLL: an honest bound).
        next_meta {stream: (B, T)}: the data's next tags, read at positions s < t (the past's own tags,
        a function of the tokens up to t when the streams are causal; the caller's to check). Every
        candidate of every position goes through blocks k+1..L at once (Block.candidates), in chunks
        of MARGINAL_CHUNK logits; the lower blocks and the data's path run once. positions (B, T) bool:
        compute only there (the rest of the result is NaN; their cost is the candidates'). Returns (B, T)
        float32."""
        cfg = self.config
        assert cfg.meta_predict, "marginal() is the self-predicting (meta_predict) model's likelihood"
        h = self.lower(idx, meta)
        B, T, _ = h.shape
        upper = self.transformer.h[self.n_lower:]
        rope = self.rope(0, T)
        tag_lp = [F.log_softmax(head(h).float(), -1) for head in self.tag_head]  # (B, T, n_d) each
        x, xs = self.add_next(h, next_meta), []
        for block in upper:  # the data's path: the inputs of each upper block, which candidates read
            xs.append(x)
            x = block(x, rope)
        n = torch.tensor(cfg.meta_n_tags, device=idx.device)
        G = math.prod(cfg.meta_n_tags)
        radix = torch.cat([torch.cumprod(n.flip(0), 0).flip(0)[1:], n.new_ones(1)])  # combination c -> digits
        digits = lambda c: [(c // r) % m for r, m in zip(radix, n)]
        out = torch.full((B, T), float('nan'), device=idx.device)
        for b in range(B):
            at = torch.arange(T, device=idx.device) if positions is None else positions[b].nonzero()[:, 0]
            P = at.numel()
            if P == 0:
                continue
            tlp = [lp[b, at] for lp in tag_lp]  # (P, n_d) each
            if top_k and top_k < G:
                joint = sum(lp[:, d] for lp, d in zip(tlp, digits(torch.arange(G, device=idx.device))))
                top = joint.topk(top_k, dim=-1).indices  # (P, k)
                data = sum(next_meta[s][b, at] * r for s, r in zip(cfg.meta_streams, radix))  # (P,)
                cand = torch.cat([top, data[:, None]], 1)  # the data's combination, counted once
                dup = (top == data[:, None]).any(-1)
            else:
                cand = torch.arange(G, device=idx.device).expand(P, G)
                dup = None
            acc = torch.full((P,), float('-inf'), device=idx.device)
            K = cand.size(1)
            step = max(1, self.MARGINAL_CHUNK // (P * cfg.vocab_size))
            tgt = targets[b, at]
            for c0 in range(0, K, step):
                c = cand[:, c0:c0 + step]
                lp = sum(tl.gather(1, d) for tl, d in zip(tlp, digits(c)))  # (P, kc)
                if dup is not None and c0 + step >= K:
                    lp[:, -1] = lp[:, -1].masked_fill(dup, float('-inf'))
                u = h[b, at, None] + self.add_next(0, dict(zip(cfg.meta_streams, digits(c))))
                u = u[None]
                for block, xb in zip(upper, xs):
                    u = block.candidates(xb[b:b + 1], u, rope, at)
                logits = self.lm_head(self.transformer.ln_f(u[0])).float()  # (P, kc, V)
                tok = tgt[:, None, None].expand(P, logits.size(1), 1)
                lp = lp + logits.gather(-1, tok)[..., 0] - logits.logsumexp(-1)
                acc = torch.logaddexp(acc, lp.logsumexp(-1))
            out[b, at] = acc
        return out

    def add_next(self, x, next_meta):
        """x + sum_d w_d * N_d(next_meta_d): the next token's tags, added after block k (meta_predict)."""
        for name, w, emb in zip(self.config.meta_streams, self.config.meta_weight, self.meta_next_emb):
            if name not in next_meta:
                raise ValueError(f"missing next-token metadata stream '{name}'")
            x = x + w * emb(next_meta[name])
        return x

    def argmax_tags(self, tag_logits):
        """choose for forward_predict: each stream's most likely next tag (the model's own, from the past alone)."""
        return {s: tl.argmax(-1) for s, tl in zip(self.config.meta_streams, tag_logits)}

    # the two halves of forward and forward_predict (meta_predict: the next tags are added between them)

    def lower(self, idx, meta=None, kv_cache=None, start_pos=0):
        """Embeddings and the blocks before the next-tag injection (all blocks unless meta_predict)."""
        B, T = idx.size()
        assert start_pos + T <= self.config.block_size, \
            f"cannot forward position {start_pos + T - 1}, block size is only {self.config.block_size}"
        rope = self.rope(start_pos, T)
        if self.config.arch == 'gemma':
            # The tied table is sized for the output layer (std 0.02); sqrt(n_embd) lifts its rows to
            # the residual stream's scale (RMS ~ 1) at the input. The metadata tables are input-only, not
            # tied, so they need no such factor: they are added after it (and initialised at that scale),
            # so the sum is the paper's, the model's own token input plus the metadata, and w_d = 0 (or
            # no streams) leaves exactly the baseline's input.
            x = self.transformer.wte(idx) * math.sqrt(self.config.n_embd)
        else:
            pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        if self.config.meta_streams:
            x = self.add_meta(x, meta)
        x = self.transformer.drop(x)
        for block in self.transformer.h[:self.n_lower]:
            x = block(x, rope, kv_cache, start_pos)
        return x

    @property
    def n_lower(self):
        return self.config.meta_inject_layer if self.config.meta_predict else self.config.n_layer

    def rope(self, start_pos, T):
        """gemma: cos and sin of the rotary angles of positions start_pos..start_pos+T-1; gpt2: None."""
        if self.config.arch != 'gemma':
            return None
        return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]

    def upper(self, x, targets=None, kv_cache=None, start_pos=0):
        """The remaining blocks, the final norm and the LM head; the token loss when targets are given."""
        rope = self.rope(start_pos, x.size(1))
        for block in self.transformer.h[self.n_lower:]:
            x = block(x, rope, kv_cache, start_pos)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
            loss = None
        return logits, loss

    def add_meta(self, x, meta):
        """x + sum_d w_d * E_d(meta_d), streams in config order; meta: {stream name: (B, T) tag ids}."""
        if not meta and self.config.meta_cooled:
            return x  # cooled down (meta_cooldown): trained to end without tags
        if meta is None:
            raise ValueError(f"this model needs metadata streams {list(self.config.meta_streams)}")
        for name, w, emb in zip(self.config.meta_streams, self.config.meta_weight, self.meta_emb):
            if name not in meta:
                raise ValueError(f"missing metadata stream '{name}'")
            x = x + w * emb(meta[name])
        return x

    def new_kv_cache(self, batch_size, max_len=None, device=None, dtype=None):
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size,
                       device=device or p.device, dtype=dtype or p.dtype)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay every 2D tensor (matmuls and embeddings, metadata tables included); not biases/LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} params), "
              f"non-decayed: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} params)")
        extra = dict(fused=True) if device_type == 'cuda' else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self):
        """Training FLOPs per token (forward+backward), PaLM appendix B style: 6 per weight of every
        matmul, so the gated MLP's three matrices and the grouped (n_kv_head) key/value projections
        count at their real sizes, plus the attention scores and mix, 12*L*H*Q*T, over all n_head
        query heads. Embedding lookups (wpe, metadata tables) count as 0; wte counts through the tied
        lm_head matmul; norm weights (a few n_embd vectors) are counted as if they were matmul weights."""
        cfg = self.config
        N = self.get_num_params(non_embedding=True)
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops (default: detected GPU's bf16 dense
        peak). Returns None when no peak is known (e.g. CPU)."""
        peak = peak_flops or default_peak_flops()
        if not peak or dt <= 0:
            return None
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak

    @classmethod
    def from_checkpoint(cls, ckpt, device='cpu'):
        """Rebuild a model from a train.py checkpoint (dict or path): model_args -> GPTConfig -> weights.
        A path is loaded with weights_only=True: tensors and plain data only, so it cannot run code
        (train.load_checkpoint does the same and names what is wrong with a file in one line).
        The model is made on the meta device and checked against the file's tensors (meta_model) before
        any memory is taken, then filled from the file: at most the file's size again."""
        if not isinstance(ckpt, dict):
            ckpt = torch.load(ckpt, map_location='cpu', weights_only=True)
        sd = unwrapped(ckpt['model'])
        model = meta_model(ckpt['model_args'], sd)
        model.to_empty(device=device)  # uninitialised; every persistent tensor is read from the file next
        model.transformer.wte.weight = model.lm_head.weight  # to_empty makes new parameters: tie them again
        model.load_state_dict(sd)
        if model.config.arch == 'gemma':  # derived from the config, never saved: to_empty left them unset
            cos, sin = rotary_tables(model.config.n_embd // model.config.n_head, model.config.block_size)
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)
        return model


def unwrapped(state_dict):
    """A state_dict saved from a compiled or DDP-wrapped model, with the wrappers' key prefixes dropped."""
    return {k.removeprefix('_orig_mod.').removeprefix('module.') if isinstance(k, str) else k: v
            for k, v in state_dict.items()}


def _compare(expected, found):
    """The first difference between expected ({name: shape}) and found ({name: tensor}), as a ValueError."""
    for k, shape in expected.items():
        if k not in found:
            raise ValueError(f"missing tensor {k} (model_args say shape {shape})")
        if tuple(found[k].shape) != shape:
            raise ValueError(f"tensor {k} has shape {tuple(found[k].shape)}, model_args say {shape}")
    for k in found:
        if k not in expected:
            raise ValueError(f"unexpected tensor {k} (not in the model that model_args describe)")


def meta_model(model_args, state_dict):
    """The GPT of a checkpoint's model_args, built on the meta device (no memory for its tensors), once
    the checkpoint's tensors state_dict are proven to be exactly its own: names, shapes, floating dtypes,
    and the data to fill them really in the file. Both come from an untrusted file, so nothing the size of
    model_args is made before it is compared with what the file holds: a 20 MB file that says n_layer=10**6
    or n_embd=4096 is refused, not allocated. ValueError: one line naming the key or tensor."""
    if not isinstance(model_args, dict) or not isinstance(state_dict, dict):
        raise ValueError("model_args and model must be dicts")
    unknown = [k for k in model_args if k not in GPTConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"model_args: unknown key {unknown[0]!r}")
    try:
        config = GPTConfig(**model_args)
    except (TypeError, ValueError, AssertionError) as e:  # a type, a range, a key that contradicts another
        raise ValueError(f"bad model_args: {e}")
    for k, t in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"tensor name {k!r} is not a string")
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided and not t.is_meta):
            raise ValueError(f"tensor {k}: not a dense floating-point tensor "
                             f"({t.dtype if isinstance(t, torch.Tensor) else type(t).__name__})")
        st = t.untyped_storage()
        if t.numel() * t.element_size() > st.nbytes():  # e.g. a stride-0 view: a huge shape over one value
            raise ValueError(f"tensor {k}: shape {tuple(t.shape)} needs {t.numel() * t.element_size():,} bytes, "
                             f"the file holds {st.nbytes():,} for it")
    # the layers first, from one block: n_layer blocks (even on meta, ~70 kB of Python objects each) are built
    # only for a file that holds every tensor of every one of them; the same for the metadata tables
    layers = {k: t for k, t in state_dict.items() if k.startswith('transformer.h.')}
    n = len({k.split('.')[2] for k in layers})
    if n != config.n_layer:
        raise ValueError(f"model_args n_layer={config.n_layer}, but the file holds tensors of {n} layers")
    n = len({k.split('.')[1] for k in state_dict if k.startswith('meta_emb.')})
    if n != len(config.meta_streams):
        raise ValueError(f"model_args meta_streams has {len(config.meta_streams)} streams, "
                         f"but the file holds {n} metadata tables")
    with torch.device('meta'):
        block = {k: tuple(v.shape) for k, v in Block(config, 0).state_dict().items()}
    _compare({f'transformer.h.{i}.{k}': s for i in range(config.n_layer) for k, s in block.items()}, layers)
    with torch.device('meta'):
        model = GPT(config)
    _compare({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict)
    # the values the file really holds: tensors that share data (views of one storage) count once
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size()
                for t in state_dict.values()}.values())
    need = sum(p.numel() for p in model.parameters())  # tied weights once
    if need > held:
        raise ValueError(f"tensors overlap: the model has {need:,} weights, the file holds {held:,} values")
    derived = sum(b.numel() for k, b in model.named_buffers() if k not in state_dict)  # gemma's rotary tables
    if derived > held:
        raise ValueError(f"model_args block_size={config.block_size}: its rotary tables ({derived:,} values) "
                         f"outweigh all the file's weights ({held:,})")
    return model


def default_peak_flops():
    """bf16 dense peak FLOP/s of the visible GPU, or None if unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, peak in (('H100', 989e12), ('H200', 989e12), ('H800', 989e12), ('A100', 312e12), ('A800', 312e12)):
        if key in name:
            return peak
    return None
