"""TurboDiffusion Multi-GPU in a real ComfyUI, with gloo workers on two CPU "devices".

The same prompt with and without the node gives the same latent (fp32 model, dense
attention: max_abs <= 1e-5, the fp32 summation noise of GEMMs over half the rows).
A killed worker fails the prompt with a message that names it, leaves no process
behind, and the next prompt starts the workers again; "Free model and node cache"
(POST /free) stops them.
"""
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from comfyui.helpers import node_of, tiny_prompt
from conftest import max_abs
from turbo_core.client import ExecutionFailed

pytestmark = pytest.mark.comfyui

STARTED = re.compile(r"TurboDiffusion multi-GPU: 2 workers on cpu, cpu \(pids (\d+), (\d+)\)")


def latent_prompt(seed: int, multi_gpu: bool) -> dict:
    prompt = tiny_prompt("turbodiffusion_t2v_api.json", width=48, height=32, frames=5, steps=2)
    node_of(prompt, "TurboDiffusionModelLoader")["inputs"]["weight_dtype"] = "fp32"
    sampler = node_of(prompt, "TurboSampler")["inputs"]
    sampler.update(seed=seed, attention_type="original")
    for node_id in [k for k, v in prompt.items() if v["class_type"] in ("TurboDiffusionVAEDecode",
                                                                          "TurboDiffusionSaveVideo")]:
        del prompt[node_id]
    prompt["8"] = {"class_type": "SaveLatent",
                   "inputs": {"samples": ["5", 0], "filename_prefix": f"multi_gpu/{seed}_{int(multi_gpu)}"}}
    if multi_gpu:
        prompt["9"] = {"class_type": "TurboDiffusionMultiGPU", "inputs": {"devices": "cpu,cpu"}}
        sampler["multi_gpu"] = ["9", 0]
    return prompt


def run_latent(client, comfy_server, prompt):
    from safetensors.torch import load_file

    [entry] = client.run(prompt).outputs["8"]["latents"]
    return load_file(str(comfy_server.output_dir / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def worker_pids(comfy_server) -> list[int]:
    found = STARTED.findall(comfy_server.log_text())
    assert found, "the workers' start is not in the log"
    return [int(p) for p in found[-1]]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_for_log(comfy_server, text: str, after: int, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in comfy_server.log_text()[after:]:
        assert time.monotonic() < deadline, f"{text!r} did not appear in the server log"
        time.sleep(0.05)


def test_multi_gpu_latent_equals_the_single_process_latent(client, comfy_server):
    single = run_latent(client, comfy_server, latent_prompt(606, multi_gpu=False))
    multi = run_latent(client, comfy_server, latent_prompt(606, multi_gpu=True))
    assert multi.shape == single.shape == (1, 16, 2, 4, 6)
    assert max_abs(multi, single) <= 1e-5
    assert all(alive(p) for p in worker_pids(comfy_server))  # kept for the next prompt


def test_a_killed_worker_fails_the_prompt_clearly_and_the_next_prompt_restarts(client, comfy_server):
    run_latent(client, comfy_server, latent_prompt(707, multi_gpu=True))  # workers up (started or kept)
    pids = worker_pids(comfy_server)
    os.kill(pids[1], signal.SIGSTOP)  # rank 1 will not take part: rank 0 waits for it in a collective
    mark = len(comfy_server.log_text())
    ws = client.connect()
    try:
        prompt_id = client.queue(latent_prompt(708, multi_gpu=True))
        wait_for_log(comfy_server, "TurboDiffusion multi-GPU: sampling on cpu, cpu", mark)
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(ExecutionFailed) as info:
            client.wait(ws, prompt_id, timeout=60)
    finally:
        ws.close()
    assert info.value.node_id == "5"
    assert "the worker for cpu (rank 1 of 2) was killed by SIGKILL" in info.value.exception_message
    assert "All workers were stopped; the next run starts them again" in info.value.exception_message
    assert wait_gone(pids), "worker processes left behind"

    run_latent(client, comfy_server, latent_prompt(709, multi_gpu=True))
    fresh = worker_pids(comfy_server)
    assert set(fresh).isdisjoint(pids) and all(alive(p) for p in fresh)


def test_free_models_stops_the_workers(client, comfy_server):
    run_latent(client, comfy_server, latent_prompt(808, multi_gpu=True))
    pids = worker_pids(comfy_server)
    assert all(alive(p) for p in pids)
    request = urllib.request.Request(comfy_server.url + "/free", method="POST",
                                     data=json.dumps({"unload_models": True, "free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    assert wait_gone(pids), "POST /free did not stop the workers"
    assert "TurboDiffusion multi-GPU: workers stopped" in comfy_server.log_text()
