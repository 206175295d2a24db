"""Telling a Stable Diffusion model from an ldm-ray export by its contents, locally and on s3:// (an export is a
.safetensors file too: its name says nothing)."""
import torch
from safetensors.torch import save_file

from pipeline.common.sd_import import is_sd


def test_an_export_is_not_taken_for_a_stable_diffusion_single_file_locally_or_on_s3(s3_server, tmp_path):
    import s3fs
    ours, theirs = tmp_path / "model.safetensors", tmp_path / "sd.safetensors"
    save_file({"w": torch.zeros(2)}, str(ours), {"format": "ldm-ray-ldm"})
    save_file({"model.diffusion_model.w": torch.zeros(2)}, str(theirs))
    fs = s3fs.S3FileSystem()
    fs.mkdir("sdcheck")
    fs.put(str(ours), "sdcheck/run/export/model.safetensors")
    fs.put(str(theirs), "sdcheck/sd/sd.safetensors")
    assert not is_sd(str(ours)) and is_sd(str(theirs))
    assert not is_sd("s3://sdcheck/run/export/model.safetensors") and is_sd("s3://sdcheck/sd/sd.safetensors")
    assert not is_sd("s3://sdcheck/run")  # a run dir: no model_index.json
