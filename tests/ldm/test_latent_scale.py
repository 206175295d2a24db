"""The latent rescaling of paper 4.3.2 (ldm/latent_scale.py), one value or one per channel."""
import pytest
import torch

from ldm.config import ConfigError, apply_overrides, get_preset
from ldm.latent_scale import LatentScale


def test_latent_scale_goes_both_ways():
    s = LatentScale.choose(0.0, [0.5, 1.5], 2.0)
    assert s == LatentScale(2.0, 1.0)
    z = torch.randn(2, 2, 4, 4)
    assert torch.allclose(s.to_latent(s.to_diffusion(z)), z, atol=1e-6)
    assert LatentScale.from_json(s.to_json()) == s
    assert LatentScale.choose(0.18215, [0.5], 0.2) == LatentScale(0.18215, 0.0)  # a fixed scale has no shift
    # SD's 0.18215 on a self-trained autoencoder whose latents have std 0.5 (1/std = 2): std 0.09, refused
    with pytest.raises(ConfigError, match="scale_factor=0.18215 gives these latents a std of 0.0911"):
        LatentScale.choose(0.18215, [0.5], 2.0)
    assert LatentScale.choose(0.18215, [0.0], 0.0) == LatentScale(0.18215, 0.0)  # no measured scale: nothing to check


def test_latent_scale_per_channel_makes_every_channel_zero_mean_unit_variance():
    mean, std = [-6.8, 2.0, 0.3], [4.7, 0.6, 2.0]  # channels far apart, as the demo's first stage gives
    z = torch.randn(4096, 3, 2, 2) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    overall = 1 / float(z.std())
    glob = LatentScale.choose(0.0, mean, overall)
    per = LatentScale.choose(0.0, mean, overall, std, per_channel=True)
    assert per == LatentScale(tuple(1 / s for s in std), tuple(mean))
    g, c = glob.to_diffusion(z), per.to_diffusion(z)
    assert g.mean((0, 2, 3)).abs().max() > 0.5 and g.std((0, 2, 3)).min() < 0.3  # one scale leaves them apart
    assert torch.allclose(c.mean((0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(c.std((0, 2, 3)), torch.ones(3), atol=0.05)
    assert torch.allclose(per.to_latent(c), z, atol=1e-4)
    assert LatentScale.from_json(per.to_json()) == per and "per channel" in per.describe()
    with pytest.raises(ConfigError, match="latent_channel_std"):
        LatentScale.choose(0.0, mean, overall, None, per_channel=True)
    with pytest.raises(ConfigError, match="latent_norm='channel'"):
        apply_overrides(get_preset("tiny"), ["latent_norm=channel", "scale_factor=0.18215"]).validate()
