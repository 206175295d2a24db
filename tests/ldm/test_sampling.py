import pytest
import torch

from ldm.diffusion import Schedule
from ldm.config import DiffusionConfig
from ldm.flow import flow_timesteps
from ldm.sampling import (FLOW_SAMPLERS, SAMPLERS, all_timesteps, ddim_timesteps, generate, guided, predict_eps_x0,
                          sample_ddim, sample_ddpm, sample_dpmpp_2m)

SCHED = Schedule.from_config(DiffusionConfig(timesteps=1000))
AC = SCHED.alphas_cumprod


def perfect(x_star, param):
    """The ideal denoiser for a single data point x*: predicts exactly what would reach x*."""
    def model(x, t):
        a = AC[t[0]].item()
        eps = (x - a ** 0.5 * x_star) / (1 - a) ** 0.5
        return {"eps": eps, "x0": x_star.expand_as(x), "v": a ** 0.5 * eps - (1 - a) ** 0.5 * x_star}[param]
    return model


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_predict_eps_x0_inverts_each_parameterisation(param):
    x0, eps, a = torch.randn(2, 4), torch.randn(2, 4), 0.3
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    out = {"eps": eps, "x0": x0, "v": a ** 0.5 * eps - (1 - a) ** 0.5 * x0}[param]
    e, z = predict_eps_x0(out, x, a, param)
    assert torch.allclose(e, eps, atol=1e-5) and torch.allclose(z, x0, atol=1e-5)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddim_eta", "ddpm", "ddpm_respaced", "dpmpp_2m"])
def test_perfect_denoiser_reaches_the_data_point(sampler, param):
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(1, 3, 4, 4, generator=g)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    m = perfect(x_star, param)
    ts = ddim_timesteps(1000, 20)
    if sampler == "ddim":
        out = sample_ddim(m, x_T, ts, AC, parameterization=param, final_alpha_cumprod=1.0)
    elif sampler == "ddim_eta":
        out = sample_ddim(m, x_T, ts, AC, eta=1.0, parameterization=param, final_alpha_cumprod=1.0, generator=g)
    elif sampler == "ddpm":
        out = sample_ddpm(m, x_T, all_timesteps(1000), AC, parameterization=param, generator=g)
    elif sampler == "ddpm_respaced":
        out = sample_ddpm(m, x_T, ts, AC, parameterization=param, generator=g)
    else:
        out = sample_dpmpp_2m(m, x_T, ts, AC, parameterization=param)
    assert (out - x_star).abs().max() < 1e-3, (out - x_star).abs().max()


def test_ddim_eta_one_from_the_zero_snr_terminal_step_stays_real():
    """Zero-terminal SNR (alpha_bar_999 = 0) with DDIM eta 1 starting at t=999: 1 - a_prev - sigma^2 is 0 up to
    rounding, and a negative rounding error once made `** 0.5` complex (a crash in the UNet's next conv)."""
    cfg = DiffusionConfig(timesteps=1000, zero_terminal_snr=True, parameterization="v")
    ac = Schedule.from_config(cfg).alphas_cumprod
    assert ac[-1] == 0
    x_star = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):  # the ideal v-denoiser for x* under this schedule
        a = ac[t[0]].item()
        return a ** 0.5 * (x - a ** 0.5 * x_star) / (1 - a) ** 0.5 - (1 - a) ** 0.5 * x_star
    ts = torch.tensor([999, 749, 499, 249, 0])
    for t_next in range(740, 760):  # a few neighbours of the second step: the rounding goes either way
        ts[1] = t_next
        out = sample_ddim(model, torch.randn(2, 3, 4, 4), ts, ac, eta=1.0, parameterization="v",
                          final_alpha_cumprod=1.0, generator=torch.Generator().manual_seed(1))
        assert not out.is_complex() and (out - x_star).abs().max() < 1e-3


def test_ddim_default_ends_at_alpha_bar_0_like_compvis():
    g = torch.Generator().manual_seed(0)  # seeded: the bound below scales with |x*|, so an unseeded draw could pass
    x_star = torch.randn(1, 3, 4, 4, generator=g)  # or fail by the order the tests ran in
    out = sample_ddim(perfect(x_star, "eps"), torch.randn(1, 3, 4, 4, generator=g), ddim_timesteps(1000, 10), AC)
    assert (out - x_star).abs().max() < 0.1  # within sqrt(1 - alpha_bar_0) ~ 0.03 of x*


def test_ddim_timesteps_leading():
    assert ddim_timesteps(1000, 4).tolist() == [751, 501, 251, 1]
    # as many steps as training timesteps: each of 999..0 exactly once (the +1 offset would repeat 999)
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    for n in (1, 3, 7, 333, 999):
        ts = ddim_timesteps(1000, n).tolist()
        assert len(set(ts)) == n and 0 <= min(ts) and max(ts) <= 999 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError, match="DDIM steps must be 1..1000"):
        ddim_timesteps(1000, 1001)


def _cond_model(x, t, context=None):
    return x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_cfg_scale_one_equals_conditional_model():
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 10)
    cond, uncond = {"context": torch.randn(3, 5, 8)}, {"context": torch.zeros(3, 5, 8)}
    assert torch.equal(guided(_cond_model, cond, uncond, 1.0)(x, t), _cond_model(x, t, **cond))
    out = guided(_cond_model, cond, uncond, 3.0)(x, t)
    u, c = _cond_model(x, t, **uncond), _cond_model(x, t, **cond)
    assert torch.allclose(out, u + 3.0 * (c - u), atol=1e-6)


def test_cfg_with_real_unet_scale_one():
    from ldm.config import get_preset
    from ldm.unet import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(get_preset("tiny").unet).eval()
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
    cond, uncond = {"context": torch.randn(2, 6, 32)}, {"context": torch.zeros(2, 6, 32)}
    with torch.no_grad():
        assert torch.allclose(guided(unet, cond, uncond, 1.0)(x, t), unet(x, t, **cond))
        assert not torch.allclose(guided(unet, cond, uncond, 4.0)(x, t), unet(x, t, **cond))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_inpainting_keeps_known_region(sampler):
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(1, 3, 8, 8, generator=g)
    known = torch.randn(1, 3, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    ts = ddim_timesteps(1000, 10)
    m = perfect(x_star, "eps")
    kw = dict(mask=mask, x0_known=known, generator=g)
    out = {"ddim": lambda: sample_ddim(m, torch.randn(1, 3, 8, 8, generator=g), ts, AC, final_alpha_cumprod=1.0, **kw),
           "ddpm": lambda: sample_ddpm(m, torch.randn(1, 3, 8, 8, generator=g), ts, AC, **kw),
           "dpmpp_2m": lambda: sample_dpmpp_2m(m, torch.randn(1, 3, 8, 8, generator=g), ts, AC, **kw)}[sampler]()
    assert torch.equal(out[..., :4], known[..., :4])
    assert (out[..., 4:] - x_star[..., 4:]).abs().max() < 1e-3


def test_every_sampler_takes_one_signature_and_generate_dispatches_by_name():
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(1, 3, 4, 4, generator=g)
    ts = ddim_timesteps(1000, 20)
    flow_ts = flow_timesteps(20)
    toward = lambda x, t: (x - x_star) / t.view(-1, 1, 1, 1)  # noqa: E731 - a flow model's velocity toward x*
    for name, fn in SAMPLERS.items():
        flow = name in FLOW_SAMPLERS
        out = fn(toward if flow else perfect(x_star, "eps"), torch.randn(2, 3, 4, 4, generator=g),
                 flow_ts if flow else ts, None if flow else AC, parameterization="flow" if flow else "eps",
                 generator=g, noises=None, mask=None, x0_known=None, callback=None)
        assert out.shape == (2, 3, 4, 4), name

    class Uncond:
        def prompts(self, prompts):
            return {}, {}

    from ldm.latent_scale import LatentScale
    img = generate(perfect(x_star, "eps"), Uncond(), LatentScale(2.0, 0.5), lambda z: z, ["a", "b"], (3, 4, 4), AC,
                   steps=20, sampler="dpmpp_2m")
    assert torch.allclose(img, (x_star / 2.0 + 0.5).clamp(-1, 1).expand(2, -1, -1, -1), atol=1e-3)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        generate(perfect(x_star, "eps"), Uncond(), LatentScale(), lambda z: z, ["a"], (3, 4, 4), AC, sampler="lms")
    # DDIM's eta: with eta > 0 each step adds fresh noise, so two seeds differ where eta 0 is deterministic
    ddim = dict(steps=10, sampler="ddim")
    a0, b0 = (generate(lambda x, t: torch.zeros_like(x), Uncond(), LatentScale(), lambda z: z, ["a"], (3, 4, 4), AC,
                       seeds=[0], eta=0.0, **ddim) for _ in range(2))
    a1 = generate(lambda x, t: torch.zeros_like(x), Uncond(), LatentScale(), lambda z: z, ["a"], (3, 4, 4), AC,
                  seeds=[0], eta=1.0, seed=1, **ddim)
    assert torch.equal(a0, b0) and not torch.allclose(a0, a1)
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's: the dpmpp_2m sampler takes none"):
        generate(perfect(x_star, "eps"), Uncond(), LatentScale(), lambda z: z, ["a"], (3, 4, 4), AC,
                 sampler="dpmpp_2m", eta=0.5)
    # a larger latent than the model's: the convolutional model samples it (paper 4.3.2)
    big = generate(lambda x, t: torch.zeros_like(x), Uncond(), LatentScale(), lambda z: z, ["a"], (3, 8, 16), AC,
                   **ddim)
    assert big.shape == (1, 3, 8, 16)
