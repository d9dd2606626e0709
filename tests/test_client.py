"""turbo_core.client without a server: editing API prompts, reading ComfyUI's answers."""
import json

import pytest

from turbo_core.client import (ExecutionFailed, ComfyClient, apply_set, format_prompt_errors, load_api_workflow,
                               saved_files, set_image)


@pytest.fixture
def prompt():
    return {
        "3": {"class_type": "TurboSampler", "_meta": {"title": "Sampler"}, "inputs": {"seed": 0, "model": ["1", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    }


def test_set_by_id_class_and_title(prompt):
    apply_set(prompt, "3.seed=42")
    assert prompt["3"]["inputs"]["seed"] == 42
    apply_set(prompt, "TurboSampler.ode=true")
    assert prompt["3"]["inputs"]["ode"] is True
    apply_set(prompt, "Sampler.text=a cat. on a mat")  # not JSON: kept as text, dots in the value are fine
    assert prompt["3"]["inputs"]["text"] == "a cat. on a mat"
    apply_set(prompt, 'LoadImage.image="x.png"')  # every match
    assert prompt["5"]["inputs"]["image"] == prompt["6"]["inputs"]["image"] == "x.png"


@pytest.mark.parametrize("bad, message", [
    ("3seed=1", "use NODE.INPUT=VALUE"), ("3.seed", "use NODE.INPUT=VALUE"), ("9.seed=1", "no node '9'"),
    ("3.model=1", "is a link"),
])
def test_set_refuses(prompt, bad, message):
    with pytest.raises(ValueError, match=message):
        apply_set(prompt, bad)


def test_set_image(prompt):
    assert set_image(prompt, "up/start.png") == 2
    assert prompt["6"]["inputs"]["image"] == "up/start.png"


def test_load_api_workflow(tmp_path, prompt):
    path = tmp_path / "api.json"
    path.write_text(json.dumps({"prompt": prompt}))  # the body of POST /prompt is accepted too
    assert load_api_workflow(str(path)) == prompt
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(ValueError, match="UI workflow"):
        load_api_workflow(str(path))
    path.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(ValueError, match="not an API-format prompt"):
        load_api_workflow(str(path))


def test_prompt_errors_read_well():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"5": {"class_type": "TurboSampler", "errors": [
                {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                 "details": f"{name} - width 65: use 64 or 80"} for name in ("width", "height", "num_frames")] + [
                {"type": "value_bigger_than_max", "message": "Value 8 bigger than max of 4", "details": "steps"}]}}}
    assert format_prompt_errors(body) == ("Prompt outputs failed validation\n"
                                          "  node 5 (TurboSampler): width 65: use 64 or 80\n"
                                          "  node 5 (TurboSampler): Value 8 bigger than max of 4: steps")


def test_saved_files_from_any_output_key():
    outputs = {"7": {"videos": [{"filename": "a_00001_.mp4", "subfolder": "", "type": "output"}]},
               "8": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}], "text": ["report"]},
               "9": {"gifs": [{"filename": "b.gif", "subfolder": "x", "type": "output"}]}}
    assert [f["filename"] for f in saved_files(outputs)] == ["a_00001_.mp4", "b.gif"]


def test_history_errors_are_raised():
    entry = {"status": {"status_str": "error", "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_id": "1", "node_type": "TurboDiffusionModelLoader",
                             "exception_type": "turbo_core.io.checkpoint.CheckpointError",
                             "exception_message": "x.safetensors is a VAE"}]]}}
    with pytest.raises(ExecutionFailed, match=r"node 1 \(TurboDiffusionModelLoader\) failed: CheckpointError: x"):
        ComfyClient._finished("p", entry)


def test_server_address_forms():
    assert ComfyClient("127.0.0.1:8188").server == "http://127.0.0.1:8188"
    assert ComfyClient("http://host:1/").server == "http://host:1"
