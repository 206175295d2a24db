"""Tiny random SD 1.x / 2.x / XL diffusers folders (tests/sd_models.py) read into our model: the sampler gives the
images diffusers' own pipeline gives (same seeds, DDIM steps and guidance; <= 1e-3 mean absolute difference in
[0, 1]), and a single file written from the import reads back the same weights."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sd_models import tiny_sd  # noqa: E402

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {f: tiny_sd(f, root / f) for f in PIPELINES}


@pytest.mark.parametrize("family", list(PIPELINES))
def test_sampler_on_an_imported_model_matches_the_diffusers_pipeline(models, family):
    from pipeline.evaluate.sample import LDMSampler
    prompts, seeds, steps, cfg = ["a red bag", "two shoes"], [3, 4], 6, 5.0
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(models[family]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = LDMSampler(str(models[family]))(prompts, steps=steps, cfg_scale=cfg, seeds=seeds)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    diff = ((ours + 1) / 2 - theirs).abs().mean().item()
    assert diff <= 1e-3, diff
    assert ((ours + 1) / 2 - theirs).abs().max() > 0 or diff == 0  # compared, not skipped


@pytest.mark.parametrize("family", list(PIPELINES))
def test_single_file_round_trip_keeps_every_weight(models, family, tmp_path):
    from safetensors.torch import save_file

    from ldm.convert.sd_folder import read_pipeline
    from ldm.convert.single_file import from_pipeline, to_pipeline
    m = read_pipeline(models[family])
    tensors, meta = from_pipeline(m, m.text_folders)
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), meta)
    back = read_pipeline(to_pipeline(path, tmp_path / "back"))
    assert back.cfg == m.cfg.__class__(**{**m.cfg.__dict__, "conditioning": back.cfg.conditioning})
    for name in ("unet", "vae"):
        a, b = getattr(m, name), getattr(back, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert back.scale_factor == m.scale_factor
    # the text encoders as well: the same embeddings from the re-read folders
    from ldm.text_encoders import load_frozen_text
    e1, e2 = load_frozen_text(str(models[family]), 16), load_frozen_text(str(tmp_path / "back"), 16)
    c1, p1 = e1.embed(["a red bag"])
    c2, p2 = e2.embed(["a red bag"])
    assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(p1, p2, atol=1e-6)
