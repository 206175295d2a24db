"""Rectified flow (ldm/flow.py) and its samplers (ldm/sampling.py: euler, heun)."""
import math

import pytest
import torch

from ldm.config import ConfigError, DiffusionConfig
from ldm.diffusion import Schedule, diffusion_loss, sample_timesteps
from ldm.flow import FLOW_TIME_SCALE, flow_timesteps, interpolate, sample_t, velocity
from ldm.latent_scale import LatentScale
from ldm.sampling import generate, resolve_sampler, sample_euler, sample_heun
from pipeline.presets import load_config

FLOW = DiffusionConfig(objective="flow")


def test_the_path_runs_from_data_to_noise_with_the_velocity_as_its_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(interpolate(x0, eps, 0 * ones), x0) and torch.equal(interpolate(x0, eps, ones), eps)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-3
    finite = (interpolate(x0.double(), eps.double(), t + h) - interpolate(x0.double(), eps.double(), t - h)) / (2 * h)
    torch.testing.assert_close(finite, velocity(x0, eps).double())


def test_timestep_samplings_draw_their_distributions_reproducibly():
    n = 20000
    u = sample_t(n, FLOW, torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    ln = DiffusionConfig(objective="flow", timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = sample_t(n, ln, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    again = sample_timesteps(n, Schedule.from_config(ln), torch.Generator().manual_seed(0))
    assert torch.equal(t, again)  # the training loop's entry point draws the same from the same generator


def test_the_loss_is_zero_for_the_true_velocity_and_the_network_sees_scaled_time():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95], dtype=torch.float64)
    seen = []

    def oracle(xt, time):  # knows eps: the velocity that the straight path through x_t has
        seen.append(time)
        tt = (time / FLOW_TIME_SCALE).view(-1, 1, 1, 1)
        return (eps - xt) / (1 - tt)
    loss = diffusion_loss(oracle, x0, FLOW, Schedule.from_config(FLOW), t=t, noise=eps)
    assert loss.shape == (4,) and loss.max() < 1e-8
    torch.testing.assert_close(seen[0], (t * FLOW_TIME_SCALE).float())


def test_a_tiny_unet_takes_flow_gradients():
    cfg = load_config("tiny", overrides=("conditioning.kind=none", "unet.context_dim=null", "diffusion.objective=flow",
                                         "diffusion.timestep_sampling=logit_normal"))
    from ldm.model import LatentDiffusion
    net = LatentDiffusion(cfg)
    loss = diffusion_loss(net, torch.randn(2, 4, 8, 8), cfg.diffusion, Schedule.from_config(cfg.diffusion),
                          generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in net.unet.parameters() if p.requires_grad)


def gaussian_velocity(s: float):
    """The exact velocity field when the data are N(0, s^2): x_t ~ N(0, (1-t)^2 s^2 + t^2) and
    v(x, t) = E[eps - x0 | x_t] = x (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2); the ODE maps x_1 to s x_1."""
    def model(x, t):
        tt = t.double().view(-1, 1, 1, 1)
        return (x * (tt - (1 - tt) * s ** 2) / ((1 - tt) ** 2 * s ** 2 + tt ** 2)).to(x.dtype)
    return model


def test_euler_and_heun_integrate_the_ode_heun_to_second_order():
    x1 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 0.3
    err = {}
    for name, fn in (("euler", sample_euler), ("heun", sample_heun)):
        err[name] = [(fn(gaussian_velocity(s), x1, flow_timesteps(n)) - s * x1).abs().max().item() for n in (8, 16)]
    assert err["heun"][1] < 0.2 * err["euler"][1], err  # far closer at the same steps
    assert err["euler"][0] / err["euler"][1] > 1.6 and err["heun"][0] / err["heun"][1] > 3.0, err  # orders 1 and 2


def test_flow_samplers_keep_an_inpainting_mask_known():
    x_star = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    known = torch.randn(1, 3, 8, 8)
    perfect = lambda x, t: (x - x_star) / t.view(-1, 1, 1, 1)  # noqa: E731 - the velocity toward x*
    for fn in (sample_euler, sample_heun):
        out = fn(perfect, torch.randn(1, 3, 8, 8), flow_timesteps(6), mask=mask, x0_known=known,
                 generator=torch.Generator().manual_seed(1))
        assert torch.equal(out[..., :4], known[..., :4]) and (out[..., 4:] - x_star[..., 4:]).abs().max() < 1e-5


def test_generate_picks_the_models_sampler_and_refuses_the_other_family():
    assert resolve_sampler("auto", "flow") == "euler" and resolve_sampler("auto", "v") == "ddim"
    with pytest.raises(ValueError, match="sampler 'ddim' does not fit this model: use euler or heun"):
        resolve_sampler("ddim", "flow")
    with pytest.raises(ValueError, match="sampler 'heun' does not fit this model: use ddim"):
        resolve_sampler("heun", "eps")

    class Uncond:
        def prompts(self, prompts):
            return {}, {}
    times = []
    x_star = torch.full((3, 4, 4), 0.25)

    def net(x, t):  # the network gets t on the 0..1000 scale; the velocity toward x*
        times.append(t[0].item())
        return (x - x_star) / (t.view(-1, 1, 1, 1) / FLOW_TIME_SCALE)
    img = generate(net, Uncond(), LatentScale(), lambda z: z, ["a", "b"], (3, 4, 4), None, steps=4,
                   parameterization="flow", sampler="heun")
    assert torch.allclose(img, x_star.expand(2, -1, -1, -1), atol=1e-5)
    assert times == pytest.approx([1000, 750, 750, 500, 500, 250, 250])  # heun: two calls a step, Euler's last


@pytest.mark.parametrize("override, message", [
    (("diffusion.loss_weighting=min_snr",), "diffusion.loss_weighting=min_snr belongs to objective=ddpm"),
    (("diffusion.parameterization=v",), "diffusion.parameterization=v belongs to objective=ddpm"),
    (("diffusion.objective=ddpm", "diffusion.timestep_sampling=logit_normal"), "belongs to objective=flow"),
])
def test_fields_of_the_other_objective_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=("diffusion.objective=flow", *override))
