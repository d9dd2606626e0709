"""A real ComfyUI server with this pack and tiny random models, for the tests.

    with ComfyServer.start(workdir) as server:      # or the `comfy_server` pytest fixture
        server.url, server.output_dir, server.models, server.log_text()

ComfyUI comes from COMFYUI_DIR, else .comfy/ComfyUI-2024 (made by setup_comfyui.sh,
which this runs first: a no-op when everything is in place). The ComfyUI tree is left
alone: the pack is linked into a temporary custom_nodes folder and the model folders
are temporary too, all named in an --extra-model-paths-config yaml, under both the
2024 names (unet, clip) and the newest ones (diffusion_models, text_encoders).
The server runs in its own process group and is stopped with it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-TurboDiffusion"
SETUP = REPO / "tests" / "comfyui" / "setup_comfyui.sh"


def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfy" / "ComfyUI-2024")


def ensure_comfyui() -> Path:
    """Run setup_comfyui.sh (installs the 2024 ComfyUI once; honours COMFYUI_DIR)."""
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(SETUP)], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{SETUP} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    path = comfy_dir()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path} (main.py missing)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_paths(workdir: Path) -> Path:
    """The yaml that adds our custom_nodes folder and model folders to ComfyUI's."""
    models = workdir / "models"
    yaml = workdir / "extra_model_paths.yaml"
    yaml.write_text(
        "turbodiffusion_tests:\n"
        f"    base_path: {workdir}\n"
        "    custom_nodes: custom_nodes\n"
        f"    diffusion_models: {models / 'diffusion_models'}\n"
        f"    unet: {models / 'diffusion_models'}\n"
        f"    text_encoders: {models / 'text_encoders'}\n"
        f"    clip: {models / 'text_encoders'}\n"
        f"    vae: {models / 'vae'}\n")
    return yaml


class ComfyServer:
    def __init__(self, workdir: Path, comfy: Path, proc: subprocess.Popen, port: int, log_path: Path,
                 models: dict[str, Path]):
        self.workdir, self.comfy, self.proc, self.port, self.log_path = workdir, comfy, proc, port, log_path
        self.models = models
        self.url = f"http://127.0.0.1:{port}"
        self.output_dir = workdir / "output"
        self.input_dir = workdir / "input"

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 180) -> "ComfyServer":
        from comfyui.tiny_models import write_tiny_models

        workdir = Path(workdir).resolve()
        comfy = ensure_comfyui()
        for sub in ("custom_nodes", "output", "input", "temp", "user"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        link = workdir / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        models = write_tiny_models(workdir / "models")
        yaml = write_extra_paths(workdir)
        port = free_port()
        cmd = [sys.executable, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(yaml), "--output-directory", str(workdir / "output"),
               "--input-directory", str(workdir / "input"), "--temp-directory", str(workdir / "temp")]
        cli_args = (comfy / "comfy" / "cli_args.py").read_text()
        if "--user-directory" in cli_args:
            cmd += ["--user-directory", str(workdir / "user")]
        if "--database-url" in cli_args:
            cmd += ["--database-url", "sqlite:///:memory:"]
        log_path = workdir / "comfyui.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        server = cls(workdir, comfy, proc, port, log_path, models)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n"
                                   f"{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    json.loads(r.read())
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_text()[-4000:]}")
                time.sleep(0.25)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":  # a server with the tiny models, for trying the pack by hand
    import tempfile

    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    with ComfyServer.start(Path(tempfile.mkdtemp(prefix="turbodiffusion-comfyui-"))) as server:
        print(f"ComfyUI with the pack and tiny models: {server.url}  (log: {server.log_path}); Ctrl-C stops it")
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
