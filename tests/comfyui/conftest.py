"""Fixtures for the tests that drive a real ComfyUI server (see server.py)."""
from __future__ import annotations

import shutil

import pytest

from comfyui.server import REPO, ComfyServer

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One ComfyUI for the whole session. Never skipped: if it cannot start, the tests fail."""
    server = ComfyServer.start(tmp_path_factory.mktemp("comfyui"))
    try:
        yield server
    finally:
        server.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(server.log_path, ARTIFACTS / "comfyui-server.log")


@pytest.fixture
def client(comfy_server):
    from turbo_core.client import ComfyClient

    return ComfyClient(comfy_server.url, timeout=60)
