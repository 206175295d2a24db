"""Inpainting (ldm/kinds/inpaint.py): its config checks and its condition."""
import numpy as np
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConditioningConfig, ConfigError, apply_overrides
from ldm.latent_scale import LatentScale
from pipeline.presets import get_preset


def test_inpaint_conditioning_names_each_contradiction():
    ip = get_preset("demo-inpaint")
    assert ip.validate() and ip.unet.in_channels == 9 and ip.conditioning.concat_channels == 5
    with pytest.raises(ConfigError, match="set conditioning.concat_channels=5"):
        apply_overrides(ip, ["conditioning.concat_channels=3", "unet.in_channels=7"]).validate()
    with pytest.raises(ConfigError, match="set unet.num_classes=null and unet.context_dim=null"):
        apply_overrides(ip, ["unet.num_classes=3"]).validate()


def test_inpaint_condition_draws_one_cached_variant_per_row():
    cfg = ConditioningConfig(kind="inpaint", concat_channels=5, cond_drop_prob=0.0)
    c = Conditioner(cfg, latent_scale=LatentScale(scale=2.0, shift=0.5))
    n, k = 6, 3
    lat = torch.arange(k, dtype=torch.float32).view(1, k, 1, 1, 1).expand(n, k, 4, 2, 2).reshape(n, -1)
    holes = torch.zeros(n, k, 2, 2, dtype=torch.uint8)
    holes[:, :, 0, 0] = 1
    batch = {"latent_mean": torch.zeros(n, 16), "inpaint_latent": lat, "inpaint_mask": holes.reshape(n, -1)}
    cond = c.batch(batch, torch.zeros(n, dtype=torch.bool), torch.Generator().manual_seed(0))["concat"]
    assert cond.shape == (n, 5, 2, 2)
    picked = cond[:, 0, 0, 0] / 2.0 + 0.5  # the variant index, back through the latent scale
    assert set(picked.tolist()) <= {0.0, 1.0, 2.0} and len(set(picked.tolist())) > 1
    assert (cond[:, 4, 0, 0] == 1).all() and (cond[:, 4, 1, 1] == 0).all()
    encode = lambda px: px.permute(0, 3, 1, 2).float()[:, :1].repeat(1, 4, 1, 1)[..., ::2, ::2] / 255  # noqa: E731
    c.encode, c.f = encode, 2
    image, mask = np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    cond, uncond = c.prompts([{"image": image, "mask": mask}])
    assert uncond is None and cond["concat"].shape == (1, 5, 2, 2)
    assert cond["concat"][0, 4].tolist() == [[0, 0], [0, 1]]
    assert float(cond["concat"][0, 0, 1, 1]) == pytest.approx((128 / 255 - 0.5) * 2, abs=1e-6)  # the gray hole
