"""Super-resolution (ldm/kinds/lowres.py): its config checks and its condition."""
import numpy as np
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConditioningConfig, ConfigError, apply_overrides
from pipeline.presets import get_preset


def test_lowres_conditioning_names_each_contradiction():
    sr = get_preset("demo-sr")
    assert sr.validate() and sr.unet.in_channels == 7 and sr.conditioning.lowres_factor == 4
    with pytest.raises(ConfigError, match="set conditioning.concat_channels=3"):
        apply_overrides(sr, ["conditioning.concat_channels=0", "unet.in_channels=4"]).validate()
    with pytest.raises(ConfigError, match="set unet.num_classes=null"):
        apply_overrides(sr, ["conditioning.lowres_noise_max=0", "conditioning.lowres_noise_sample=0"]).validate()
    with pytest.raises(ConfigError, match="lowres_noise_sample=400 must be in"):
        apply_overrides(sr, ["conditioning.lowres_noise_sample=400"]).validate()
    with pytest.raises(ConfigError, match="lowres_factor=3 must divide autoencoder.resolution=32"):
        apply_overrides(sr, ["conditioning.lowres_factor=3"]).validate()


def test_lowres_condition_meets_the_latent_noised_to_its_level():
    """SR (§4.4): a 4x4 low-res image becomes an 8x8 concat condition on an f=2 model (the spatial rescaler),
    noised by SD's x4-upscaler augmentation, with the level as y; level 0 is nearly clean (noise std 0.01);
    sampling is seeded."""
    cfg = ConditioningConfig(kind="lowres", concat_channels=3, lowres_factor=4, lowres_noise_max=350,
                             lowres_noise_sample=20, cond_drop_prob=0.0)
    c = Conditioner(cfg, downsample_factor=2)
    images = torch.randint(0, 256, (3, 4, 4, 3), dtype=torch.uint8)
    clean = c.kind.condition(c, images, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 127.5 - 1, size=(8, 8),
                                          mode="bicubic", align_corners=False)
    assert clean["concat"].shape == (3, 3, 8, 8) and (clean["concat"] - ref).abs().max() < 0.05
    noisy = c.kind.condition(c, images, torch.full((3,), 350), torch.Generator().manual_seed(0))["concat"]
    assert (noisy - ref).std() > 0.3 and noisy.shape == ref.shape
    g = torch.Generator().manual_seed(1)
    batch = c.batch({"lowres": images.reshape(3, -1)}, torch.tensor([False, True, False]), g)
    assert batch["y"].min() >= 0 and batch["y"].max() <= 350 and batch["concat"][1].abs().sum() == 0  # dropped
    cond, uncond = c.prompts([np.asarray(im) for im in images])
    again, _ = c.prompts([np.asarray(im) for im in images])
    assert uncond is None and cond["y"].tolist() == [20] * 3 and torch.equal(cond["concat"], again["concat"])
