"""Samplers as pure functions over a model callable `model(x, t) -> prediction` (k-diffusion style), all with
one signature `sample_x(model, x, timesteps, alphas_cumprod, *, parameterization, generator, noises, mask,
x0_known, callback)` and one registry, SAMPLERS.

`parameterization` says what the callable predicts (eps, x0 or v); every ddpm sampler converts it to
(eps, x0) with `predict_eps_x0`. A rectified-flow model (parameterization "flow", ldm/flow.py) predicts the velocity
at t in [0, 1]; its samplers (euler, heun) take `timesteps` as those times, descending, and no alphas_cumprod.
Wrap a conditional UNet with `guided(...)` for classifier-free guidance (Ho & Salimans 2022; paper §4.3.2 and §4.5)
and pass `mask`/`x0_known` to inpaint (§4.5).
`generate` is the whole of text-to-image sampling in latent space: z_T ~ N(0, I) -> sampler -> D(z).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.flow import FLOW_TIME_SCALE, flow_timesteps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def predict_eps_x0(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor | float, parameterization: str):
    """(eps, x0) from a model output at noise level alpha_bar = a (eq. 1 solved for the unknowns)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    sa, s1a = a.sqrt().item(), (1 - a).sqrt().item()
    if parameterization == "eps":
        return out, (x - s1a * out) / sa
    if parameterization == "x0":
        return (x - sa * out) / s1a, out
    if parameterization == "v":
        return sa * out + s1a * x, sa * x - s1a * out
    raise ValueError(f"unknown parameterization {parameterization!r}")


def _cat(a, b):
    return None if a is None else torch.cat([a, b])


def guided(model: Callable, cond: dict, uncond: dict, scale: float) -> Model:
    """Classifier-free guidance: e_u + s (e_c - e_u); scale 1 is exactly the conditional model."""
    if scale == 1.0:
        return lambda x, t: model(x, t, **cond)

    def fn(x, t):
        kw = {k: _cat(uncond.get(k), cond[k]) for k in cond}
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), **kw).chunk(2)
        return out_u + scale * (out_c - out_u)
    return fn


def all_timesteps(num_train_timesteps: int) -> torch.Tensor:
    """T-1, ..., 0: every step of the forward process (full ancestral DDPM)."""
    return torch.arange(num_train_timesteps - 1, -1, -1)


def ddim_timesteps(num_train_timesteps: int, num_steps: int, offset: int = 1) -> torch.Tensor:
    """Evenly spaced ("leading") steps, descending: [.., 2c+1, c+1, 1] with c = T // num_steps (CompVis). The +1
    offset is dropped where it would push the last step past T - 1 (num_steps = T: every step 999..0, once)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be 1..{num_train_timesteps} (the training timesteps), got {num_steps}")
    step = num_train_timesteps // num_steps
    offset = offset if (num_steps - 1) * step + offset <= num_train_timesteps - 1 else 0
    return (torch.arange(num_steps, dtype=torch.long) * step + offset).flip(0)


def _noise_like(x, generator, noises, i):
    if noises is not None:
        return noises[i]
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _predict(model: Model, x: torch.Tensor, t: int, a: float, parameterization: str):
    """(eps, x0) of the model at step t (noise level alpha_bar = a), the batch's steps all t."""
    return predict_eps_x0(model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)), x, a,
                          parameterization)


def _known(x: torch.Tensor, mask, x0_known) -> torch.Tensor:
    """The final sample, with the known region (inpainting's mask = 1) as given."""
    return x if mask is None else mask * x0_known + (1 - mask) * x


def _paste_known(x, mask, x0_known, t, alphas_cumprod, generator):
    """Inpainting: keep the known region (mask = 1) at the current noise level, generate the rest."""
    if mask is None:
        return x
    a = alphas_cumprod[t]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    known = a.sqrt().item() * x0_known + (1 - a).sqrt().item() * noise
    return mask * known + (1 - mask) * x


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                eta: float = 0.0, parameterization: str = "eps", final_alpha_cumprod: float | None = None,
                generator: torch.Generator | None = None, noises: list | None = None,
                mask: torch.Tensor | None = None, x0_known: torch.Tensor | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z.
    The last step lands on alpha_bar_0 (CompVis / diffusers `set_alpha_to_one=False`) unless
    `final_alpha_cumprod=1.0`."""
    ac = alphas_cumprod.double()
    final = ac[0].item() if final_alpha_cumprod is None else final_alpha_cumprod
    for i, t in enumerate(timesteps.tolist()):
        x = _paste_known(x, mask, x0_known, t, ac, generator)
        a = ac[t].item()
        a_prev = ac[timesteps[i + 1]].item() if i + 1 < len(timesteps) else final
        eps, x0 = _predict(model, x, t, a, parameterization)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps  # 0 up to rounding at SNR 0, eta 1
        if sigma > 0:
            x = x + sigma * _noise_like(x, generator, noises, i)
        if callback is not None:
            callback(i, t, x, x0)
    return _known(x, mask, x0_known)


@torch.no_grad()
def sample_ddpm(model: Model, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                parameterization: str = "eps", generator: torch.Generator | None = None,
                noises: list | None = None, mask: torch.Tensor | None = None, x0_known: torch.Tensor | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7), on all
    T steps (`all_timesteps`) or a respaced subset (betas recomputed from alpha_bar at the chosen steps)."""
    ac = alphas_cumprod.double()
    for i, t in enumerate(timesteps.tolist()):
        x = _paste_known(x, mask, x0_known, t, ac, generator)
        a = ac[t].item()
        a_prev = ac[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        beta = 1 - a / a_prev
        eps, x0 = _predict(model, x, t, a, parameterization)
        mean = (a_prev ** 0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        var = beta * (1 - a_prev) / (1 - a)  # posterior variance beta~_t
        x = mean + var ** 0.5 * _noise_like(x, generator, noises, i) if i + 1 < len(timesteps) else mean
        if callback is not None:
            callback(i, t, x, x0)
    return _known(x, mask, x0_known)


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                    parameterization: str = "eps", generator: torch.Generator | None = None, noises: list | None = None,
                    mask: torch.Tensor | None = None, x0_known: torch.Tensor | None = None,
                    callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = log(alpha/sigma); ends at the clean sample.
    Deterministic: `generator` only re-noises the known region when inpainting, `noises` is not used."""
    ac = alphas_cumprod.double()
    x0_prev, h_prev = None, None
    ts = timesteps.tolist()
    for i, t in enumerate(ts):
        x = _paste_known(x, mask, x0_known, t, ac, generator)
        a = ac[t].item()
        _, x0 = _predict(model, x, t, a, parameterization)
        if i + 1 == len(ts):  # final step to sigma = 0: the data prediction itself
            x = x0
        else:
            a_next = ac[ts[i + 1]].item()
            alpha, sigma = a ** 0.5, (1 - a) ** 0.5
            alpha_n, sigma_n = a_next ** 0.5, (1 - a_next) ** 0.5
            lam, lam_n = torch.log(torch.tensor(alpha / sigma)), torch.log(torch.tensor(alpha_n / sigma_n))
            h = (lam_n - lam).item()
            d = x0
            if x0_prev is not None:  # second order: linear extrapolation of the data prediction
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_n / sigma) * x - alpha_n * (torch.expm1(torch.tensor(-h)).item()) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return _known(x, mask, x0_known)


def _velocity(model: Model, x: torch.Tensor, t: float) -> torch.Tensor:
    return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))


def _paste_known_flow(x, mask, x0_known, t: float, generator):
    """Inpainting on the flow path: the known region at time t is (1 - t) x0 + t eps."""
    if mask is None:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mask * ((1 - t) * x0_known + t * noise) + (1 - mask) * x


def on_flow_time(net: Callable) -> Callable:
    """The network of a flow model called with the sampler's t in [0, 1]: it sees t * FLOW_TIME_SCALE (ldm/flow.py)."""
    return lambda x, t, **kw: net(x, t * FLOW_TIME_SCALE, **kw)


def _flow_only(name: str, parameterization: str) -> None:
    if parameterization != "flow":
        raise ValueError(f"the {name} sampler integrates a flow model's ODE; this model predicts "
                         f"{parameterization!r} (objective ddpm): use ddim, ddpm or dpmpp_2m")


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor | None = None,
                 *, parameterization: str = "flow", generator: torch.Generator | None = None,
                 noises: list | None = None, mask: torch.Tensor | None = None, x0_known: torch.Tensor | None = None,
                 callback: Callable | None = None) -> torch.Tensor:
    """Euler's method on dx/dt = v_theta(x, t) from t = 1 to 0 (Esser et al. 2024 §2): x <- x + (t' - t) v. On the
    straight path this is DDIM with eta 0. Deterministic; `noises` is not used."""
    _flow_only("euler", parameterization)
    ts = timesteps.tolist() + [0.0]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = _paste_known_flow(x, mask, x0_known, t, generator)
        v = _velocity(model, x, t)
        x0 = x - t * v  # the data point the velocity points at
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, t, x, x0)
    return _known(x, mask, x0_known)


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor | None = None,
                *, parameterization: str = "flow", generator: torch.Generator | None = None,
                noises: list | None = None, mask: torch.Tensor | None = None, x0_known: torch.Tensor | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn) on the flow ODE: an Euler step, then the
    mean of the velocities at both ends; the last step, to t = 0, is Euler's. Two model calls per step but the last."""
    _flow_only("heun", parameterization)
    ts = timesteps.tolist() + [0.0]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = _paste_known_flow(x, mask, x0_known, t, generator)
        v = _velocity(model, x, t)
        x0 = x - t * v
        x_euler = x + (t_next - t) * v
        x = x_euler if t_next == 0 else x + (t_next - t) * 0.5 * (v + _velocity(model, x_euler, t_next))
        if callback is not None:
            callback(i, t, x, x0)
    return _known(x, mask, x0_known)


SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m, "euler": sample_euler,
            "heun": sample_heun}
FLOW_SAMPLERS = ("euler", "heun")


def resolve_sampler(sampler: str, parameterization: str) -> str:
    """"auto" = the model's own (ddim for the ddpm objective, euler for flow); a sampler of the other family is
    refused by name."""
    flow = parameterization == "flow"
    if sampler == "auto":
        return "euler" if flow else "ddim"
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: one of auto, {', '.join(SAMPLERS)}")
    if flow != (sampler in FLOW_SAMPLERS):
        family = "euler or heun (a flow model)" if flow else "ddim, ddpm or dpmpp_2m (a ddpm model)"
        raise ValueError(f"sampler {sampler!r} does not fit this model: use {family}, or auto")
    return sampler


@torch.no_grad()
def generate(net: Callable, conditioner, latent_scale, decode: Callable, prompts: list, shape: tuple, alphas_cumprod:
             torch.Tensor | None, *, steps: int = 50, cfg_scale: float = 5.0, seed: int = 0, sampler: str = "auto",
             parameterization: str = "eps", device="cpu", seeds: list[int] | None = None,
             eta: float = 0.0, orig_size: tuple[int, int] | None = None,
             crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Images in [-1, 1] for `prompts` (paper §3.3, §4.3): z_T ~ N(0, I), a sampler with classifier-free
    guidance on the conditional LDM `net`, back to the first stage's latent scale, decoded by `decode`.
    `seeds` (one per prompt) draws each z_T from its own seed, so an image does not depend on its batch. `shape` may
    be larger than the training latents: the UNet is convolutional (§4.3.2). `eta` is DDIM's noise (0: deterministic,
    1: DDPM-like). A micro-conditioned model (SDXL) is told the image is cropped at `crop` from an original of
    `orig_size` (default: the sample's size, uncropped). A flow model (`parameterization="flow"`) needs no
    alphas_cumprod and integrates from t = 1; `sampler="auto"` picks the model's own sampler."""
    sampler = resolve_sampler(sampler, parameterization)
    if eta and sampler != "ddim":
        raise ValueError(f"eta={eta} is DDIM's: the {sampler} sampler takes none (use --sampler ddim or eta 0)")
    g = torch.Generator(device=device).manual_seed(seed)
    if seeds is None:
        x_t = torch.randn((len(prompts), *shape), generator=g, device=device)
    else:
        x_t = torch.stack([torch.randn(shape, generator=torch.Generator(device=device).manual_seed(int(s)),
                                       device=device) for s in seeds])
    cond, uncond = conditioner.prompts(prompts)
    if getattr(conditioner, "micro", False):  # SDXL micro-conditioning: as if cropped at `crop` from `orig_size`
        cond, uncond = conditioner.with_micro(cond, uncond, len(prompts), (shape[-2] * conditioner.f,
                                                                           shape[-1] * conditioner.f), orig_size, crop)
    if parameterization == "flow":
        net = on_flow_time(net)
    if uncond is None:  # a condition without a null (an image never dropped in training): no guidance
        fn = lambda x, t: net(x, t, **cond)  # noqa: E731
    else:
        fn = guided(net, cond, uncond, cfg_scale) if cond else (lambda x, t: net(x, t))
    ts = flow_timesteps(steps) if parameterization == "flow" else ddim_timesteps(alphas_cumprod.shape[0], steps)
    extra = {"eta": eta} if eta else {}  # only DDIM takes it (checked above)
    z = SAMPLERS[sampler](fn, x_t, ts, alphas_cumprod, parameterization=parameterization, generator=g, **extra)
    return decode(latent_scale.to_latent(z)).clamp(-1, 1)
