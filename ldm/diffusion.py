"""The forward process and the LDM objective (paper §3.2, eq. 1-2; DDPM, Ho et al. 2020).

L_LDM = E_{E(x), y, eps~N(0,1), t} [ w(t) || target - eps_theta(z_t, t, tau(y)) ||^2 ]

`diffusion.objective=flow` swaps in rectified flow (ldm/flow.py) behind the same two entry points,
`sample_timesteps` and `diffusion_loss`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm import flow
from ldm.flow import per_sample
from ldm.config import DiffusionConfig


def make_betas(schedule: str, timesteps: int, linear_start: float = 0.00085, linear_end: float = 0.012,
               cosine_s: float = 0.008) -> torch.Tensor:
    """beta_1..beta_T in float64. Names follow diffusers: CompVis' "linear" is "scaled_linear" here."""
    if schedule == "linear":  # DDPM: linear in beta
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":  # LDM / Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}: use linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift/scale sqrt(alpha_bar) so that alpha_bar_T = 0 (SNR(T) = 0)."""
    sab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sab[0].clone(), sab[-1].clone()
    sab = (sab - last) * first / (first - last)
    abar = sab ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor            # (T,) float64
    alphas_cumprod: torch.Tensor   # alpha_bar_t (T,) float64
    cfg: DiffusionConfig = DiffusionConfig()

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        betas = make_betas(cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, torch.cumprod(1 - betas, 0), cfg)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:  # alpha_bar / (1 - alpha_bar)
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps (eq. 1's closed form)."""
    a = alphas_cumprod.to(t.device)[t]
    return per_sample(a.sqrt(), x0) * x0 + per_sample((1 - a).sqrt(), x0) * noise


def training_target(x0, noise, t, alphas_cumprod, parameterization: str) -> torch.Tensor:
    """What the network regresses: eps (paper), x0, or v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho)."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        a = alphas_cumprod.to(t.device)[t]
        return per_sample(a.sqrt(), x0) * noise - per_sample((1 - a).sqrt(), x0) * x0
    raise ValueError(f"unknown parameterization {parameterization!r}")


def loss_weight(snr: torch.Tensor, parameterization: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight w(t). min-SNR-gamma (Hang et al. 2023) expressed for each target:
    the x0-space weight min(SNR, gamma) becomes min(SNR, gamma)/SNR for eps and min(SNR, gamma)/(SNR+1) for v."""
    if weighting == "simple":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}")
    clipped = snr.clamp(max=gamma)
    if parameterization == "eps":
        return clipped / snr.clamp(min=1e-8)
    if parameterization == "x0":
        return clipped
    return clipped / (snr + 1)


def sample_noise(x0: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, I), plus offset noise (a per-channel constant) that lets the model change mean brightness."""
    dev = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    if offset > 0:
        noise = noise + offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator,
                                             device=dev, dtype=x0.dtype)
    return noise.to(x0.device)


def sample_timesteps(n: int, schedule: Schedule, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1} (eq. 2), drawn where the generator lives; a flow objective's t in (0, 1) (ldm/flow.py)."""
    if schedule.cfg.objective == "flow":
        return flow.sample_t(n, schedule.cfg, generator, device)
    dev = generator.device if generator is not None else device
    return torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=dev).to(device)


def diffusion_loss(model, x0: torch.Tensor, cfg: DiffusionConfig, schedule: Schedule,
                   generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """L_LDM per sample (eq. 2): draw t and eps (unless given), noise z_0, regress the chosen target."""
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule, generator, x0.device)
    if noise is None:
        noise = sample_noise(x0, cfg.offset_noise, generator)
    if cfg.objective == "flow":
        return flow.flow_loss(model, x0, noise, t, cfg.loss_type, **model_kwargs)
    zt = q_sample(x0, t, noise, schedule.alphas_cumprod)
    target = training_target(x0, noise, t, schedule.alphas_cumprod, cfg.parameterization)
    out = model(zt, t, **model_kwargs)
    err = (out.float() - target.float())
    err = err.abs() if cfg.loss_type == "l1" else err ** 2
    w = loss_weight(schedule.snr(t).float(), cfg.parameterization, cfg.loss_weighting, cfg.min_snr_gamma)
    return w * err.mean(dim=tuple(range(1, err.ndim)))
