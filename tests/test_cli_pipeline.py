"""End to end on tiny random models written as real files: the CLI, the pipeline, doctor."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from turbo_core import generate_i2v, generate_t2v, load_dit, load_text_encoder, load_vae
from turbo_core.io.video import read_video_info
from turbo_core.pipeline import i2v_condition
from turbo_core.tiny import write_tiny_models


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "turbo_core", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def t2v_files(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("t2v"))


@pytest.fixture(scope="module")
def i2v_files(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("i2v"), i2v=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(50, 70, 4, generator=g) * 255).byte().numpy(), "RGBA").save(path)
    return path


@pytest.mark.parametrize("ext", ["mp4", "webm", "gif"])
def test_cli_t2v_writes_a_decodable_video(t2v_files, tmp_path, ext):
    out = tmp_path / f"clip.{ext}"
    r = cli("t2v", "--dit", t2v_files["dit"], "--vae", t2v_files["vae"], "--text-encoder",
            t2v_files["text_encoder"], "--prompt", "a cat surfing", "--out", out, "--width", 64, "--height", 48,
            "--frames", 9, "--steps", 2, "--attention", "sla", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    info = read_video_info(out)
    assert (info["width"], info["height"]) == (64, 48)
    if ext != "gif":  # Pillow may merge identical GIF frames
        assert info["frames"] == 9
    assert "peak memory" in r.stdout and "sampling" in r.stdout


def test_cli_i2v_two_experts(i2v_files, image, tmp_path):
    out = tmp_path / "i2v.mp4"
    r = cli("i2v", "--dit", i2v_files["dit"], "--dit-low", i2v_files["dit_low"], "--vae", i2v_files["vae"],
            "--text-encoder", i2v_files["text_encoder"], "--image", image, "--prompt", "the camera pans",
            "--out", out, "--width", 48, "--height", 32, "--frames", 5, "--steps", 4, "--ode",
            "--cuda-graphs")  # CUDA only: on the CPU the steps run as they are
    assert r.returncode == 0, r.stderr
    info = read_video_info(out)
    assert (info["frames"], info["width"], info["height"]) == (5, 48, 32)


def test_cli_refuses_bad_requests_clearly(t2v_files, tmp_path):
    base = ["t2v", "--dit", t2v_files["dit"], "--vae", t2v_files["vae"], "--text-encoder",
            t2v_files["text_encoder"], "--prompt", "x", "--out", tmp_path / "x.mp4"]
    cases = {("--frames", 80, "--width", 64, "--height", 48): "80 frames: use 77 or 81",
             ("--width", 70, "--height", 48): "width 70: use 64 or 80",
             ("--steps", 0, "--width", 64, "--height", 48): "between 1 and 4",
             ("--steps", 5, "--width", 64, "--height", 48): "between 1 and 4"}
    for extra, message in cases.items():
        r = cli(*base, *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
    r = cli("t2v", "--dit", t2v_files["vae"], "--vae", t2v_files["vae"], "--text-encoder",
            t2v_files["text_encoder"], "--prompt", "x", "--width", 64, "--height", 48)
    assert r.returncode == 2 and "not a Wan diffusion model" in r.stderr and "VAE" in r.stderr


def test_demo_runs(tmp_path):
    r = cli("demo", "--out", tmp_path / "demo.mp4", "--frames", 9)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stdout
    assert read_video_info(tmp_path / "demo.mp4")["frames"] == 9


def test_doctor_lists_models_and_problems(t2v_files, tmp_path):
    models = tmp_path / "models"
    write_tiny_models(models)
    (models / "vae" / "misplaced.pth").write_bytes(open(t2v_files["dit"], "rb").read())
    (models / "vae" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    r = cli("doctor", models)
    assert r.returncode == 0, r.stderr
    assert "attention sla" in r.stdout and "torch" in r.stdout
    assert "tiny-t2v.pth: custom Wan T2V" in r.stdout
    assert "Wan2.1 VAE (dim 8, 16 channels)" in r.stdout
    assert "umT5 (2 layers, dim 64), tokenizer embedded" in r.stdout
    assert "move it to diffusion_models/" in r.stdout
    assert "truncated or corrupt" in r.stdout


def test_seed_determinism_and_batch(t2v_files):
    dit = load_dit(t2v_files["dit"], device="cpu", dtype="fp32")
    vae = load_vae(t2v_files["vae"], device="cpu")
    te = load_text_encoder(t2v_files["text_encoder"], device="cpu", dtype="fp32")
    kw = dict(width=32, height=32, num_frames=5, steps=2, attention="original")
    a = generate_t2v(dit, vae, te, "a boat", seed=7, **kw)
    b = generate_t2v(dit, vae, te, "a boat", seed=7, **kw)
    c = generate_t2v(dit, vae, te, "a boat", seed=8, **kw)
    assert torch.equal(a.latent, b.latent)
    assert not torch.allclose(a.latent, c.latent)
    assert a.frames.shape == (1, 5, 32, 32, 3) and 0 <= a.frames.min() and a.frames.max() <= 1
    two = generate_t2v(dit, vae, te, ["a boat", "a bird"], seed=7, batch_size=2, **kw)
    assert two.frames.shape[0] == 2
    with pytest.raises(ValueError, match="needs Wan2.2 I2V models"):
        generate_i2v(dit, vae, te, "x", torch.zeros(8, 8, 3), **kw)


def test_i2v_condition_layout(i2v_files, image):
    vae = load_vae(i2v_files["vae"], device="cpu")
    y = i2v_condition(vae, image, width=48, height=32, num_frames=9)
    assert y.shape == (1, 20, 3, 4, 6)
    assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    # grayscale and RGBA images are accepted; the result depends on the image
    gray = i2v_condition(vae, Image.open(image).convert("L"), width=48, height=32, num_frames=9)
    assert gray.shape == y.shape and not torch.equal(gray, y)
