"""Bad inputs are refused before work starts; failures and interrupts leave the server serving."""
import pytest

from comfyui.helpers import node_of, tiny_prompt
from turbo_core.client import ExecutionFailed, ExecutionInterrupted, PromptRejected

pytestmark = pytest.mark.comfyui


def t2v(seed: int, **kw) -> dict:
    prompt = tiny_prompt("turbodiffusion_t2v_api.json", **{"width": 32, "height": 32, "frames": 1, "steps": 1, **kw})
    node_of(prompt, "TurboSampler")["inputs"]["seed"] = seed
    return prompt


def rejected(client, prompt) -> PromptRejected:
    with pytest.raises(PromptRejected) as info:
        client.queue(prompt)
    return info.value


def test_invalid_prompt_is_http_400_with_node_errors(client):
    prompt = t2v(1)
    node_of(prompt, "TurboSampler")["inputs"].update(width=100, num_frames=12)
    err = rejected(client, prompt)
    [(node_id, info)] = err.node_errors.items()
    assert node_id == "5" and info["class_type"] == "TurboSampler"
    assert "width 100: use 96 or 112" in str(err) and "12 frames: use 9 or 13" in str(err)


def test_i2v_size_checked_too(client):
    """The 2024 ComfyUI validates only nodes reached through required inputs (the sampler's i2v is
    optional), so there the same message comes when the node runs; newer ones refuse it up front."""
    prompt = tiny_prompt("turbodiffusion_i2v_api.json", frames=1, steps=1)
    node_of(prompt, "TurboDiffusionImageToVideo")["inputs"]["height"] = 40
    node_of(prompt, "LoadImage")["inputs"]["image"] = _upload(client)
    try:
        client.run(prompt)
    except PromptRejected as err:
        assert list(err.node_errors) == ["7"] and "height 40: use 32 or 48" in str(err)
    except ExecutionFailed as err:
        assert err.node_id == "7" and "height 40: use 32 or 48" in err.exception_message
    else:
        pytest.fail("a height of 40 was accepted")


def test_out_of_range_and_unknown_choices(client):
    prompt = t2v(1)
    node_of(prompt, "TurboSampler")["inputs"].update(steps=8, attention_type="flash")
    text = str(rejected(client, prompt))
    assert "steps" in text and "attention_type" in text


@pytest.mark.parametrize("prefix", ["../../x", "../x", "/tmp/x", "a/../../x", ""])
def test_filename_prefix_cannot_leave_the_output_folder(client, comfy_server, prefix):
    prompt = t2v(2)
    node_of(prompt, "TurboDiffusionSaveVideo")["inputs"]["filename_prefix"] = prefix
    err = rejected(client, prompt)
    assert list(err.node_errors) == ["7"]
    assert "filename_prefix" in str(err)
    assert not (comfy_server.output_dir.parent / "x_00001_.mp4").exists()


def test_sub_folders_are_fine(client, comfy_server):
    prompt = t2v(3)
    node_of(prompt, "TurboDiffusionSaveVideo")["inputs"]["filename_prefix"] = "a/b/../c/clip"
    [entry] = client.run(prompt).outputs["7"]["videos"]
    assert entry["subfolder"] == "a/c" and (comfy_server.output_dir / "a" / "c" / entry["filename"]).is_file()


def test_vae_file_in_the_dit_slot_fails_clearly_and_the_next_prompt_runs(client):
    prompt = t2v(4)
    node_of(prompt, "TurboDiffusionModelLoader")["inputs"]["model_name"] = "tiny_wan_vae_not_a_dit.safetensors"
    with pytest.raises(ExecutionFailed) as info:
        client.run(prompt)
    err = info.value
    assert err.node_id == "1" and err.node_type == "TurboDiffusionModelLoader"
    assert "is not a Wan diffusion model" in err.exception_message and "VAE" in err.exception_message
    assert client.run(t2v(4)).outputs["7"]["videos"]


def test_wrong_model_kind_is_named(client):
    """A T2V model given an I2V graph: the sampler says what to change."""
    prompt = tiny_prompt("turbodiffusion_i2v_api.json", frames=1, steps=1)
    for node_id in ("1", "2"):
        prompt[node_id]["inputs"]["model_name"] = "tiny_t2v.safetensors"
    node_of(prompt, "LoadImage")["inputs"]["image"] = _upload(client)
    with pytest.raises(ExecutionFailed) as info:
        client.run(prompt)
    assert info.value.node_type == "TurboSampler"
    assert "text-to-video model: disconnect i2v" in info.value.exception_message


def _upload(client) -> str:
    import tempfile
    from pathlib import Path

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refusal_start.png"
        Image.new("RGB", (32, 32), (10, 200, 10)).save(path)
        return client.upload_image(str(path))


def test_interrupt_stops_the_run_and_the_next_one_succeeds(client, comfy_server):
    # Big enough that a step takes about half a second on a CPU (a decode would take many); interrupted after the first.
    prompt = t2v(5, width=256, height=256, frames=33, steps=4)
    node_of(prompt, "TurboSampler")["inputs"]["attention_type"] = "original"
    node_of(prompt, "TurboDiffusionSaveVideo")["inputs"]["filename_prefix"] = "interrupted/run"
    progress = []

    def on_event(kind, data):
        if kind == "progress" and data.get("node") == "5":
            progress.append(data["value"])
            if len(progress) == 1:
                client.interrupt()

    with pytest.raises(ExecutionInterrupted) as info:
        client.run(prompt, on_event=on_event)
    assert info.value.data["node_id"] == "5"
    assert progress and max(progress) < 4, f"not stopped mid-run: {progress}"
    assert not (comfy_server.output_dir / "interrupted").exists()
    assert "Processing interrupted" in comfy_server.log_text()
    assert client.run(t2v(6)).outputs["7"]["videos"]
