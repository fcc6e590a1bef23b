"""
Sample from a trained model: baseline, LIME (metadata of token t at position t) or LIME+1
(metadata of token t+1 at position t, so hints can steer what comes next).

$ python sample.py --out_dir=out-cpu-demo-lime --start="The ship" --max_new_tokens=40
$ python sample.py --out_dir=out-cpu-demo-lime1 --start="He paid" --hints="CD CD NNS" --show_tags=True

Everything about the data (streams, tag vocabularies, tokenizer, tokenization, NER mode) is read
from the checkpoint. Metadata at generation is always causal: the tags of token t computed from
tokens <= t (metadata.CausalStream), since the future text a full tagger would look at does not
exist yet. Every module-level name below is a config key, overridable with --key=value.
"""

import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
from torch.nn import functional as F

import common
from common import fail
from metadata import UNK, base_stream, is_causal  # UNK: the tag id of a missing hint, in every stream

# -----------------------------------------------------------------------------
out_dir = 'out'  # a train.py run directory (its ckpt.pt), or a checkpoint file (e.g. out/ckpt_000500.pt)
start = '\n'  # prompt text (all of it text: a literal <|endoftext|> too), or FILE:path; '' starts a fresh document
num_samples = 3  # >= 1
max_new_tokens = 100  # >= 0
temperature = 0.8  # >= 0; 0 = greedy (any positive value works: sampling is computed without overflow)
top_k = 200  # >= 0; 1 = greedy; 0 = no top-k filtering
seed = 1337
device = 'cpu'
dtype = 'auto'  # float32, bfloat16, float16 (these two need a CUDA device); auto = bfloat16 on a CUDA GPU with bf16, else float32
compile = False
kv_cache = True  # False: recompute the whole context for every new token
hints = ''  # LIME+1 / meta_predict: one element per generated token: CD, B-NE, CD/O, or _ for none
meta_temperature = -1.0  # meta_predict: temperature of the tag heads' draws; -1 = temperature; 0 = argmax
hints_file = ''  # read hints from this file instead
show_tags = False  # print each generated token with the metadata it was given
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}


def configure(argv):
    """Config files and --key=value flags over DEFAULTS: train.py's configurator (a string option
    keeps its raw text: --start=42 is the text "42"), then the ranges of the options."""
    cfg = common.configure(argv, DEFAULTS)[0]
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Ranges of the options: one line naming the allowed range (a LimeError), not a traceback."""
    import math
    from common import check_device, check_range, resolve_dtype
    check_range(cfg, 'num_samples', cfg['num_samples'] >= 1, 'an integer >= 1')
    for k in ('max_new_tokens', 'top_k', 'seed'):
        check_range(cfg, k, cfg[k] >= 0, 'an integer >= 0' + (' (0: no top-k filtering)' if k == 'top_k' else ''))
    check_range(cfg, 'temperature', math.isfinite(cfg['temperature']) and cfg['temperature'] >= 0,
                'a finite number >= 0 (0: greedy)')
    mt = cfg['meta_temperature']
    check_range(cfg, 'meta_temperature', mt == -1 or (math.isfinite(mt) and mt >= 0),
                '-1 (the token temperature) or a finite number >= 0 (0: argmax)')
    check_range(cfg, 'out_dir', cfg['out_dir'].strip() != '', 'a directory name')
    check_device(cfg['device'])
    resolve_dtype(cfg['dtype'], cfg['device'])


# -----------------------------------------------------------------------------
# tokenizer

class Text:
    """Encode/decode with the checkpoint's tokenizer and tokenization, as prepare.py did."""

    def __init__(self, dataset):
        import metadata as md
        self.md = md
        self.tokenization = dataset.get('tokenization', 'lime')
        self.ner = dataset.get('ner', 'binary')
        try:
            md.set_tokenizer(dataset.get('tokenizer', 'gpt2'))
            md.ensure_resources(self.ner)
            self.enc = md.encoding()
        except md.MetadataError as e:
            fail(str(e))
        self.eot = self.enc.eot_token

    def encode(self, text):
        # exactly as prepare.py encodes a document ('lime' tokenization encodes each word on its own, so
        # the words come from the tagger's word split). Text is text: a literal <|endoftext|> in it is
        # ordinary tokens here as in the training data, where the separator only ever falls between
        # documents; a prompt starts a new document with --start='' (the separator alone)
        return self.md.annotate_text(text, self.tokenization, self.ner)[0].tolist()

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_str(self, i):
        return self.enc.decode_single_token_bytes(i).decode('utf-8', errors='replace')

    def tagger(self):
        return self.md.CausalStream(self.ner)


# -----------------------------------------------------------------------------
# hints (LIME+1)

def parse_hints(text, vocabs):
    """'CD CD/O _ B-NE' -> one dict {stream: tag id} per generated token ({} = no hint).
    vocabs: {stream name: tag names}; each part of an element must name a tag of exactly one stream."""
    valid = {}
    for s, tags in vocabs.items():
        for i, t in enumerate(tags):
            if i > UNK:  # <pad>/<space>/<unk> are not hints
                valid.setdefault(t, []).append((s, i))
    out = []
    for n, elem in enumerate(text.split(), 1):
        h = {}
        if elem != '_':
            for part in elem.split('/'):
                where = valid.get(part)
                if where is None:
                    fail(f"hint {n}: unknown tag '{part}' (valid: {' '.join(valid)}, or _ for none)")
                if len(where) > 1:
                    fail(f"hint {n}: tag '{part}' is ambiguous (streams {', '.join(s for s, _ in where)})")
                s, i = where[0]
                if s in h:
                    fail(f"hint {n}: two tags for stream '{s}' in '{elem}'")
                h[s] = i
        out.append(h)
    return out


# -----------------------------------------------------------------------------
# generation

def pick(logits, temperature, top_k, generator=None):
    """Next token from the last position's logits. Greedy (temperature 0 or top_k 1) is the argmax,
    the lowest id on ties, and draws no random numbers; otherwise softmax(logits / temperature)
    over the top_k tokens."""
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    # shifted so the largest logit is 0, in float64: any positive temperature (1e-300 too) gives
    # finite or -inf values, never inf - inf = nan, and tends to greedy as it tends to 0
    logits = (logits.double() - logits.max()) / temperature
    if top_k and top_k < logits.numel():
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[-1], -float('inf'))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


def pick_tag(probs, temperature, generator=None):
    """A tag from a tag head's distribution: the argmax at temperature 0 (no random numbers drawn),
    else a draw from probs ** (1 / temperature), renormalised."""
    if temperature == 0:
        return int(torch.argmax(probs))
    logp = torch.log(probs.double().clamp_min(1e-300)) / temperature
    return int(torch.multinomial(F.softmax(logp - logp.max(), dim=-1).float(), 1, generator=generator))


class Generation:
    """The state of one generate() call (batch of one): the tokens so far, the tags fed at each position
    (meta), for meta_predict models the next tags injected there (nxt), and what generate returns."""

    def __init__(self, model, prompt, hints, tagger, tag_temp, generator, ctx):
        cfg = model.config
        self.model, self.dev, self.ctx, self.tagger = model, model.lm_head.weight.device, ctx, tagger
        self.streams, self.shift, self.predict = cfg.input_streams, cfg.meta_shift, cfg.meta_predict
        self.hints, self.tag_temp, self.generator = hints or [], tag_temp, generator
        self.tokens, self.n_prompt = list(prompt), len(prompt)
        assert self.tokens, "the prompt must hold at least one token"
        self.causal = {}
        self.annotate(self.tokens)
        self.meta = {s: [] for s in self.streams}   # tags fed at each position (the model's input)
        self.nxt = {s: [] for s in self.streams}    # meta_predict: next-token tags injected at each position
        self.given = {s: [] for s in self.streams}
        self.source, self.head = [], []
        if self.streams and tagger is None:
            raise ValueError("a model with metadata streams needs a tagger")
        for s in self.streams:
            c = self.causal[base_stream(s)]
            if self.shift == 0:   # position t: causal tags of token t (meta_predict: also the next tags of the prompt)
                self.meta[s] = list(c)
                self.nxt[s] = list(c[1:])
            else:                 # position t: causal tags of prompt token t+1; the last one: hint 1
                self.meta[s] = list(c[1:]) + [self.hinted(1)[0][s]]

    def annotate(self, new):
        if self.tagger is None:
            return
        for k, v in self.tagger.extend(new).items():
            self.causal.setdefault(k, []).extend(int(x) for x in v)

    def hint(self, i):
        return self.hints[i - 1] if i <= len(self.hints) else {}

    def hinted(self, i):
        """Metadata fed for generated token i (1-based) under LIME+1: the hint, else <unk>."""
        h = self.hint(i)
        return {s: h.get(s, UNK) for s in self.streams}, 'hinted' if h else 'unk'

    def choose(self, lo, hi, tag_logits):
        """forward_predict's choose (meta_predict): the next generated token's tags, from its hint and the
        heads' last position; returns the next tags of positions lo..hi-1, the new ones last."""
        h, top = self.hint(len(self.tokens) - self.n_prompt + 1), {}
        for s, tl in zip(self.streams, tag_logits):
            probs = F.softmax(tl[0, -1].float(), dim=-1)
            p, t = torch.max(probs, dim=-1)
            top[s] = (int(t), float(p))
            self.nxt[s].append(h[s] if s in h else pick_tag(probs, self.tag_temp, self.generator))
        self.head.append(top)
        self.source.append('hinted' if len(h) == len(self.streams) else 'hinted+predicted' if h else 'predicted')
        return {s: torch.tensor([self.nxt[s][lo:hi]], dtype=torch.long, device=self.dev) for s in self.streams}

    def logits(self, lo, hi, start_pos, cache):
        """The next token's logits: tokens[lo:hi] fed at positions start_pos.. (earlier ones from cache)."""
        idx = torch.tensor([self.tokens[lo:hi]], dtype=torch.long, device=self.dev)
        m = {s: torch.tensor([self.meta[s][lo:hi]], dtype=torch.long, device=self.dev) for s in self.streams}
        with self.ctx:
            if self.predict:
                logits = self.model.forward_predict(idx, m, kv_cache=cache, start_pos=start_pos,
                                                    choose=partial(self.choose, lo, hi))[0]
            else:
                logits, _ = self.model(idx, m, kv_cache=cache, start_pos=start_pos)
        return logits[0, -1]

    def append(self, tok, i, tag_generated):
        """tok is generated token i (1-based): tag it where needed, and record the tags fed with it."""
        self.tokens.append(tok)
        if (self.shift == 0 and not self.predict) or tag_generated:
            self.annotate([tok])
        if not self.streams:
            return
        if self.predict:      # the tags picked for the new token are its own tags from now on
            m = given = {s: self.nxt[s][-1] for s in self.streams}
        elif self.shift == 0:
            m = given = {s: self.causal[base_stream(s)][-1] for s in self.streams}
            self.source.append('online')
        else:                 # the new token's own tags were fed one position earlier; feed the next hint now
            given = {s: self.meta[s][-1] for s in self.streams}
            self.source.append(self.hinted(i)[1])
            m, _ = self.hinted(i + 1)
        for s in self.streams:
            self.given[s].append(given[s])
            self.meta[s].append(m[s])


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, tagger=None,
             hints=None, ctx=nullcontext(), generator=None, cache_dtype=None, tag_generated=True,
             meta_temperature=None, stop=None):
    """Generate max_new_tokens after the token ids prompt (batch of one).
    tagger: an object with extend(ids) -> {base stream: tag ids of those tokens} (metadata.CausalStream,
    or a fake in tests); needed for models with metadata. hints: LIME+1 and meta_predict models, one
    dict {stream: tag id} per generated token (a stream left out: <unk> for LIME+1, the head's own
    choice for meta_predict). meta_predict models pick each next token's tags before the token:
    the hint where there is one, else a draw from the tag head at meta_temperature (None: the
    token temperature; 0: argmax); the tags picked for a token are also its own tags at the next
    position (the model samples (tags, text) jointly, as it was trained to predict them).
    Returns a dict: tokens (prompt + new), meta {stream: tag id per position, as fed}, given {stream:
    tag ids of each new token, as fed} and source (per new token: 'online', 'hinted', 'unk',
    'predicted', or 'hinted+predicted' when only some streams were hinted), head (meta_predict: per
    new token {stream: (top tag id, its probability)} of the head's distribution), causal {base
    stream: causal tags of every token} (when a tagger is given; for LIME+1 and meta_predict the
    generated tokens are tagged only if tag_generated, since generation itself never needs them).
    stop: called with the new token ids after each one; generation ends early when it returns True
    (harness.py: stop strings)."""
    tag_temp = temperature if meta_temperature is None else meta_temperature
    if temperature == 0 or top_k == 1:
        tag_temp = 0 if meta_temperature is None else tag_temp  # greedy tokens, greedy tags
    g = Generation(model, prompt, hints, tagger, tag_temp, generator, ctx)
    bs = model.config.block_size
    # With the cache, each new token costs one position. Cached keys carry their positions (gpt2's
    # absolute embeddings; gemma's keys are rotated before caching), so they cannot slide: once
    # the context holds block_size tokens, the cache is refilled from the
    # last block_size tokens, which is exactly what the uncached path computes (so both agree, and
    # past block_size every token costs a full window either way).
    cache = model.new_kv_cache(1, dtype=cache_dtype) if use_cache else None
    cache_lo, cached = 0, 0  # the cache holds tokens[cache_lo:cache_lo + cached] at positions 0..cached-1
    for i in range(1, max_new_tokens + 1):
        n = len(g.tokens)
        lo = max(0, n - bs)
        if cache is None:
            logits = g.logits(lo, n, 0, None)
        elif cached and lo == cache_lo and n - lo == cached + 1:
            logits = g.logits(n - 1, n, cached, cache)  # one new position
            cached += 1
        else:
            logits = g.logits(lo, n, 0, cache)  # (re)fill from the window's start
            cache_lo, cached = lo, n - lo
        g.append(pick(logits, temperature, top_k, generator), i, tag_generated)
        if stop is not None and stop(g.tokens[len(prompt):]):
            break
    return dict(tokens=g.tokens, meta=g.meta, given=g.given, source=g.source, head=g.head, causal=g.causal)


# -----------------------------------------------------------------------------

def utf8_text(option, text):
    """text as given on the command line (or in a config file): valid UTF-8, else one line naming option."""
    return common.check_utf8(option, text)


def read_text(option, path):
    """The text of a --start=FILE:path or --hints_file, read as prepare.py reads a .txt document
    (common.read_text: a regular file of at most prepare.py's document size limit, UTF-8 kept as is,
    a BOM dropped), so a prompt file encodes exactly like training text."""
    try:
        return common.read_text(path)
    except common.LimeError as e:
        fail(f"{option}: {e.msg}")


def fmt_tags(vocabs, tags):
    return '/'.join(vocabs[s][t] for s, t in tags.items())


def run(cfg, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    check_config(cfg)
    torch.manual_seed(cfg['seed'])
    dev = cfg['device']
    dtype = common.resolve_dtype(cfg['dtype'], dev)
    ctx = common.autocast(dev, dtype)

    # the prompt and the hints first: a bad file is one line before the checkpoint is loaded
    start, hint_text = cfg['start'], cfg['hints']
    start = read_text('--start', start[5:]) if start.startswith('FILE:') else utf8_text('--start', start)
    hint_text = read_text('--hints_file', cfg['hints_file']) if cfg['hints_file'] else utf8_text('--hints', hint_text)

    model, ckpt = common.load_model(cfg['out_dir'], dev)
    if (ckpt.get('config') or {}).get('meta_classes', 'data') != 'data':
        fail(f"{cfg['out_dir']}: a meta_classes control reads token classes, not tags: score it, do not sample it")
    mcfg = model.config
    streams, shift, predict = mcfg.input_streams, mcfg.meta_shift, mcfg.meta_predict
    dataset = ckpt.get('dataset') or {}
    vocabs = {s: dataset.get('streams', {}).get(s, {}).get('tags') for s in streams}
    for s, v in vocabs.items():
        if v is None:
            fail(f"checkpoint has no tag vocabulary for stream '{s}'")
        if base_stream(s) not in ('pos', 'ner'):
            fail(f"stream '{s}' cannot be computed at generation (only pos/ner, full or causal)")

    # hints: LIME+1 and meta_predict models (whose heads fill in what is not hinted)
    hints = []
    if hint_text.strip():
        if not streams:
            fail("--hints needs a LIME+1 checkpoint; this one is a baseline (no metadata streams)")
        if shift != 1 and not predict:
            fail("--hints needs a LIME+1 checkpoint (meta_shift=1) or a meta_predict one; this LIME "
                 "model computes the metadata of each token itself, after generating it")
        hints = parse_hints(hint_text, {s: vocabs[s] for s in streams})
        if len(hints) > cfg['max_new_tokens']:
            fail(f"{len(hints)} hints for max_new_tokens={cfg['max_new_tokens']}")

    text = Text(dataset)
    for s in streams:
        # the tag vocabulary must be the one metadata.py produces, or its ids would mean other tags
        if text.md.stream_tags(base_stream(s), text.ner) != vocabs[s]:
            fail(f"stream '{s}': the checkpoint's tag vocabulary differs from metadata.py's")
    if any(not is_causal(s) for s in streams):
        print(f"warning: this model was trained on full metadata ({', '.join(streams)}); "
              "generation can only give it causal metadata", file=err)
    if shift == 1 and (ckpt.get('config') or {}).get('meta_dropout', 0.0) == 0 and (
            len(hints) < cfg['max_new_tokens'] or any(len(h) < len(streams) for h in hints)):
        print("note: this model was trained without meta_dropout, so generated positions without a "
              "hint for a stream (<unk>) are out of distribution", file=err)

    prompt = text.encode(start) if start else [text.eot]
    if not prompt:
        prompt = [text.eot]

    if cfg['compile']:
        model = torch.compile(model)  # attribute access (config, new_kv_cache) falls through to the model
    followed = total = matched = predicted = 0
    for k in range(cfg['num_samples']):
        t0 = time.perf_counter()
        r = generate(model, prompt, cfg['max_new_tokens'], cfg['temperature'], cfg['top_k'], cfg['kv_cache'],
                     tagger=text.tagger() if streams else None, hints=hints, ctx=ctx,
                     cache_dtype=common.torch_dtype(dtype) if dev.startswith('cuda') else None, tag_generated=cfg['show_tags'],
                     meta_temperature=None if cfg['meta_temperature'] < 0 else cfg['meta_temperature'])
        dt = time.perf_counter() - t0
        new = r['tokens'][len(prompt):]
        # speed on stderr, so stdout stays the text (online tagging of the prompt included)
        print(f"[{len(new)} tokens in {dt:.2f}s: {len(new) / max(dt, 1e-9):.1f} tokens/s, "
              f"kv_cache={cfg['kv_cache']}]", file=err)
        print(text.decode(r['tokens'] if start else new), file=out)
        if cfg['show_tags'] and streams:
            counts = show_tags(r, new, len(prompt), hints, {s: vocabs[s] for s in streams}, shift, predict, text, out)
            followed, total = followed + counts[0], total + counts[1]
            matched, predicted = matched + counts[2], predicted + counts[3]
        print('---------------', file=out)
    if cfg['show_tags'] and (shift == 1 or predict) and hints:
        print(f"hints followed: {followed}/{total}", file=out)
    if cfg['show_tags'] and predict and predicted:
        print(f"predicted tags matched by what was generated: {matched}/{predicted}", file=out)
    return followed, total


def show_tags(r, new, n_prompt, hints, names, shift, predict, text, out):
    """One line per generated token: the tags it was given and their source; for LIME+1 and
    meta_predict the causal tags of what was generated, with ok/MISS for hinted tokens; for
    meta_predict also the head's top tag and its probability. Returns (hints followed, hinted
    tokens, predicted tags matched, predicted tags)."""
    streams = list(names)
    followed = total = matched = predicted = 0
    print('  #  token                ' + ('head top (p)           ' if predict else '') + 'given (source)        '
          + ('generated (causal)' if shift or predict else ''), file=out)
    for i, tok in enumerate(new):
        line = f"{i + 1:3d}  {text.token_str(tok)!r:20} "
        if predict:
            top = ' '.join(f"{names[s][t]}:{p:.2f}" for s, (t, p) in r['head'][i].items())
            line += f"{top:22} "
        g = fmt_tags(names, {s: r['given'][s][i] for s in streams})
        line += f"{g + ' (' + r['source'][i] + ')':22}"
        if shift == 1 or predict:
            c = {s: r['causal'][base_stream(s)][n_prompt + i] for s in streams}
            line += f" {fmt_tags(names, c)}"
            h = hints[i] if i < len(hints) else {}
            if h:
                ok = all(c[s] == t for s, t in h.items())
                followed += ok
                total += 1
                line += '  ok' if ok else '  MISS'
            if predict:
                own = [s for s in streams if s not in h]
                matched += sum(c[s] == r['given'][s][i] for s in own)
                predicted += len(own)
        print(line, file=out)
    return followed, total, matched, predicted


def main(argv):
    return common.run_main('sample.py', lambda: run(configure(argv)))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
