"""The Stable Diffusion family in and out, through the jobs' entry points, for a tiny random SD 1.x, SD 2.x and SDXL:
shards -> a latent cache encoded with the model's own VAE and text encoder(s) (from its diffusers folder) ->
train_ldm --init-from its single-file checkpoint (the config comes with it) -> export as a diffusers folder, which
diffusers' own pipeline loads and samples as jobs/sample.py does (<= 1e-3 in [0, 1]) -> export as a single file, which
--init-from reads back weight for weight."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sd_models import tiny_sd  # noqa: E402

from pipeline.cache.reader import read_manifest  # noqa: E402
from pipeline.data.make_shards import fashion_records, write_shards  # noqa: E402
from pipeline.data.preprocess import PreprocessConfig  # noqa: E402
from pipeline.encode.flow import EncodeOptions, run_encode  # noqa: E402
from pipeline.train.ldm_driver import run_train  # noqa: E402
from pipeline.train.options import TrainOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-shards")
    write_shards(fashion_records("train", 32, 0, "png"), str(root), "webdataset", 32, seed=0)
    return str(root)


def single_file(folder: Path, out: Path) -> Path:
    """The tiny model as a single file with no configs or tokenizers in it (as one from elsewhere would be)."""
    from safetensors.torch import save_file

    from ldm.convert.sd_folder import read_pipeline
    from ldm.convert.single_file import from_pipeline
    m = read_pipeline(folder)
    tensors, meta = from_pipeline(m, m.text_folders)
    keep = {k: v for k, v in meta.items() if k in ("ldm_ray.config", "ldm_ray.scale_factor")}  # tiny heads: config
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), keep)
    return out


@pytest.mark.parametrize("family", list(PIPELINES))
def test_sd_model_imported_trained_and_exported(ray_local, shards, tmp_path, family):
    from pipeline.export.formats import export_model
    from pipeline.evaluate.sample import LDMSampler
    from pipeline.train.init_weights import load_init
    folder = tiny_sd(family, tmp_path / "sd")
    one = single_file(folder, tmp_path / f"{family}.safetensors")
    cache = str(tmp_path / "latents")
    run_encode(EncodeOptions(input=shards, output=cache, autoencoder=str(folder), text_encoder=str(folder),
                             max_length=16, store_text_embeddings=family == "sdxl",
                             preprocess=PreprocessConfig(resolution=16), batch_size=32), log=lambda *a: None)
    m = read_manifest(cache)
    assert m["autoencoder"]["scaling_factor"] == 0.5 and m["text_encoder"]["mask_padding"] is False
    tokenizers = [str(folder / "tokenizer")] + ([str(folder / "tokenizer_2")] if family == "sdxl" else [])
    from pipeline.common.sd_import import resolve_sd
    resolve_sd(str(one), tuple(tokenizers))  # a single file names no tokenizer: converted once, with the folder's
    s = run_train(TrainOptions(latents=cache, init_from=str(one), num_workers=1, zero_stage=2, max_steps=2,
                               batch_size=8, lr=1e-4, warmup_steps=1, checkpoint_every=2, sample_every=0,
                               ema_decay=0.5, log_every=1, storage_path=str(tmp_path / "runs"), name=family))
    assert s["step"] == 2
    out = export_model(s["export"], "diffusers", str(tmp_path / "exported"), log=lambda *a: None)
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seeds, steps, cfg = [5, 6], 4, 4.0
    theirs = pipe(["a photo of a bag"] * 2, num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                  generator=[torch.Generator().manual_seed(x) for x in seeds]).images
    ours = LDMSampler(s["export"])(["a photo of a bag"] * 2, steps=steps, cfg_scale=cfg, seeds=seeds)
    assert ((ours + 1) / 2 - theirs).abs().mean().item() <= 1e-3
    # jobs/export.py --format single-file, read back by --init-from: the export's EMA UNet, weight for weight
    path = tmp_path / "continued.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--model", str(tmp_path / "runs" / family),
                        "--format", "single-file", "--out", str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from ldm.checkpoint import load_components
    comps, _, _ = load_components(s["export"])
    back = load_init(str(path))
    assert all(torch.equal(back.weights[f"unet.{k}"], v) for k, v in comps["ema_unet"].items())
