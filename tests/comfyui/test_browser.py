"""The UI workflows in a real browser: they load, export to the API files, run, and the video plays.

Needs Debian's Chromium (`apt-get install -y chromium fonts-liberation`) and playwright-core
(`npm ci --prefix tests/browser`); missing either is a failure, not a skip, so CI cannot pass
without running them. Screenshots go to test-artifacts/.
"""
import json
import os
import shutil
import subprocess

import pytest

from comfyui.helpers import MODEL_INPUTS, TINY_NAMES, load_api
from comfyui.server import REPO
from turbo_core.io.video import read_video_info

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

BROWSER_DIR = REPO / "tests" / "browser"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def require_browser():
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium fonts-liberation)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (npm ci --prefix tests/browser)")
    if not shutil.which("node"):
        missing.append("Node.js")
    if missing:
        pytest.fail("browser tests need " + "; ".join(missing))


def tiny_overrides(ui: dict, name: str) -> dict:
    """Widget values that point the UI graph at the tiny models and a tiny size."""
    out = {}
    for node in ui["nodes"]:
        values, widgets = {}, node.get("widgets_values") or []
        if node["type"] == "TurboDiffusionModelLoader":
            values["model_name"] = TINY_NAMES[widgets[0]]
        elif node["type"] == "TurboDiffusionUMT5Loader":
            values.update(text_encoder_name=TINY_NAMES[widgets[0]], device="cpu")
        elif node["type"] == "TurboDiffusionVAELoader":
            values["vae_name"] = TINY_NAMES[widgets[0]]
        elif node["type"] in ("TurboSampler", "TurboDiffusionImageToVideo"):
            values.update(width=64, height=48, num_frames=5)
            if node["type"] == "TurboSampler":
                values.update(steps=1, seed=4242 if "t2v" in name else 4343)
        elif node["type"] == "TurboDiffusionSaveVideo":
            values["filename_prefix"] = f"browser/{name}"
        if values:
            out[str(node["id"])] = values
    return out


def without_model_names(prompt: dict) -> dict:
    """The prompt without model file names, and without LoadImage's "upload" button, which the 2024 UI
    exports as an input (the server ignores it) and the newest frontend does not."""
    return {k: {"class_type": v["class_type"],
                "inputs": {i: x for i, x in v["inputs"].items() if i not in (*MODEL_INPUTS, "upload")}}
            for k, v in prompt.items()}


@pytest.mark.parametrize("name", ["turbodiffusion_t2v", "turbodiffusion_i2v"])
def test_ui_workflow_exports_runs_and_plays(comfy_server, name):
    require_browser()
    from PIL import Image

    Image.new("RGB", (64, 48), (30, 120, 200)).save(comfy_server.input_dir / "example.png")
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    ARTIFACTS.mkdir(exist_ok=True)
    out = subprocess.run(
        ["node", str(BROWSER_DIR / "ui_check.js"), comfy_server.url, str(REPO / "workflows" / f"{name}.json"),
         str(ARTIFACTS / f"browser-{name}"), json.dumps(tiny_overrides(ui, name))],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, CHROMIUM=CHROMIUM))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result from the browser script:\n{out.stdout}\n{out.stderr}"
    result = json.loads(lines[-1][len("RESULT "):])
    (ARTIFACTS / f"browser-{name}.json").write_text(json.dumps(result, indent=1))

    assert "failure" not in result, result.get("failure")
    assert result["errors"] == [], result["errors"]
    assert result["extensionLoaded"], "web/turbodiffusion.js was not loaded"
    # The UI graph is the API file (model names aside, which the UI keeps as the real files).
    assert without_model_names(result["exported"]) == without_model_names(load_api(f"{name}_api.json"))
    for node_id, node in load_api(f"{name}_api.json").items():
        for key in MODEL_INPUTS:
            if key in node["inputs"]:
                assert result["exported"][node_id]["inputs"][key] == node["inputs"][key]
    assert result["missingWidgets"] == []

    video = result["video"]
    assert video["file"]["format"] == "video/mp4" and video["file"]["subfolder"] == "browser"
    assert video["autoplay"] and video["loop"] and video["muted"] and not video["paused"] and video["visible"]
    assert video["currentTime"] > 0 and (video["width"], video["height"]) == (64, 48)
    assert "/view?" in video["link"] and video["linkText"] == f"browser/{video['file']['filename']}"
    assert read_video_info(comfy_server.output_dir / "browser" / video["file"]["filename"])["frames"] == 5
    assert any("custom Wan" in text for text in result["report"]), "the loader's report is shown on the node"
