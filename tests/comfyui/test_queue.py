"""The shipped API workflows, queued through `python -m turbo_core queue` against a real ComfyUI."""
import argparse
import re

import pytest

from comfyui.helpers import WORKFLOWS, load_api, node_of, tiny_prompt, tiny_sets
from turbo_core.io.video import read_video_info

pytestmark = pytest.mark.comfyui


def queue_cli(*argv) -> int:
    """`python -m turbo_core queue ARGV...`, in-process (the same parser and function cli.py registers)."""
    from turbo_core.client import add_queue_parser

    parser = argparse.ArgumentParser(prog="python -m turbo_core")
    add_queue_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["queue", *map(str, argv)])
    return args.func(args)


def set_args(sets):
    return [a for s in sets for a in ("--set", s)]


def test_t2v_workflow_gives_an_mp4_with_the_right_frame_count(comfy_server, tmp_path, capsys):
    workflow = WORKFLOWS / "turbodiffusion_t2v_api.json"
    sets = tiny_sets(load_api("turbodiffusion_t2v_api.json"), width=64, height=48, frames=9, steps=2)
    rc = queue_cli(workflow, "--server", comfy_server.url, "--out", tmp_path, *set_args(sets),
                   "--set", "TurboSampler.seed=101", "--set", 'TurboDiffusionTextEncode.text="a red fox, snow"')
    out = capsys.readouterr()
    assert rc == 0, out.err
    [video] = list(tmp_path.rglob("*.mp4"))
    assert f"saved {video}" in out.out
    info = read_video_info(video)
    assert (info["frames"], info["width"], info["height"]) == (9, 64, 48)
    assert info["fps"] == pytest.approx(16)
    # ComfyUI's counter naming, in the sub-folder the prefix names, inside the server's output folder
    assert re.fullmatch(r"t2v_\d{5}_\.mp4", video.name) and video.parent.name == "TurboDiffusion"
    assert (comfy_server.output_dir / "TurboDiffusion" / video.name).read_bytes() == video.read_bytes()
    assert "tiny_t2v.safetensors: custom Wan T2V (dim 256, 2 layers) (TurboWan (SLA))" in comfy_server.log_text()


def test_i2v_workflow_with_an_uploaded_image(comfy_server, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "start.png"
    Image.new("RGB", (60, 40), (200, 80, 40)).save(image)
    sets = tiny_sets(load_api("turbodiffusion_i2v_api.json"), width=64, height=48, frames=5, steps=2)
    rc = queue_cli(WORKFLOWS / "turbodiffusion_i2v_api.json", "--server", comfy_server.url, "--out", tmp_path / "out",
                   "--image", image, *set_args(sets), "--set", "TurboSampler.seed=202")
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert (comfy_server.input_dir / "start.png").is_file()  # uploaded
    [video] = list((tmp_path / "out").rglob("*.mp4"))
    info = read_video_info(video)
    # adaptive_resolution: about 64x48 pixels at the image's 3:2 aspect -> 64x48 (multiples of 16)
    assert (info["frames"], info["width"], info["height"]) == (5, 64, 48)


@pytest.mark.parametrize("fmt", ["webm", "gif", "webp"])
def test_other_formats(client, comfy_server, tmp_path, fmt):
    prompt = tiny_prompt("turbodiffusion_t2v_api.json", width=48, height=32, frames=5, steps=1)
    node_of(prompt, "TurboSampler")["inputs"]["seed"] = 303  # the same for all formats: only saving re-runs
    save = node_of(prompt, "TurboDiffusionSaveVideo")["inputs"]
    save.update(format=fmt, filename_prefix=f"formats/{fmt}", quality=60)
    result = client.run(prompt, str(tmp_path))
    [entry] = result.outputs["7"]["videos"]
    assert entry["filename"].endswith(f"_.{fmt}") and entry["subfolder"] == "formats"
    assert entry["frame_count"] == 5
    [path] = result.files
    info = read_video_info(path)
    assert (info["frames"], info["width"], info["height"]) == (5, 48, 32)


def test_counter_names_never_overwrite(client, comfy_server, tmp_path):
    prompt = tiny_prompt("turbodiffusion_t2v_api.json", width=32, height=32, frames=1, steps=1)
    node_of(prompt, "TurboDiffusionSaveVideo")["inputs"]["filename_prefix"] = "counter/run"
    names = []
    for seed in (1, 2):
        node_of(prompt, "TurboSampler")["inputs"]["seed"] = seed
        names.append(client.run(prompt).outputs["7"]["videos"][0]["filename"])
    assert names == ["run_00001_.mp4", "run_00002_.mp4"]
    assert sorted(p.name for p in (comfy_server.output_dir / "counter").iterdir()) == names


def test_cli_reports_refused_prompts_readably(comfy_server, tmp_path, capsys):
    sets = tiny_sets(load_api("turbodiffusion_t2v_api.json"))
    rc = queue_cli(WORKFLOWS / "turbodiffusion_t2v_api.json", "--server", comfy_server.url, "--out", tmp_path,
                   *set_args(sets), "--set", "5.width=65", "--set", "5.num_frames=10")
    err = capsys.readouterr().err
    assert rc == 2
    assert "node 5 (TurboSampler)" in err and "width 65: use 64 or 80" in err and "10 frames: use 9 or 13" in err
    assert err.count("width 65") == 1, "one line per problem, not one per input"


def test_cli_refuses_a_ui_workflow(tmp_path, capsys):
    ui = tmp_path / "ui.json"
    ui.write_text('{"nodes": [], "links": [], "version": 0.4}')
    assert queue_cli(ui, "--server", "http://127.0.0.1:9") == 2
    assert "UI workflow" in capsys.readouterr().err


def test_cli_says_when_the_server_is_not_there(capsys):
    assert queue_cli(WORKFLOWS / "turbodiffusion_t2v_api.json", "--server", "http://127.0.0.1:9") == 1
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in capsys.readouterr().err


def test_latent_is_comfyui_wan_convention_and_matches_the_engine(client, comfy_server, tmp_path):
    """TurboSampler's LATENT, saved by the native SaveLatent node, is the engine's latent un-normalised
    (ComfyUI's Wan convention), for the same models, prompt and seed run here in-process."""
    import torch
    from safetensors.torch import load_file

    from turbo_core.latent_format import from_comfy
    from turbo_core.models.dit_loader import load_dit
    from turbo_core.models.umt5 import load_text_encoder
    from turbo_core.pipeline import sample_latent
    from turbo_core.sampling.sizes import latent_shape

    prompt = tiny_prompt("turbodiffusion_t2v_api.json", width=48, height=32, frames=5, steps=2)
    sampler = node_of(prompt, "TurboSampler")["inputs"]
    sampler["seed"] = 505
    prompt["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/t2v"}}
    [entry] = client.run(prompt).outputs["8"]["latents"]
    saved = load_file(str(comfy_server.output_dir / entry["subfolder"] / entry["filename"]))["latent_tensor"]
    assert saved.shape == (1, 16, 2, 4, 6)

    with torch.inference_mode():
        te = load_text_encoder(comfy_server.models["umt5"], device="cpu")
        context = te.encode([node_of(prompt, "TurboDiffusionTextEncode")["inputs"]["text"]])
        dit = load_dit(comfy_server.models["t2v"], device="cpu", dtype="auto")
        expected = sample_latent(dit, context, shape=latent_shape(1, 5, 32, 48), steps=2, sigma_max=80.0, seed=505,
                                 attention=sampler["attention_type"], sla_topk=sampler["sla_topk"], noise_device="cpu")
    torch.testing.assert_close(from_comfy(saved), expected, rtol=1e-5, atol=1e-5)


def test_compile_option_gives_the_same_latent_and_can_be_turned_off(client, comfy_server):
    """TurboSampler's compile=True runs the blocks under torch.compile (the eager latent up to bf16
    rounding); a later run with compile=False goes back to the eager blocks in the same server."""
    import torch
    from safetensors.torch import load_file

    def latent(compile_blocks, seed):
        prompt = tiny_prompt("turbodiffusion_t2v_api.json", width=48, height=32, frames=5, steps=1)
        sampler = node_of(prompt, "TurboSampler")["inputs"]
        sampler.update(seed=seed, compile=compile_blocks)
        prompt["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/c"}}
        [entry] = client.run(prompt, timeout=600).outputs["8"]["latents"]
        return load_file(str(comfy_server.output_dir / entry["subfolder"] / entry["filename"]))["latent_tensor"]

    eager = latent(False, 606)
    mark = len(comfy_server.log_text())
    compiled = latent(True, 606)
    assert "TurboSampler: compiling the blocks of custom Wan T2V" in comfy_server.log_text()[mark:]
    # bf16 model: compiled kernels round in another order (measured rel_l2 4.5e-3)
    assert float((compiled - eager).norm() / eager.norm()) <= 1.5e-2
    assert not torch.equal(latent(False, 607), eager)  # eager again, and a new seed really re-ran
