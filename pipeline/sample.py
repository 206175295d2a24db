"""Text-to-image sampling from a trained LDM (paper §3.3, §4.3): z_T ~ N(0, I) -> DDIM / DPM-Solver++ /
DDPM with classifier-free guidance in latent space -> D(z / scale + shift). Used for the training job's
sample grids, jobs/sample.py and the demo."""
from __future__ import annotations

import json

import torch

from ldm.checkpoint import load_components
from ldm.config import LDMConfig, from_dict
from ldm.diffusion import Schedule
from ldm.model import LatentDiffusion
from ldm.sampling import ddim_timesteps, guided, sample_ddim, sample_ddpm, sample_dpmpp_2m


def conditioning_mode(cfg: LDMConfig) -> str:
    c = cfg.conditioning
    if c.kind == "text":
        return "trainable" if c.text_encoder == "transformer" else "frozen"
    return c.kind  # "class" | "none"


def null_condition(mode: str, net: LatentDiffusion, text, device) -> dict:
    """The empty caption / null class that classifier-free guidance contrasts against."""
    if mode in ("frozen", "cached_emb"):
        emb, m = text([""])
        return {"context": emb.to(device), "mask": m.to(device)}
    if mode == "trainable":
        ids, m = net.cond_stage.tokenize([""])
        return {"input_ids": ids.to(device), "mask": m.to(device)}
    if mode == "class":
        return {"y": torch.tensor([net.cfg.conditioning.num_classes], device=device)}
    return {}


def condition(prompts: list, mode: str, net: LatentDiffusion, text, null: dict, device) -> tuple[dict, dict]:
    n = len(prompts)
    if mode in ("frozen", "cached_emb"):
        emb, m = text([str(p) for p in prompts])
        cond = {"context": emb.to(device), "mask": m.to(device)}
    elif mode == "trainable":
        ids, m = net.cond_stage.tokenize([str(p) for p in prompts])
        cond = {"input_ids": ids.to(device), "mask": m.to(device)}
    elif mode == "class":
        cond = {"y": torch.tensor([int(p) for p in prompts], device=device)}
    else:
        return {}, {}
    uncond = {k: v.expand(n, *v.shape[1:]) for k, v in null.items()}
    return cond, uncond


@torch.no_grad()
def generate(net: LatentDiffusion, decode, cond: dict, uncond: dict, n: int, shape: tuple, scale: float,
             shift: float, steps: int = 50, cfg_scale: float = 5.0, seed: int = 0, sampler: str = "ddim",
             device="cpu") -> torch.Tensor:
    """n images in [-1, 1]; `decode` maps unscaled latents to images (the frozen first stage)."""
    cfg = net.cfg
    sched = Schedule.from_config(cfg.diffusion)
    g = torch.Generator(device=device).manual_seed(seed)
    x_t = torch.randn((n, *shape), generator=g, device=device)
    fn = guided(net, cond, uncond, cfg_scale) if cond else (lambda x, t: net(x, t))
    ts = ddim_timesteps(cfg.diffusion.timesteps, steps)
    p = cfg.diffusion.parameterization
    if sampler == "ddim":
        z = sample_ddim(fn, x_t, ts, sched.alphas_cumprod, parameterization=p)
    elif sampler == "dpmpp_2m":
        z = sample_dpmpp_2m(fn, x_t, ts, sched.alphas_cumprod, parameterization=p)
    elif sampler == "ddpm":
        z = sample_ddpm(fn, x_t, sched.alphas_cumprod, ts, parameterization=p, generator=g)
    else:
        raise ValueError(f"unknown sampler {sampler!r}: ddim, dpmpp_2m or ddpm")
    return decode(z / scale + shift).clamp(-1, 1)


def load_ldm(export: str, use_ema: bool = True, device="cpu") -> tuple[LatentDiffusion, dict]:
    """A consolidated export (jobs/train_ldm.py) -> the LatentDiffusion module and its metadata."""
    comps, config, meta = load_components(export)
    scale = float(meta.get("scale_factor", config.get("scale_factor", 1.0)))
    cfg = from_dict(LDMConfig, {k: v for k, v in config.items() if k != "scale_factor"} | {"scale_factor": 0.0})
    net = LatentDiffusion(cfg)
    pre = "ema_" if use_ema and "ema_unet" in comps else ""
    net.unet.load_state_dict(comps[f"{pre}unet"], strict=True)
    if net.cond_stage is not None:
        net.cond_stage.load_state_dict(comps[f"{pre}cond_stage"], strict=True)
    info = {"scale_factor": scale, "shift_factor": float(meta.get("shift_factor", 0.0)),
            "autoencoder": json.loads(meta.get("autoencoder", "{}")),
            "text_encoder": json.loads(meta.get("text_encoder", "{}")), "step": meta.get("step"),
            "latent_shape": json.loads(meta["latent_shape"])}
    return net.to(device).eval(), info


def text_encoder_for(cfg: LDMConfig, info: dict, path: str = "", device="cpu"):
    if conditioning_mode(cfg) != "frozen":
        return None
    from ldm.conditioning import FrozenHFTextEncoder
    from pipeline.models import text_encoder_path
    src = path or text_encoder_path(info.get("text_encoder", {}))
    return FrozenHFTextEncoder(src, cfg.conditioning.max_length).to(device)


def sample_images(export: str, prompts: list, n_per_prompt: int = 1, autoencoder: str = "", text_encoder: str = "",
                  steps: int = 50, cfg_scale: float = 5.0, seed: int = 0, sampler: str = "ddim",
                  device="cpu") -> tuple[torch.Tensor, list]:
    from pipeline.models import load_autoencoder
    net, info = load_ldm(export, device=device)
    ae_spec = autoencoder or info["autoencoder"].get("source", "")
    ae = load_autoencoder(ae_spec)
    want = info["autoencoder"].get("weights_sha256")
    if want and ae.identity["weights_sha256"] != want:
        raise ValueError(f"autoencoder {ae_spec} (weights {ae.identity['weights_sha256']}) is not the one the model "
                         f"was trained with ({want}); pass --autoencoder with the right first stage")
    ae_model = ae.model.to(device)
    text = text_encoder_for(net.cfg, info, text_encoder, device)
    mode = conditioning_mode(net.cfg)
    null = null_condition(mode, net, text, device)
    full = [p for p in prompts for _ in range(n_per_prompt)]
    cond, uncond = condition(full, mode, net, text, null, device)
    shape = tuple(info["latent_shape"])
    images = generate(net, ae_model.decode, cond, uncond, len(full), shape, info["scale_factor"], info["shift_factor"],
                      steps, cfg_scale, seed, sampler, device)
    return images, full
