"""Loading a Wan DiT from any of its checkpoint layouts, with a report of what happened.

Layouts, told apart by keys and shapes (never by file name):
  * TurboWan .pth: bare keys, maybe `_checkpoint_wrapped_module.` segments, SLA proj_l;
  * TurboWan -quant .pth: block linears as `int8_weight` + 128x128-tile `scale`;
  * official Wan / Comfy-Org files: `model.diffusion_model.` or `model.` prefix,
    Conv3d patch embedding [D,C,1,2,2], no proj_l;
  * our converted .safetensors (TurboWan names, any of the above contents).
strict=False the way users need it: every matching tensor loads; the rest is
reported; a file that is not a Wan DiT, or is missing whole blocks, is refused.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from ..attention import ensure_kernels
from ..io.checkpoint import CheckpointError, guess_kind, read_state_dict
from .dit import KNOWN_VARIANTS, PATCH, DiTConfig, WanDiT

log = logging.getLogger("turbo_core")

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "net.", "module.", "_orig_mod.")
PROJ_L = "self_attn.attn_op.local_attn.proj_l."
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32, not {dtype!r}") from None


def default_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first(names, n: int = 5) -> str:
    names = list(names)
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@dataclass
class LoadReport:
    """What the loader found in a file and what it did with it."""

    source: str
    layout: str = ""
    variant: str = ""
    dtype: str = ""
    loaded: int = 0
    converted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    absent_by_layout: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"{self.source}: {self.variant} ({self.layout}), {self.loaded} tensors loaded as {self.dtype}"]
        lines += [f"  converted: {c}" for c in self.converted]
        if self.missing:
            lines.append(f"  MISSING {len(self.missing)} (filled with neutral values): {_first(self.missing)}")
        if self.mismatched:
            shown = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            lines.append(f"  SHAPE MISMATCH {len(self.mismatched)} (not loaded): {_first(shown, 3)}")
        if self.unexpected:
            lines.append(f"  unexpected {len(self.unexpected)} (ignored): {_first(self.unexpected)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------
# layouts

def normalize_keys(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Any accepted layout -> TurboWan key names with a Linear patch embedding."""
    for prefix in PREFIXES:
        n = sum(k.startswith(prefix) for k in sd)
        if n > len(sd) // 2:
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
            report.converted.append(f"stripped prefix '{prefix}' from {n} keys")
    if any("_checkpoint_wrapped_module." in k for k in sd):
        sd = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in sd.items()}
        report.converted.append("removed '_checkpoint_wrapped_module.' segments")
    w = sd.get("patch_embedding.weight")
    if w is not None and w.ndim == 5:  # Conv3d [D,C,1,2,2] has the Linear's memory order
        sd["patch_embedding.weight"] = w.reshape(w.shape[0], -1)
        report.converted.append("patch_embedding Conv3d [D,C,1,2,2] -> Linear")
    return sd


def _shape(sd, *names):
    for n in names:
        if n in sd:
            return sd[n].shape
    return None


def infer_config(sd: dict[str, torch.Tensor], source: str) -> DiTConfig:
    """Config from tensor shapes; refuses files that are not (complete) Wan DiTs."""
    is_dit = "head.modulation" in sd or any(".self_attn." in k and k.startswith("blocks.") for k in sd)
    if not is_dit:
        raise CheckpointError(
            f"{source} is not a Wan diffusion model: it looks like a {guess_kind(sd)}. "
            f"Load VAEs with the VAE loader and text encoders with the umT5 loader; "
            f"diffusion_models/ needs a TurboWan or Wan2.1/2.2 DiT file.")
    if any(k.startswith("img_emb.") or ".k_img." in k for k in sd):
        raise CheckpointError(
            f"{source} is a CLIP-conditioned Wan2.1 I2V/FLF2V model (img_emb): TurboDiffusion's I2V model is "
            f"Wan2.2 I2V A14B, which has no CLIP branch. Use TurboWan2.2-I2V-A14B-high/low files.")
    pe, head = _shape(sd, "patch_embedding.weight"), _shape(sd, "head.head.weight")
    te, tm = _shape(sd, "text_embedding.0.weight"), _shape(sd, "time_embedding.0.weight")
    essentials = {"patch_embedding.weight": pe, "head.head.weight": head, "text_embedding.0.weight": te,
                  "time_embedding.0.weight": tm}
    if any(s is None for s in essentials.values()):
        gone = [k for k, s in essentials.items() if s is None]
        raise CheckpointError(f"{source} is an incomplete Wan DiT: {', '.join(gone)} missing")

    indices = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    num_layers = indices[-1] + 1 if indices else 0
    gaps = sorted(set(range(num_layers)) - set(indices))
    dim = pe[0]
    ffn = next((s[0] for i in indices if (s := _shape(sd, f"blocks.{i}.ffn.0.weight",
                                                      f"blocks.{i}.ffn.0.int8_weight")) is not None), None)
    if dim % 128 or ffn is None:
        raise CheckpointError(f"{source}: hidden size {dim} is not a Wan DiT's (multiple of 128 with an FFN)")
    cfg = DiTConfig(dim=dim, num_layers=num_layers, ffn_dim=ffn, in_dim=pe[1] // (PATCH[1] * PATCH[2]),
                    out_dim=head[0] // (PATCH[1] * PATCH[2]), text_dim=te[1], freq_dim=tm[1])
    expected = next((v for v in KNOWN_VARIANTS.values() if v.dim == dim and v.in_dim == cfg.in_dim), None)
    if gaps or (expected and expected.num_layers != num_layers):
        total = expected.num_layers if expected else num_layers
        missing = sorted(set(range(total)) - set(indices))
        raise CheckpointError(
            f"{source} is missing whole transformer blocks ({len(missing)} of {total}: {_first(map(str, missing), 8)}); "
            f"the file is incomplete or was cut short. Download it again.")
    return cfg


def _layout(sd, report: LoadReport, sla_blocks, int8) -> str:
    conv = any("Conv3d" in c for c in report.converted)
    if int8:
        return "TurboWan -quant (int8 W8A8)"
    if sla_blocks:
        return "TurboWan (SLA)"
    return "Wan/ComfyUI (Conv3d patch embedding)" if conv else "Wan (no SLA proj_l)"


# ---------------------------------------------------------------------------
# loading

def _neutral(name: str, like: torch.Tensor, device) -> torch.Tensor:
    """Value for a tensor the file lacks: identity for norms/scales, zero elsewhere."""
    one = name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", ".scale"))
    return (torch.ones if one else torch.zeros)(like.shape, dtype=like.dtype, device=device)


def dit_from_state_dict(sd: dict[str, torch.Tensor], *, device=None, dtype=None, source: str = "<state dict>",
                        linear: str = "auto", progress=None) -> WanDiT:
    """Build and fill a WanDiT from a state dict in any accepted layout (meta tensors allowed).

    progress(done, total) is called as tensors are moved into the model.
    """
    device, dtype = default_device(device), parse_dtype(dtype)
    report = LoadReport(source=source, dtype=str(dtype).replace("torch.", ""))
    sd = normalize_keys(dict(sd), report)
    cfg = infer_config(sd, source)
    int8 = {k[: -len(".int8_weight")] for k in sd if k.endswith(".int8_weight")}
    sla_blocks = {int(_BLOCK.match(k).group(1)) for k in sd if PROJ_L in k and _BLOCK.match(k)}
    model = WanDiT(cfg, dtype=dtype, int8=int8, sla_blocks=sla_blocks)
    report.variant, report.layout = cfg.variant, _layout(sd, report, sla_blocks, int8)

    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    filled = {}
    for i, (name, like) in enumerate(targets.items()):
        if progress and i % 16 == 0:
            progress(i, len(targets))
        src = sd.pop(name, None)
        if src is not None and tuple(src.shape) == tuple(like.shape):
            filled[name] = src.to(device=device, dtype=like.dtype)
            report.loaded += 1
            continue
        if src is not None:
            report.mismatched.append((name, tuple(src.shape), tuple(like.shape)))
        else:
            report.missing.append(name)
        filled[name] = _neutral(name, like, device)
    if progress:
        progress(len(targets), len(targets))
    report.unexpected = sorted(sd)
    model.load_state_dict(filled, strict=True, assign=True)

    absent = [i for i in range(cfg.num_layers) if i not in sla_blocks]
    if absent:
        report.absent_by_layout = [f"blocks.{i}.{PROJ_L}{p}" for i in absent for p in ("weight", "bias")]
        report.notes.append(
            "no SLA proj_l in this file (not a TurboWan SLA checkpoint): dense 'original' attention is exact; "
            "'sla'/'sagesla' run without the linear branch, which TurboWan models were not trained for"
            if len(absent) == cfg.num_layers else f"SLA proj_l missing in {len(absent)} blocks")
    per_block = [k for k in report.missing if _BLOCK.match(k)]
    worst = max((sum(k.startswith(f"blocks.{i}.") for k in per_block) for i in range(cfg.num_layers)), default=0)
    if worst > len(list(model.blocks[0].state_dict())) // 2:
        raise CheckpointError(f"{source} lacks most tensors of some blocks; refusing to run it.\n{report.summary()}")

    if linear == "w8a8":
        ensure_kernels(device)  # the Triton W8A8 GEMM on CUDA, the exact reference elsewhere
    # auto: on CUDA the first forward of each size times the W8A8 kernel against
    # dequantised weights + cuBLAS and keeps the faster; dequant elsewhere.
    model.set_linear_mode(linear)
    model.load_report = report
    model.eval().requires_grad_(False)
    (log.warning if not report.ok else log.info)("%s", report.summary())
    return model


def load_dit(path, *, device=None, dtype=None, linear: str = "auto", progress=None) -> WanDiT:
    """Load a TurboWan / Wan2.1 / Wan2.2 DiT file (.safetensors or .pth) onto `device`.

    dtype: compute dtype, bf16 by default (fp32 for exact checks). int8 weights
    stay int8. linear: "auto" | "w8a8" | "dequant" for int8 checkpoints.
    """
    sd = read_state_dict(path)
    return dit_from_state_dict(sd, device=device, dtype=dtype, source=str(path), linear=linear, progress=progress)


def convert_to_safetensors(src, dst) -> LoadReport:
    """Rewrite any accepted DiT layout as a TurboWan-named .safetensors (int8 + scales kept)."""
    from safetensors.torch import save_file

    report = LoadReport(source=str(src))
    sd = normalize_keys(read_state_dict(src), report)
    cfg = infer_config(sd, str(src))
    report.variant = cfg.variant
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst),
              metadata={"format": "pt", "converted_by": "turbo_core", "variant": cfg.variant})
    report.loaded = len(sd)
    return report
