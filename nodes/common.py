"""What every node shares: the engine import, ComfyUI's model folders, devices, memory.

Nothing here imports torch or ComfyUI at module import: ComfyUI imports the pack at
start-up (and the tests import it without ComfyUI), so both are imported inside the
functions that need them.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = "TurboDiffusion"
log = logging.getLogger("TurboDiffusion")

# Custom types passed between this pack's nodes (private: native nodes never see them).
DIT = "TURBO_DIT"  # turbo_core WanDiT (with .load_report), on the CPU between runs
VAE = "TURBO_VAE"  # turbo_core WanVAE
TEXT_ENCODER = "TURBO_TEXT_ENCODER"  # turbo_core TextEncoder (umT5 + tokenizer)
I2V = "TURBO_I2V"  # dict: y [1, 20, T, H/8, W/8] float32 CPU, width, height, num_frames
MULTI_GPU = "TURBO_MULTI_GPU"  # dict: devices ["cuda:0", "cuda:1"] for turbo_core.workers

# ComfyUI folder names (2024 name, newest name) this pack lists files from.
MODEL_FOLDERS = {"diffusion_models": "unet", "text_encoders": "clip"}


def ensure_engine() -> None:
    """Make `import turbo_core` resolve to this pack's engine.

    ComfyUI imports the pack by folder path, so the pack root is not on sys.path.
    Registering just the engine package (instead of adding the whole pack folder to
    sys.path) keeps the pack's `nodes/` from shadowing ComfyUI's own `nodes` module.
    """
    engine_dir = os.path.join(PACK_DIR, "turbo_core")
    mod = sys.modules.get("turbo_core")
    if mod is not None:
        if os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != engine_dir:
            log.warning("TurboDiffusion: another 'turbo_core' (%s) is already imported; using it",
                        getattr(mod, "__file__", mod))
        return
    spec = importlib.util.spec_from_file_location(
        "turbo_core", os.path.join(engine_dir, "__init__.py"), submodule_search_locations=[engine_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["turbo_core"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["turbo_core"]
        raise


def register_model_folders() -> None:
    """List the same files in the 2024 ComfyUI (unet/clip) and the newest (diffusion_models/text_encoders).

    The newest ComfyUI has the new names and maps the old ones onto them; the 2024 one
    knows only the old names. There the new name becomes an alias of the old folder
    list (paths an extra_model_paths.yaml gave under the new name are merged in).
    """
    try:
        import folder_paths
    except ImportError:  # not inside ComfyUI (tests, CLI)
        return
    table = folder_paths.folder_names_and_paths
    for new, old in MODEL_FOLDERS.items():
        if old not in table or table.get(new) is table[old]:
            continue  # newest ComfyUI (legacy names are mapped, not keys), or already done
        old_paths, old_exts = table[old]
        for path in table.get(new, ([], set()))[0]:
            if path not in old_paths:
                old_paths.append(path)
        table[new] = table[old] = (old_paths, old_exts or set(folder_paths.supported_pt_extensions))
        getattr(folder_paths, "filename_list_cache", {}).pop(new, None)


def model_files(folder: str) -> list[str]:
    import folder_paths

    register_model_folders()
    return folder_paths.get_filename_list(folder)


def model_path(folder: str, name: str) -> str:
    import folder_paths

    register_model_folders()
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in ComfyUI's models/{folder} folder (any more): "
                                f"put the file there and press Refresh (r)")
    return path


def compute_device():
    """The device ComfyUI computes on (the CPU under --cpu)."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def module_bytes(*modules) -> int:
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            total += t.numel() * t.element_size()
    return total


def make_room(device, nbytes: int) -> None:
    """Ask ComfyUI to unload its own models until `nbytes` (plus headroom) fit on `device`."""
    import comfy.model_management as mm

    if getattr(device, "type", "cpu") == "cpu":
        return
    mm.free_memory(int(nbytes * 1.2) + 1024 ** 3, device)


def release() -> None:
    """Give cached GPU memory back after a run (also after a failed or interrupted one)."""
    import comfy.model_management as mm

    mm.soft_empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel / POST /interrupt."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
