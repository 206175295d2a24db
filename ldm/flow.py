"""Rectified flow (Liu et al. 2023; as Stable Diffusion 3 trains it, Esser et al. 2024 §2-3): the straight path
x_t = (1 - t) x_0 + t eps from data (t = 0) to noise (t = 1), and a network that regresses its velocity
dx_t/dt = eps - x_0. Sampling integrates that ODE from t = 1 to 0 (ldm.sampling's euler and heun).

The network sees t * FLOW_TIME_SCALE, the range of the ddpm objective's integer steps (SD 3's convention), so one
UNet and one timestep embedding serve both objectives.
"""
from __future__ import annotations

import torch

from ldm.config import DiffusionConfig

FLOW_TIME_SCALE = 1000.0


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample value (B,) shaped to multiply x (B, ...), on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps (Esser et al. 2024, eq. 2 with a_t = 1 - t, b_t = t)."""
    return per_sample(1 - t, x0) * x0 + per_sample(t, x0) * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target u_t = eps - x_0 (Esser et al. 2024, eq. 3 on the straight path)."""
    return noise - x0


def sample_t(n: int, cfg: DiffusionConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t in (0, 1): uniform, or logit-normal pi(t) = sigmoid(N(m, s^2)) (Esser et al. 2024 §3.1, eq. 19), which puts
    the training where the velocity is hardest to predict, in the middle of the path."""
    dev = generator.device if generator is not None else device
    if cfg.timestep_sampling == "logit_normal":
        u = torch.randn((n,), generator=generator, device=dev, dtype=torch.float64)
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * u).to(device)
    return torch.rand((n,), generator=generator, device=dev, dtype=torch.float64).to(device)


def flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, loss_type: str = "l2",
              **model_kwargs) -> torch.Tensor:
    """|| v_theta(x_t, t) - (eps - x_0) ||^2 per sample (the conditional flow matching loss, Esser et al. eq. 4)."""
    xt = interpolate(x0, noise, t)
    out = model(xt, (t * FLOW_TIME_SCALE).to(x0.dtype), **model_kwargs)
    err = out.float() - velocity(x0, noise).float()
    err = err.abs() if loss_type == "l1" else err ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def flow_timesteps(num_steps: int) -> torch.Tensor:
    """t_0 = 1 > t_1 > ... > t_{n-1}: num_steps evenly spaced times, the sampler's last step lands on t = 0."""
    if num_steps < 1:
        raise ValueError(f"flow sampling takes at least 1 step, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
