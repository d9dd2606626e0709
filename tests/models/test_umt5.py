"""umT5 text encoder: parity with the reference fixture, both file layouts, scaled fp8,
full-size key manifests (on meta), and the offline tokenizer."""
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path, load_fixture, max_abs, rel_l2
from turbo_core.io.checkpoint import CheckpointError
from turbo_core.models.tokenizer import (
    TokenizerNotFound,
    clean_prompt,
    load_tokenizer,
    train_tiny_sentencepiece,
)
from turbo_core.models.umt5 import build_encoder, load_text_encoder, relative_position_buckets

BF16_VS_FP32 = 0.017765160759576994  # manifest: umt5_tiny compare.bf16_vs_fp32.rel_l2
COMFY_PREFIX = "text_encoders.umt5xxl.transformer."


# ---------------------------------------------------------------------------
# Helpers

@pytest.fixture(scope="module")
def fx():
    return load_fixture("umt5_tiny.safetensors")


def tiny_weights(fx) -> dict:
    """The fixture's state dict in Wan naming (fresh copies, since loading consumes dicts)."""
    return {k[3:]: v.clone() for k, v in fx.items() if k.startswith("sd.")}


def wan_to_hf(sd: dict, prefix: str = "") -> dict:
    """Wan names -> Hugging Face T5 / ComfyUI names (the README's mapping table)."""
    rules = [
        (r"token_embedding\.", "shared."),
        (r"blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
        (r"blocks\.(\d+)\.pos_embedding\.embedding\.",
         r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
        (r"blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
        (r"blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
        (r"blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
        (r"blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
        (r"blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
        (r"norm\.", "encoder.final_layer_norm."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key, count=1)
                break
        out[prefix + key] = value
    return out


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=200)


def spm_tensor(spm_path) -> torch.Tensor:
    return torch.frombuffer(bytearray(spm_path.read_bytes()), dtype=torch.uint8)


def check_context(out, ref, mask, *, fp32: bool):
    """Tolerances of the fixture README; padded rows exactly 0."""
    lengths = mask.sum(1)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:])), "padded rows must be exactly 0"
    if fp32:
        assert max_abs(out, ref) <= 1e-4 * float(ref.abs().max())
    else:
        assert rel_l2(out, ref) <= 1.5 * BF16_VS_FP32


# ---------------------------------------------------------------------------
# Parity with the reference encoder, both layouts

@pytest.fixture(scope="module")
def tiny_files(fx, spm_path, tmp_path_factory):
    """The tiny weights as a Wan-named file (tokenizer in a folder beside it) and an
    HF/ComfyUI-named, prefixed file that embeds the tokenizer as `spiece_model`."""
    root = tmp_path_factory.mktemp("tiny")
    wan = root / "umt5_tiny_wan.safetensors"
    save_file(tiny_weights(fx), str(wan))
    (root / "umt5-xxl").mkdir()
    (root / "umt5-xxl" / "spiece.model").write_bytes(spm_path.read_bytes())

    hf = root / "comfy" / "umt5_tiny_comfy.safetensors"
    hf.parent.mkdir()
    sd = wan_to_hf(tiny_weights(fx), COMFY_PREFIX)
    sd["spiece_model"] = spm_tensor(spm_path)
    save_file(sd, str(hf))
    return {"wan": wan, "hf": hf}


@pytest.mark.parametrize("layout", ["wan", "hf"])
def test_parity_fp32(fx, tiny_files, layout):
    enc = load_text_encoder(tiny_files[layout], device="cpu", dtype="fp32")
    assert enc.config.num_layers == 2 and enc.config.num_heads == 4 and enc.config.dim_ffn == 128
    ids, mask = fx["in.ids"], fx["in.mask"]

    out = enc.encode_tokens(ids, mask)
    assert out.shape == (2, 160, 64) and out.dtype == torch.float32
    check_context(out, fx["fp32.context"], mask, fp32=True)

    # The raw network over all 160 positions (padded query rows included) matches too.
    with torch.no_grad():
        raw = enc.model(ids, mask)
    assert max_abs(raw, fx["fp32.encoder_out"]) <= 1e-4 * float(fx["fp32.encoder_out"].abs().max())


@pytest.mark.parametrize("layout", ["wan", "hf"])
def test_parity_bf16(fx, tiny_files, layout):
    enc = load_text_encoder(tiny_files[layout], device="cpu")  # default dtype: bf16, on CPU
    assert enc.dtype == torch.bfloat16
    out = enc.encode_tokens(fx["in.ids"], fx["in.mask"])
    assert out.dtype == torch.bfloat16
    check_context(out, fx["bf16.context"], fx["in.mask"], fp32=False)
    check_context(out, fx["fp32.context"], fx["in.mask"], fp32=False)


def test_relative_position_buckets():
    b = relative_position_buckets(300, 32, 128)
    assert b[0, 0] == 0 and b[0, 1] == 17 and b[1, 0] == 1  # keys after the query use the upper half
    assert b[0, 7] == 16 + 7 and b[0, 8] > 16 + 7           # exact up to 7, log-spaced after
    assert b[0, 299] == 31 and b[299, 0] == 15              # clamped beyond max_distance
    assert int(b.max()) == 31 and int(b.min()) == 0


# ---------------------------------------------------------------------------
# ComfyUI scaled fp8

@pytest.mark.parametrize("scale_key", ["scale_weight", "weight_scale"])
def test_scaled_fp8(fx, spm_path, tmp_path, scale_key):
    wan = tiny_weights(fx)
    quant, dequant = {}, {}
    for key, w in wan.items():
        if w.ndim == 2 and "pos_embedding" not in key and "token_embedding" not in key:
            scale = w.abs().max().float() / 448.0  # per-tensor, e4m3 max
            q = (w / scale).to(torch.float8_e4m3fn)
            quant[key] = q
            quant[key[: -len("weight")] + scale_key] = scale.reshape(1)
            dequant[key] = q.float() * scale
        else:
            quant[key] = dequant[key] = w
    quant = wan_to_hf(quant, COMFY_PREFIX)
    quant["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    quant[COMFY_PREFIX + "encoder.block.0.layer.0.SelfAttention.q.scale_input"] = torch.ones(1)
    quant["spiece_model"] = spm_tensor(spm_path)
    save_file(quant, str(tmp_path / "umt5_fp8_scaled.safetensors"))
    save_file(dequant, str(tmp_path / "umt5_dequant.safetensors"))

    got = load_text_encoder(tmp_path / "umt5_fp8_scaled.safetensors", device="cpu", dtype="fp32")
    ref = load_text_encoder(tmp_path / "umt5_dequant.safetensors", tokenizer=spm_path, device="cpu", dtype="fp32")
    assert got.model.blocks[0].attn.q.weight.dtype == torch.float32
    ids, mask = fx["in.ids"], fx["in.mask"]
    a, b = got.encode_tokens(ids, mask), ref.encode_tokens(ids, mask)
    assert max_abs(a, b) <= 1e-5 * float(b.abs().max())
    # fp8 really changed the weights (the test would pass trivially otherwise)
    assert rel_l2(a, fx["fp32.context"]) > 1e-3


# ---------------------------------------------------------------------------
# Full-size key manifests, on the meta device (no memory)

def meta_state_dict(manifest: str, prefix: str = "") -> dict:
    spec = json.loads(fixture_path(f"keys/{manifest}").read_text())
    return {prefix + k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for k, (shape, dtype) in spec.items()}


@pytest.mark.parametrize("manifest,prefix", [
    ("td_umt5_xxl_enc.json", ""),
    ("comfy_umt5_xxl.json", ""),
    ("comfy_umt5_xxl.json", COMFY_PREFIX),
])
def test_full_size_manifest(manifest, prefix):
    sd = meta_state_dict(manifest, prefix)
    n_keys = len(sd)
    sd[prefix + "spiece_model"] = torch.empty(100, dtype=torch.uint8, device="meta")
    model = build_encoder(sd, device="meta", dtype="bf16", name=manifest)  # strict: raises on any mismatch
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.num_heads, cfg.head_dim, cfg.dim_ffn, cfg.num_layers, cfg.num_buckets) == \
        (256384, 4096, 64, 64, 10240, 24, 32)
    assert len(model.state_dict()) == n_keys
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_embed_tokens_alias():
    sd = meta_state_dict("comfy_umt5_xxl.json", "model.")
    sd["model.encoder.embed_tokens.weight"] = sd.pop("model.shared.weight")
    assert build_encoder(sd, device="meta").config.vocab_size == 256384


def test_refuses_other_models(tmp_path):
    dit = {"head.modulation": torch.zeros(1, 2, 8), "patch_embedding.weight": torch.zeros(8, 64),
           "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}
    save_file(dit, str(tmp_path / "wan_dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"Wan diffusion model.*load_dit"):
        load_text_encoder(tmp_path / "wan_dit.safetensors", device="cpu")

    # T5 v1.1 (Flux/SD3's t5xxl) shares one position bias: refused by name.
    t5 = meta_state_dict("comfy_umt5_xxl.json")
    for key in [k for k in t5 if "relative_attention_bias" in k and ".block.0." not in k]:
        del t5[key]
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        build_encoder(t5, device="meta")


# ---------------------------------------------------------------------------
# Tokenizer: where it comes from

def test_tokenizer_embedded(tiny_files):
    enc = load_text_encoder(tiny_files["hf"], device="cpu", dtype="fp32")
    assert enc.tokenizer.source == "embedded spiece_model"
    assert (enc.tokenizer.eos_id, enc.tokenizer.pad_id) == (1, 0)


def test_tokenizer_beside_file(tiny_files):
    enc = load_text_encoder(tiny_files["wan"], device="cpu", dtype="fp32")
    assert Path(enc.tokenizer.source).parent.name == "umt5-xxl"


def test_wan_pth_file(fx, spm_path, tmp_path):
    """The official file is a .pth (torch.save of the Wan-named dict)."""
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.bfloat16() for k, v in tiny_weights(fx).items()}, path)
    enc = load_text_encoder(path, tokenizer=spm_path, device="cpu", dtype="bf16")
    check_context(enc.encode_tokens(fx["in.ids"], fx["in.mask"]), fx["bf16.context"], fx["in.mask"], fp32=False)


def test_tokenizer_in_text_encoders_up_the_tree(fx, spm_path, tmp_path):
    models = tmp_path / "models"
    (models / "text_encoders" / "google" / "umt5-xxl").mkdir(parents=True)
    (models / "text_encoders" / "google" / "umt5-xxl" / "spiece.model").write_bytes(spm_path.read_bytes())
    (models / "clip").mkdir()
    path = models / "clip" / "umt5.safetensors"
    save_file(tiny_weights(fx), str(path))
    enc = load_text_encoder(path, device="cpu", dtype="fp32")
    assert "text_encoders" in enc.tokenizer.source


def test_tokenizer_explicit(fx, spm_path, tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file(tiny_weights(fx), str(path))
    by_file = load_text_encoder(path, tokenizer=spm_path, device="cpu", dtype="fp32")
    by_dir = load_text_encoder(path, tokenizer=spm_path.parent, device="cpu", dtype="fp32")
    assert by_file.tokenizer.source == by_dir.tokenizer.source == str(spm_path)
    with pytest.raises(TokenizerNotFound, match="does not exist"):
        load_text_encoder(path, tokenizer=tmp_path / "nope.model", device="cpu")


def test_tokenizer_json(spm_path, tmp_path):
    """A tokenizer.json (HF fast tokenizer) gives the same ids as the SentencePiece model."""
    tokenizers = pytest.importorskip("tokenizers")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))

    tok = load_tokenizer(tokenizer=tmp_path / "tokenizer.json")
    ref = load_tokenizer(tokenizer=spm_path)
    prompt = "a small cat sleeps on a wooden windowsill"
    ids, mask = tok(prompt)
    assert torch.equal(ids, ref(prompt)[0])
    assert int(mask.sum()) == len(sp.encode(prompt)) + 1  # exactly one </s>


def test_tokenizer_missing(fx, tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file(tiny_weights(fx), str(path))
    with pytest.raises(TokenizerNotFound) as err:
        load_text_encoder(path, device="cpu")
    msg = str(err.value)
    assert isinstance(err.value, CheckpointError)
    for part in ("spiece.model", "google/umt5-xxl", str(tmp_path / "umt5-xxl"),
                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "spiece_model"):
        assert part in msg, part


# ---------------------------------------------------------------------------
# Tokenizer: what it produces

def test_clean_prompt():
    assert clean_prompt("  A &amp;lt;b&amp;gt; cat\n\t on   a\u3000mat  ") == "A <b> cat on a mat"
    assert clean_prompt("caf\u00c3\u00a9 &quot;ok&quot;") == 'caf\u00e9 "ok"'  # ftfy repairs mojibake


def test_tokenize_eos_pad_and_clean(spm_path):
    tok = load_tokenizer(tokenizer=spm_path)
    ids, mask = tok(["a cat", "  a   cat &amp; a dog "])
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == torch.long
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert (ids[0, : n - 1] != 1).all()  # one </s>, last; no BOS
    assert torch.equal(ids[1, : int(mask[1].sum())], tok("a cat & a dog")[0][0, : int(mask[1].sum())])


def test_truncation_warns(spm_path):
    tok = load_tokenizer(tokenizer=spm_path)
    prompt = "a red fox runs across a snowy field " * 100
    total = len(tok.encode_text(prompt)) + 1
    assert total > 512
    with pytest.warns(UserWarning, match=rf"{total} tokens"):
        ids, mask = tok([prompt, "a cat"])
    assert mask[0].all() and ids[0, -1] == 1 and ids[0, -2] != 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a cat"])  # short prompts do not warn


def test_encode_prompts(tiny_files):
    enc = load_text_encoder(tiny_files["hf"], device="cpu", dtype="fp32")
    assert enc.text_len == 512 and enc.device == torch.device("cpu")
    ctx = enc.encode(["a cat", "a dog on a skateboard"])
    assert ctx.shape == (2, 512, 64) and ctx.dtype == torch.float32
    _, mask = enc.tokenize(["a cat", "a dog on a skateboard"])
    for b, n in enumerate(mask.sum(1).tolist()):
        assert (ctx[b, :n].abs().sum(-1) > 0).all()
        assert (ctx[b, n:] == 0).all()
    # Running only the used columns gives the same rows as the full 512.
    ids, mask = enc.tokenize(["a dog on a skateboard"])
    with torch.no_grad():
        full = enc.model(ids, mask)
    n = int(mask.sum())
    assert max_abs(ctx[1, :n], full[0, :n]) <= 1e-5 * float(full[0, :n].abs().max())
