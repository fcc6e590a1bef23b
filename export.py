"""
Export a train.py checkpoint as a Hugging Face transformers model directory, loadable with no
custom code: GPT2LMHeadModel for arch='gpt2', GemmaForCausalLM for arch='gemma'.

$ python export.py --out_dir=out-cpu-demo --hf_dir=hf-cpu-demo

Written: config.json, model.safetensors (float32, as trained), generation_config.json, the
tokenizer (GPT-2's byte-level BPE, rebuilt offline from tiktoken's ranks; gpt2-N: its first N
ranks) and lime_export.json (where it came from; it also marks the directory as ours for
--overwrite). A model that reads metadata tags at every position is refused: transformers has
no input for them. A LIME run trained with --meta_cooldown>0 ends without tags and exports.
transformers and safetensors are optional (requirements-dev.txt), imported only here.
"""

import json
import os
import shutil
import sys

import torch

import common
from common import fail

# -----------------------------------------------------------------------------
out_dir = 'out'  # a train.py run directory (its ckpt.pt), or a checkpoint file
hf_dir = ''  # the directory to write (it must not exist, be empty, or be an earlier export with overwrite)
overwrite = False  # replace hf_dir if it holds an earlier export of ours (and nothing else)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
MARKER = 'lime_export.json'
# what an export writes (tokenizer files: whatever the tokenizer's save_pretrained writes, listed there)
FILES = {'config.json', 'model.safetensors', 'generation_config.json', MARKER,
         'vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
         'added_tokens.json', 'chat_template.jinja'}


def hf_modules():
    try:
        import safetensors.torch
        import transformers
    except ImportError as e:
        fail(f"the export needs transformers and safetensors ({e.name or e} is missing): "
             "pip install transformers==5.25.0 safetensors==0.8.0 (pinned in requirements-dev.txt)")
    return transformers, safetensors.torch


# -----------------------------------------------------------------------------
# weights: our names -> transformers' names

def gpt2_weights(sd, cfg):
    """GPT2LMHeadModel's state dict. Its Conv1D layers store (in, out): our Linear weights transposed.
    bias=False has no exact place there (GPT-2 always has biases), so zero biases are written:
    the same function."""
    out = {}

    def put(name, w, b=None, linear=False):
        out[name + '.weight'] = w.t() if linear else w
        out[name + '.bias'] = b if b is not None else torch.zeros(w.shape[0] if linear else w.shape[-1])

    out['transformer.wte.weight'] = sd['transformer.wte.weight']  # lm_head is tied to it
    out['transformer.wpe.weight'] = sd['transformer.wpe.weight']
    for i in range(cfg.n_layer):
        p = f'transformer.h.{i}.'
        for n in ('ln_1', 'ln_2'):
            put(p + n, sd[p + n + '.weight'], sd.get(p + n + '.bias'))
        for n in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'):
            put(p + n, sd[p + n + '.weight'], sd.get(p + n + '.bias'), linear=True)
    put('transformer.ln_f', sd['transformer.ln_f.weight'], sd.get('transformer.ln_f.bias'))
    return out


def gemma_weights(sd, cfg):
    """GemmaForCausalLM's state dict: our fused c_attn (queries, keys, values) and c_fc (gate, up)
    split into their projections. The norms store the same w as ours (both scale by 1 + w)."""
    hs = cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head * hs
    out = {'model.embed_tokens.weight': sd['transformer.wte.weight'], 'model.norm.weight': sd['transformer.ln_f.weight']}
    for i in range(cfg.n_layer):
        p, q = f'transformer.h.{i}.', f'model.layers.{i}.'
        out[q + 'input_layernorm.weight'] = sd[p + 'ln_1.weight']
        out[q + 'post_attention_layernorm.weight'] = sd[p + 'ln_2.weight']
        wq, wk, wv = sd[p + 'attn.c_attn.weight'].split([cfg.n_embd, kv, kv])
        out[q + 'self_attn.q_proj.weight'], out[q + 'self_attn.k_proj.weight'], out[q + 'self_attn.v_proj.weight'] = wq, wk, wv
        out[q + 'self_attn.o_proj.weight'] = sd[p + 'attn.c_proj.weight']
        gate, up = sd[p + 'mlp.c_fc.weight'].chunk(2)
        out[q + 'mlp.gate_proj.weight'], out[q + 'mlp.up_proj.weight'] = gate, up
        out[q + 'mlp.down_proj.weight'] = sd[p + 'mlp.c_proj.weight']
    return out


def hf_config(transformers, cfg, eot):
    """The transformers config of our GPTConfig; eot (or None) is bos, eos and pad, as in GPT-2."""
    ids = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    if cfg.arch == 'gpt2':
        # activation 'gelu' is the exact erf GELU of ours (GPT-2's own default is the tanh one)
        c = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                                    activation_function='gelu', resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                                    attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5, tie_word_embeddings=True, **ids)
        c.architectures = ['GPT2LMHeadModel']
    else:
        c = transformers.GemmaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                     intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                     head_dim=cfg.n_embd // cfg.n_head, hidden_act='gelu_pytorch_tanh',
                                     max_position_embeddings=cfg.block_size, rms_norm_eps=1e-6,
                                     rope_parameters=dict(rope_type='default', rope_theta=10000.0),
                                     attention_bias=False, attention_dropout=cfg.dropout,
                                     tie_word_embeddings=True, **ids)
        c.architectures = ['GemmaForCausalLM']
    c.dtype = 'float32'
    return c


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's byte-level BPE from tiktoken's ranks

def byte_chars():
    """GPT-2's printable stand-in character of every byte (the alphabet of vocab.json and merges.txt)."""
    keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + i for i in range(len(extra))])}


def bpe_parts(ranks, token, max_rank):
    """token (bytes) split by BPE with only the merges of rank < max_rank: for a token of rank r,
    the two tokens whose merge made it (the merge that merges.txt lists at line r - 256)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not pairs or min(pairs)[0] >= max_rank:
            break
        i = min(pairs)[1]  # the lowest-ranked merge first, as BPE does
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def vocab_and_merges(enc):
    """GPT-2's vocab.json (token text -> id) and merges (rank order) of tiktoken encoding enc
    (GPT-2's, or its first N ranks), written in GPT-2's printable stand-ins for bytes."""
    ranks = enc._mergeable_ranks
    ch = byte_chars()
    text = lambda b: ''.join(ch[x] for x in b)
    vocab = {text(t): r for t, r in ranks.items()}
    vocab.update(enc._special_tokens)
    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) == 1:
            continue
        # BPE's last two parts are tokens of lower rank: where only one split gives two such, it is that one
        cuts = [i for i in range(1, len(t)) if ranks.get(t[:i], r) < r and ranks.get(t[i:], r) < r]
        parts = [t[:cuts[0]], t[cuts[0]:]] if len(cuts) == 1 else bpe_parts(ranks, t, r)
        if len(parts) != 2:
            fail(f"tokenizer {enc.name}: token {r} is not one merge of two tokens")
        merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def save_tokenizer(transformers, dataset, d, max_len):
    """The dataset's tokenizer (meta.json's 'tokenizer': gpt2 or gpt2-N) as transformers' GPT-2
    tokenizer in d; returns its <|endoftext|> id, or None when the tokenizer is not one of ours (then
    no tokenizer is written: the model still takes token ids)."""
    import metadata as md
    try:
        md.set_tokenizer(dataset.get('tokenizer', 'gpt2'))
        enc = md.encoding()
    except md.MetadataError:
        return None
    vocab, merges = vocab_and_merges(enc)
    eot = '<|endoftext|>'
    tok = transformers.GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=eot, eos_token=eot, unk_token=eot,
                                     add_prefix_space=False, model_max_length=max_len)
    tok.save_pretrained(d)
    return enc.eot_token


# -----------------------------------------------------------------------------

def check_exportable(path, cfg):
    if cfg.meta_predict:
        fail(f"{path}: a meta_predict model predicts and reads tags between its blocks; "
             "transformers' models have no place for that")
    if cfg.meta_streams and cfg.meta_cooled is not True:
        fail(f"{path}: this model reads metadata tags ({', '.join(cfg.meta_streams)}) at every position, "
             "which a transformers model cannot be given; train it with a metadata cooldown "
             "(train.py --meta_cooldown=0.1) so that it ends without tags, and export that")


def check_target(d, overwrite):
    """d may not exist, be empty, or (overwrite) hold an earlier export of ours and nothing else:
    nobody else's files are ever replaced."""
    if not os.path.lexists(d):
        return
    if not os.path.isdir(d) or os.path.islink(d):
        fail(f"{d}: exists and is not a directory")
    names = set(os.listdir(d))
    if not names:
        return
    ours = MARKER in names and names <= FILES
    if not ours:
        fail(f"{d}: exists and is not empty, and is not an earlier export of ours (it lacks {MARKER} "
             "or holds other files); choose another --hf_dir")
    if not overwrite:
        fail(f"{d}: holds an earlier export; replace it with --overwrite=True, or choose another --hf_dir")


def export(src, d, overwrite=False):
    """Write the transformers directory d for the checkpoint src (a run directory's ckpt.pt, or a
    checkpoint file): into a temporary directory beside d, renamed to d at the end (a reader never
    sees half an export)."""
    ckpt_path = common.checkpoint_path(src)
    model, ckpt = common.load_model(src)
    del ckpt['model']  # the model holds the weights now: one copy less in memory
    cfg = model.config
    check_exportable(ckpt_path, cfg)
    d = os.path.normpath(d)
    check_target(d, overwrite)
    transformers, st = hf_modules()  # after the checks above: a mistake there is named without the slow import
    tmp = f"{d}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        sd = {k: v.detach().float() for k, v in model.state_dict().items()}  # the metadata tables are left out
        weights = (gpt2_weights if cfg.arch == 'gpt2' else gemma_weights)(sd, cfg)
        # each tensor its own copy: safetensors refuses views into one storage (the split projections)
        st.save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in weights.items()},
                     os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
        eot = save_tokenizer(transformers, ckpt['dataset'], tmp, cfg.block_size)
        hf_config(transformers, cfg, eot).save_pretrained(tmp)
        # generate() stops at <|endoftext|>. No max_length: a caller's max_new_tokens would then draw a
        # warning on every call; the position limit is in config.json (n_positions, max_position_embeddings)
        transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(tmp)
        info = dict(source=os.path.abspath(ckpt_path), iter_num=ckpt.get('iter_num'), arch=cfg.arch,
                    tokenizer=ckpt['dataset'].get('tokenizer') if eot is not None else None,
                    tokenization=ckpt['dataset'].get('tokenization'),
                    meta_streams=list(cfg.meta_streams), meta_cooled=bool(cfg.meta_streams),
                    zero_biases=cfg.arch == 'gpt2' and not cfg.bias)
        with open(os.path.join(tmp, MARKER), 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=2)
        extra = set(os.listdir(tmp)) - FILES
        assert not extra, f"export wrote files --overwrite would not recognise: {extra}"
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), 'rb') as f:
                os.fsync(f.fileno())
        place(tmp, d)
    except OSError as e:
        fail(f"{d}: cannot write ({e.strerror or common.first_line(e)})")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return info


def place(tmp, d):
    """Rename tmp to d. An earlier export of ours at d (checked by check_target) is moved aside
    first and removed only once the new one is in place; an empty directory is simply replaced."""
    old = None
    if os.path.isdir(d) and os.listdir(d):
        old = f"{d}.old-{os.getpid()}"
        os.rename(d, old)
    os.replace(tmp, d)  # replaces an empty directory too
    common.fsync_dir(os.path.dirname(d) or '.')
    if old:
        shutil.rmtree(old)


def main(argv):
    return common.run_main('export.py', run, argv)


def run(argv):
    cfg = common.configure(argv, DEFAULTS)[0]
    common.check_range(cfg, 'hf_dir', cfg['hf_dir'].strip() != '', 'a directory name')
    common.check_range(cfg, 'out_dir', cfg['out_dir'].strip() != '', 'a directory name')
    info = export(cfg['out_dir'], cfg['hf_dir'], cfg['overwrite'])
    print(f"wrote {cfg['hf_dir']}: {info['arch']} model"
          + (f", {info['tokenizer']} tokenizer" if info['tokenizer'] else ", no tokenizer (the dataset's is not GPT-2's)"))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
