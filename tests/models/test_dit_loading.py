"""Every DiT checkpoint layout, written as real files and loaded through load_dit."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, fixture_path
from turbo_core import CheckpointError, load_dit
from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.quant.int8 import dequantize_int8
from turbo_core.tiny import comfy_state_dict, quantize_state_dict, tiny_dit_state_dict

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8, "float16": torch.float16}


# ---------------------------------------------------------------------------
# full-size key manifests (meta tensors: the real code path, no memory)

MANIFESTS = {
    "td_wan2.1_t2v_1.3B_sla": ("Wan2.1-T2V-1.3B", "TurboWan (SLA)"),
    "td_wan2.1_t2v_1.3B_sla_quant": ("Wan2.1-T2V-1.3B", "TurboWan -quant"),
    "td_wan2.1_t2v_14B_sla": ("Wan2.1-T2V-14B", "TurboWan (SLA)"),
    "td_wan2.1_t2v_14B_sla_quant": ("Wan2.1-T2V-14B", "TurboWan -quant"),
    "td_wan2.2_i2v_A14B_sla": ("Wan2.2-I2V-A14B", "TurboWan (SLA)"),
    "td_wan2.2_i2v_A14B_sla_quant": ("Wan2.2-I2V-A14B", "TurboWan -quant"),
    "comfy_wan2.1_t2v_1.3B": ("Wan2.1-T2V-1.3B", "Wan/ComfyUI"),
    "comfy_wan2.1_t2v_14B": ("Wan2.1-T2V-14B", "Wan/ComfyUI"),
    "comfy_wan2.2_i2v_A14B": ("Wan2.2-I2V-A14B", "Wan/ComfyUI"),
}


@pytest.mark.parametrize("name", MANIFESTS)
def test_full_size_manifest_is_recognised(name):
    keys = json.loads(fixture_path(f"keys/{name}.json").read_text())
    sd = {k: torch.empty(shape, dtype=DTYPES[dt], device="meta") for k, (shape, dt) in keys.items()}
    model = dit_from_state_dict(sd, device="meta", dtype=torch.bfloat16, source=name)
    report = model.load_report
    variant, layout = MANIFESTS[name]
    assert report.variant == variant and report.layout.startswith(layout)
    assert report.unexpected == [] and report.missing == [] and report.mismatched == []
    assert report.loaded == len(keys)
    layers = model.config.num_layers
    if name.startswith("comfy"):  # the one thing this layout never carries, reported as such
        assert len(report.absent_by_layout) == 2 * layers
        assert any("no SLA proj_l" in n for n in report.notes)
    else:
        assert report.absent_by_layout == []
    if name.endswith("quant"):
        assert model.blocks[0].self_attn.q.int8_weight.dtype == torch.int8


# ---------------------------------------------------------------------------
# the same tiny weights in every layout give the same output

@pytest.fixture(scope="module")
def tiny():
    sd = tiny_dit_state_dict(seed=3, text_dim=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 12, generator=g)
    ctx = torch.randn(1, 24, 64, generator=g)
    return sd, (x, torch.tensor([932.0]), ctx)


def run(model, args, attention="sla"):
    return model(*args, attention=attention, sla_topk=0.5)


def test_round_trip_every_layout(tiny, tmp_path):
    sd, args = tiny
    ref = run(dit_from_state_dict(sd, device="cpu", dtype=torch.float32), args)
    ref_dense = run(dit_from_state_dict(sd, device="cpu", dtype=torch.float32), args, "original")

    torch.save(sd, tmp_path / "TurboWan.pth")
    wrapped = {k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    save_file(comfy_state_dict(sd), str(tmp_path / "comfy.safetensors"))

    for name in ("TurboWan.pth", "wrapped.pth"):
        model = load_dit(tmp_path / name, device="cpu", dtype="fp32")
        assert model.load_report.ok, model.load_report
        assert torch.equal(run(model, args), ref), name

    comfy = load_dit(tmp_path / "comfy.safetensors", device="cpu", dtype="fp32")
    assert comfy.load_report.ok and comfy.load_report.absent_by_layout
    assert any("Conv3d" in c for c in comfy.load_report.converted)
    assert torch.equal(run(comfy, args, "original"), ref_dense)

    out = subprocess.run([sys.executable, "-m", "turbo_core", "convert", str(tmp_path / "TurboWan.pth"),
                          str(tmp_path / "converted.safetensors")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    converted = load_dit(tmp_path / "converted.safetensors", device="cpu", dtype="fp32")
    assert converted.load_report.layout.startswith("TurboWan (SLA)")
    assert torch.equal(run(converted, args), ref)


def test_quant_layout_equals_dequantized_weights(tiny, tmp_path):
    sd, args = tiny
    qsd = quantize_state_dict(sd)
    torch.save(qsd, tmp_path / "TurboWan-quant.pth")
    dense = {k: v for k, v in qsd.items() if not k.endswith((".int8_weight", ".scale"))}
    for key in [k for k in qsd if k.endswith(".int8_weight")]:
        dense[key[: -len("int8_weight")] + "weight"] = dequantize_int8(qsd[key], qsd[key[:-11] + "scale"])
    quant = load_dit(tmp_path / "TurboWan-quant.pth", device="cpu", dtype="fp32", linear="dequant")
    assert quant.load_report.layout.startswith("TurboWan -quant") and quant.load_report.ok
    assert torch.equal(run(quant, args), run(dit_from_state_dict(dense, device="cpu", dtype="fp32"), args))

    # int8 survives conversion to safetensors
    subprocess.run([sys.executable, "-m", "turbo_core", "convert", str(tmp_path / "TurboWan-quant.pth"),
                    str(tmp_path / "q.safetensors")], cwd=REPO, check=True, capture_output=True)
    again = load_dit(tmp_path / "q.safetensors", device="cpu", dtype="fp32", linear="dequant")
    assert again.blocks[1].ffn[2].int8_weight.dtype == torch.int8
    assert torch.equal(run(again, args), run(quant, args))


def test_bf16_model_close_to_fp32(tiny):
    sd, args = tiny
    fp32 = run(dit_from_state_dict(sd, device="cpu", dtype="fp32"), args)
    bf16 = run(dit_from_state_dict(sd, device="cpu", dtype="bf16"), args)
    assert bf16.dtype == torch.float32
    assert float((bf16 - fp32).norm() / fp32.norm()) < 2e-2


def test_partial_checkpoint_loads_and_reports(tiny):
    sd, args = tiny
    partial = dict(sd)
    del partial["blocks.1.cross_attn.o.bias"]
    partial["blocks.0.ffn.2.bias"] = torch.zeros(7)
    partial["lora_unrelated.weight"] = torch.zeros(3)
    model = dit_from_state_dict(partial, device="cpu", dtype="fp32")
    r = model.load_report
    assert r.missing == ["blocks.1.cross_attn.o.bias"]
    assert [m[0] for m in r.mismatched] == ["blocks.0.ffn.2.bias"]
    assert r.unexpected == ["lora_unrelated.weight"]
    assert "MISSING 1" in r.summary() and "SHAPE MISMATCH 1" in r.summary()
    assert torch.isfinite(run(model, args)).all()


def test_missing_proj_l_is_allowed_and_said(tiny):
    sd, args = tiny
    dense = {k: v for k, v in sd.items() if ".proj_l." not in k}
    model = dit_from_state_dict(dense, device="cpu", dtype="fp32")
    assert model.load_report.ok and "no SLA proj_l" in model.load_report.summary()
    assert torch.isfinite(run(model, args, "sla")).all()


# ---------------------------------------------------------------------------
# bad files: clear errors, nothing executed

def test_vae_and_text_encoder_files_are_refused_by_kind(tmp_path):
    vae = {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "encoder.downsamples.0.residual.0.gamma":
           torch.zeros(8, 1, 1, 1), "decoder.middle.0.residual.0.gamma": torch.zeros(8, 1, 1, 1),
           "conv1.weight": torch.zeros(32, 32, 1, 1, 1), "conv2.weight": torch.zeros(16, 16, 1, 1, 1)}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan diffusion model.*VAE"):
        load_dit(tmp_path / "vae.safetensors", device="cpu")
    t5 = {"shared.weight": torch.zeros(10, 8), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 8)}
    save_file(t5, str(tmp_path / "umt5.safetensors"))
    with pytest.raises(CheckpointError, match="text encoder"):
        load_dit(tmp_path / "umt5.safetensors", device="cpu")


def test_truncated_files_are_refused(tiny, tmp_path):
    sd, _ = tiny
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pth")
    for name in ("m.safetensors", "m.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_dit(tmp_path / name, device="cpu")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"patch_embedding.weight": torch.zeros(2), "evil": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused without running it"):
        load_dit(tmp_path / "evil.pth", device="cpu")
    assert not marker.exists()


def test_half_the_blocks_removed_is_refused(tmp_path):
    keys = json.loads(fixture_path("keys/td_wan2.1_t2v_1.3B_sla.json").read_text())
    sd = {k: torch.empty(s, dtype=DTYPES[d], device="meta") for k, (s, d) in keys.items()
          if not (k.startswith("blocks.") and int(k.split(".")[1]) >= 15)}
    with pytest.raises(CheckpointError, match="missing whole transformer blocks \\(15 of 30"):
        dit_from_state_dict(sd, device="meta")
    # a hole in the middle of a tiny model is refused too
    tiny = {k: v for k, v in tiny_dit_state_dict(layers=3).items() if not k.startswith("blocks.1.")}
    save_file(tiny, str(tmp_path / "holey.safetensors"))
    with pytest.raises(CheckpointError, match="missing whole transformer blocks"):
        load_dit(tmp_path / "holey.safetensors", device="cpu")


def test_gutted_block_is_refused_with_the_report():
    sd = {k: v for k, v in tiny_dit_state_dict().items()
          if not (k.startswith("blocks.1.") and ("attn" in k or "ffn" in k))}
    with pytest.raises(CheckpointError, match="lacks most tensors") as err:
        dit_from_state_dict(sd, device="cpu")
    assert "MISSING" in str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(tmp_path / "nope.safetensors")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_dit(tmp_path / "x.gguf")


def test_root_package_import_is_cheap():
    """The pack's __init__ must not pull in torch (ComfyUI imports every pack at start-up)."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('pack', "
            f"{os.path.join(str(REPO), '__init__.py')!r}, submodule_search_locations=[{str(REPO)!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert m.WEB_DIRECTORY == './web'; print(len(m.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
