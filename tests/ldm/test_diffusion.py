import math

import pytest
import torch

from ldm.config import DiffusionConfig, get_preset
from ldm.diffusion import (Schedule, diffusion_loss, loss_weight, make_betas, q_sample, rescale_zero_terminal_snr,
                           sample_noise, training_target)
from ldm.unet import UNetModel


def test_schedules_match_closed_forms():
    lin = make_betas("linear", 1000, 1e-4, 0.02)
    f64 = torch.float64
    assert torch.isclose(lin[0], torch.tensor(1e-4, dtype=f64))
    assert torch.isclose(lin[-1], torch.tensor(0.02, dtype=f64))
    assert torch.allclose(lin[1:] - lin[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    sl = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert torch.allclose(sl.sqrt(), torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64))
    cos = make_betas("cosine", 1000)
    abar = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):
        assert abs(abar[t].item() - f(t + 1) / f(0)) < 1e-9
    with pytest.raises(ValueError):
        make_betas("quadratic", 10)


def test_zero_terminal_snr_rescale():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    new = rescale_zero_terminal_snr(betas)
    ab_old, ab_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - new, 0)
    assert ab_new[-1].abs() < 1e-12  # SNR(T) = 0
    assert torch.isclose(ab_new[0], ab_old[0])  # first step unchanged
    assert (ab_new[1:] <= ab_new[:-1]).all()


def test_q_sample_and_targets():
    s = Schedule.from_config(DiffusionConfig(timesteps=100))
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 10, 50, 99])
    zt = q_sample(x0, t, eps, s.alphas_cumprod)
    a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(zt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    v = training_target(x0, eps, t, s.alphas_cumprod, "v")
    # v-parameterisation identities: x0 = sqrt(a) z_t - sqrt(1-a) v ; eps = sqrt(1-a) z_t + sqrt(a) v
    assert torch.allclose(a.sqrt() * zt - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose((1 - a).sqrt() * zt + a.sqrt() * v, eps, atol=1e-5)
    assert torch.equal(training_target(x0, eps, t, s.alphas_cumprod, "eps"), eps)
    assert torch.equal(training_target(x0, eps, t, s.alphas_cumprod, "x0"), x0)


def test_min_snr_weights_per_target():
    snr = torch.tensor([0.1, 1.0, 5.0, 100.0])
    g = 5.0
    # all three express the same x0-space weight min(SNR, gamma): eps-loss = SNR * x0-loss, v-loss = (SNR+1) * x0-loss
    x0_w = loss_weight(snr, "x0", "min_snr", g)
    assert torch.allclose(x0_w, snr.clamp(max=g))
    assert torch.allclose(loss_weight(snr, "eps", "min_snr", g) * snr, x0_w)
    assert torch.allclose(loss_weight(snr, "v", "min_snr", g) * (snr + 1), x0_w)
    assert torch.equal(loss_weight(snr, "eps", "simple"), torch.ones(4))


def test_offset_noise_adds_per_channel_constant():
    x = torch.zeros(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    n = sample_noise(x, 0.5, g)
    per_channel_mean_std = n.mean(dim=(2, 3)).std()
    assert per_channel_mean_std > 0.3  # ~0.5 from the offset, vs ~1/8 without
    assert sample_noise(x, 0.0, torch.Generator().manual_seed(0)).mean(dim=(2, 3)).std() < 0.25


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_diffusion_loss_backward(param):
    cfg = get_preset("tiny")
    unet = UNetModel(cfg.unet)
    dcfg = DiffusionConfig(timesteps=100, parameterization=param, loss_weighting="min_snr", offset_noise=0.05)
    loss = diffusion_loss(unet, torch.randn(3, 4, 8, 8), dcfg, Schedule.from_config(dcfg),
                          generator=torch.Generator().manual_seed(0), context=torch.randn(3, 5, 32))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert unet.out[-1].weight.grad.abs().sum() > 0
