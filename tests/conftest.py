"""Shared test helpers: where the reference fixtures live, and how to compare."""
import json
import os
from pathlib import Path

# CI has no GPU: Triton kernels run in triton's CPU interpreter. This must be set
# before triton is first imported (it fixes the mode of its language library then).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TURBO_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"reference fixture {path} is missing (set TURBO_FIXTURES)")
    return path


def load_fixture(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(fixture_path(name)))


def fixture_manifest() -> dict:
    return json.loads(fixture_path("manifest.json").read_text())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
