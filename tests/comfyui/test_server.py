"""The pack inside a real ComfyUI: it imports, every node is listed with its inputs, the web extension is served."""
import pytest

from comfyui.helpers import TINY_NAMES
from comfyui.server import PACK_NAME

pytestmark = pytest.mark.comfyui

CUSTOM_TYPES = {"TURBO_DIT", "TURBO_VAE", "TURBO_TEXT_ENCODER", "TURBO_I2V", "TURBO_MULTI_GPU"}

# node class -> (required inputs, optional inputs, outputs)
EXPECTED = {
    "TurboDiffusionModelLoader": (["model_name", "weight_dtype"], [], ["TURBO_DIT"]),
    "TurboDiffusionVAELoader": (["vae_name"], [], ["TURBO_VAE"]),
    "TurboDiffusionUMT5Loader": (["text_encoder_name", "tokenizer", "device"], [], ["TURBO_TEXT_ENCODER"]),
    "TurboDiffusionTextEncode": (["text_encoder", "text"], [], ["CONDITIONING"]),
    "TurboDiffusionImageToVideo": (["vae", "image", "width", "height", "num_frames", "adaptive_resolution"], [],
                                   ["TURBO_I2V"]),
    "TurboSampler": (["model", "positive", "width", "height", "num_frames", "steps", "attention_type", "sla_topk",
                      "sigma_max", "seed", "boundary", "ode", "noise_device"], ["low_noise_model", "i2v", "multi_gpu",
                                                                                "compile"],
                     ["LATENT"]),
    "TurboDiffusionMultiGPU": (["devices"], [], ["TURBO_MULTI_GPU"]),
    "TurboDiffusionVAEDecode": (["vae", "samples", "tiling"], [], ["IMAGE"]),
    "TurboDiffusionSaveVideo": (["images", "fps", "format", "quality", "filename_prefix"], [], []),
}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    from turbo_core.client import ComfyClient

    return ComfyClient(comfy_server.url).object_info()


def test_pack_imported_without_failure(comfy_server, object_info):
    log = comfy_server.log_text()
    failed = [line for line in log.splitlines()
              if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_NAME in line]
    assert not failed, log[-3000:]
    assert any(PACK_NAME in line for line in log.splitlines() if "seconds" in line), "pack not in the import times"
    assert all(name in object_info for name in EXPECTED), log[-3000:]


@pytest.mark.parametrize("node", sorted(EXPECTED))
def test_node_inputs_and_outputs(object_info, node):
    info = object_info[node]
    required, optional, outputs = EXPECTED[node]
    assert list(info["input"]["required"]) == required
    assert list(info["input"].get("optional", {})) == optional
    assert list(info["output"]) == outputs
    assert info["category"] == "TurboDiffusion"
    assert info["description"], "the docstring is the node's description"
    for name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
        assert len(spec) == 2 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_model_lists_come_from_both_folder_names(object_info):
    spec = object_info["TurboDiffusionModelLoader"]["input"]["required"]
    files = spec["model_name"][0]
    assert {"tiny_t2v.safetensors", "tiny_t2v_comfy.pth", "tiny_i2v_high.safetensors"} <= set(files)
    assert object_info["TurboDiffusionVAELoader"]["input"]["required"]["vae_name"][0] == ["tiny_wan_vae.safetensors"]
    te = object_info["TurboDiffusionUMT5Loader"]["input"]["required"]
    assert "tiny_umt5.safetensors" in te["text_encoder_name"][0]
    assert te["tokenizer"][0][0] == "auto"
    assert set(TINY_NAMES.values()) <= set(files) | set(te["text_encoder_name"][0]) | {"tiny_wan_vae.safetensors"}


def test_sampler_widgets(object_info):
    req = object_info["TurboSampler"]["input"]["required"]
    assert req["attention_type"][0] == ["sla", "sagesla", "original", "auto"]
    assert (req["steps"][1]["min"], req["steps"][1]["max"]) == (1, 4)
    assert req["seed"][1].get("control_after_generate") is True
    assert req["noise_device"][0] == ["cpu", "gpu"]
    assert object_info["TurboDiffusionSaveVideo"]["output_node"] is True
    assert object_info["TurboDiffusionSaveVideo"]["input"]["required"]["format"][0] == ["mp4", "webm", "gif", "webp"]


def test_custom_types_stay_private(object_info):
    """Native nodes never produce or take the pack's own types; everything else is ComfyUI's."""
    native = {k: v for k, v in object_info.items() if not k.startswith("Turbo")}
    for info in native.values():
        assert not CUSTOM_TYPES & set(map(str, info["output"]))


def test_ui_workflows_are_templates(comfy_server):
    """The newest ComfyUI lists a pack's workflows/ in its template browser (the API files in
    workflows/api/ stay out of it). The 2024 ComfyUI has no template route."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(comfy_server.url + "/api/workflow_templates", timeout=10) as r:
            templates = json.loads(r.read())
    except urllib.error.HTTPError as err:
        if err.code != 404:
            raise
        # The 2024 server has no template route: check what the newest one would list
        # (every *.json directly in workflows/), read from disk.
        from pathlib import Path

        folder = Path(__file__).resolve().parents[2] / "workflows"
        templates = {PACK_NAME: sorted(p.stem for p in folder.glob("*.json"))}
        for stem in templates[PACK_NAME]:
            graph = json.loads((folder / f"{stem}.json").read_text())
            assert graph["version"] == 0.4 and graph["nodes"] and "links" in graph, stem
        served = False
    else:
        served = True
    assert sorted(templates[PACK_NAME]) == ["turbodiffusion_i2v", "turbodiffusion_t2v"]
    if not served:
        return
    url = f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/turbodiffusion_t2v.json"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert json.loads(r.read())["nodes"]


def test_web_extension_is_served(comfy_server):
    import json
    import urllib.request

    with urllib.request.urlopen(comfy_server.url + "/extensions", timeout=10) as r:
        scripts = [s for s in json.loads(r.read()) if PACK_NAME in s]
    assert scripts == [f"/extensions/{PACK_NAME}/turbodiffusion.js"]
    with urllib.request.urlopen(comfy_server.url + scripts[0], timeout=10) as r:
        assert b"registerExtension" in r.read()
