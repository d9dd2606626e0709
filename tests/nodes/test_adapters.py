"""The node adapters' own logic, without a ComfyUI (the server tests run them for real)."""
import sys
import types

import pytest
import torch

from nodes.conditioning import TEXT_LEN, context_from_conditioning
from nodes.validation import output_subpath_problem, validate_video_size


def test_native_conditioning_is_zero_padded_to_512_rows():
    cond = torch.randn(1, 77, 4096)
    context = context_from_conditioning([[cond, {"pooled_output": None}]], 4096)
    assert context.shape == (1, TEXT_LEN, 4096)
    assert torch.equal(context[:, :77], cond) and not context[:, 77:].any()


def test_full_length_conditioning_is_used_as_is():
    cond = torch.randn(1, 512, 64)
    assert context_from_conditioning([[cond, {}], [torch.zeros(1, 512, 64), {}]], 64) is cond


def test_conditioning_from_another_text_encoder_is_named():
    with pytest.raises(ValueError, match="768 features per token but this model reads 4096.*umT5"):
        context_from_conditioning([[torch.zeros(1, 77, 768), {}]], 4096)
    with pytest.raises(ValueError, match="expected a CONDITIONING"):
        context_from_conditioning([], 4096)


@pytest.mark.parametrize("prefix", ["../x", "../../x", "a/../../x", "/tmp/x", "~/x", "", "  ", "."])
def test_prefixes_that_leave_the_output_folder(prefix, tmp_path):
    assert output_subpath_problem(prefix, str(tmp_path)) is not None


@pytest.mark.parametrize("prefix", ["x", "videos/x", "a/../b/x", "%width%x%height%/clip"])
def test_prefixes_inside_the_output_folder(prefix, tmp_path):
    assert output_subpath_problem(prefix, str(tmp_path)) is None


def test_video_size_messages():
    assert validate_video_size(832, 480, 81) is True
    assert validate_video_size(None, None, None) is True  # wired from another node: checked at run time
    assert validate_video_size(830, 480, 80) == ("width 830: use 816 or 832 (width and height must be multiples "
                                                 "of 16); 80 frames: use 77 or 81 (frame counts must be 4k+1, e.g. 81)")
    assert "at most 4096" in validate_video_size(8192, 480, 81)


def test_2024_folder_names_become_aliases(monkeypatch):
    """Old ComfyUI: diffusion_models/text_encoders list the unet/clip folders (plus their own)."""
    from nodes.common import register_model_folders

    exts = {".safetensors", ".pth"}
    fake = types.SimpleNamespace(
        supported_pt_extensions=exts, filename_list_cache={},
        folder_names_and_paths={"unet": (["/m/unet"], exts), "clip": (["/m/clip"], exts),
                                "diffusion_models": (["/x/dm"], set())})
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    register_model_folders()
    register_model_folders()  # idempotent
    table = fake.folder_names_and_paths
    assert table["diffusion_models"] is table["unet"] and table["unet"][0] == ["/m/unet", "/x/dm"]
    assert table["text_encoders"][0] == ["/m/clip"] and table["text_encoders"][1] == exts


def test_newest_folder_names_are_left_alone(monkeypatch):
    from nodes.common import register_model_folders

    table = {"diffusion_models": (["/m/unet", "/m/diffusion_models"], {".pth"}), "text_encoders": (["/m/te"], {".pth"})}
    fake = types.SimpleNamespace(supported_pt_extensions={".pth"}, filename_list_cache={},
                                 folder_names_and_paths=dict(table))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    register_model_folders()
    assert fake.folder_names_and_paths == table
