"""Checkpoint io: safetensors files holding several components + the config; import of CompVis `.ckpt`
state dicts and diffusers-format folders (weights only: `weights_only=True` or safetensors, never pickle).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.config import AutoencoderConfig
from ldm.files import atomic_write_bytes

FORMAT = "ldm-ray/1"


def save_components(path: str | Path, components: dict[str, dict[str, torch.Tensor]], config: dict,
                    metadata: dict[str, str] | None = None) -> None:
    """One safetensors file: `{component}.{param}` tensors, the config JSON in the header metadata."""
    flat = {f"{name}.{k}": v.detach().to("cpu").contiguous().clone()
            for name, sd in components.items() for k, v in sd.items()}
    meta = {"format": FORMAT, "config": json.dumps(config), "components": json.dumps(sorted(components))}
    meta.update(metadata or {})
    atomic_write_bytes(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_components(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """-> ({component: state_dict}, config dict, raw metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ldm-ray checkpoint (metadata format={meta.get('format')!r}); "
                         f"for CompVis .ckpt or diffusers folders use load_compvis_checkpoint / load_diffusers_*")
    flat = load_file(str(path))
    names = json.loads(meta["components"])
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for k, v in flat.items():
        comp, rest = k.split(".", 1)
        out[comp][rest] = v
    return out, json.loads(meta["config"]), meta


# ---------------------------------------------------------------------------------------------
# CompVis / Stable Diffusion `.ckpt` state dicts


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def split_compvis_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A full LDM `.ckpt` -> {"autoencoder", "unet", "ema_unet", "cond_stage", "loss"} in our names.
    A bare first-stage checkpoint (`encoder.*`, `decoder.*`, `loss.*`) goes to "autoencoder"/"loss"."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = {"first_stage_model.": "autoencoder", "model.diffusion_model.": "unet",
                "cond_stage_model.": "cond_stage",
                "loss.": "loss"}
    ema_raw = {}
    for k, v in sd.items():
        for p, comp in prefixes.items():
            if k.startswith(p):
                out.setdefault(comp, {})[k[len(p):]] = v
                break
        else:
            if k.startswith("model_ema."):
                ema_raw[k[len("model_ema."):]] = v
            elif k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"):
                out.setdefault("autoencoder", {})[k] = v
            else:
                out.setdefault("other", {})[k] = v
    if ema_raw and "unet" in out:  # LitEma stores "diffusion_model.a.b" as "diffusion_modela b" without dots
        by_flat = {("diffusion_model." + k).replace(".", ""): k for k in out["unet"]}
        out["ema_unet"] = {by_flat[k]: v for k, v in ema_raw.items() if k in by_flat}
    return out


def load_first_stage_state_dict(path_or_sd) -> dict[str, torch.Tensor]:
    """The autoencoder weights of a CompVis first-stage or full LDM checkpoint, loss/discriminator removed."""
    sd = read_state_dict(path_or_sd) if isinstance(path_or_sd, (str, Path)) else path_or_sd
    parts = split_compvis_state_dict(sd)
    if "autoencoder" not in parts:
        raise KeyError("no first-stage weights (encoder.*, decoder.*, first_stage_model.*) in this checkpoint")
    return parts["autoencoder"]


# ---------------------------------------------------------------------------------------------
# diffusers folders (vae/, unet/ with config.json + diffusion_pytorch_model.safetensors)


def read_diffusers_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A diffusers model folder: (its config.json, its weights: safetensors, or a .bin read weights-only)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no config.json: not a diffusers model folder")
    cfg = json.loads((folder / "config.json").read_text())
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return cfg, read_state_dict(folder / name)
    raise FileNotFoundError(f"{folder} holds no diffusion_pytorch_model.safetensors/.bin")


def load_diffusers_vae(folder: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor], float]:
    """A diffusers AutoencoderKL folder (or a pipeline folder's vae/) -> (our config, our weights, its published
    scaling_factor; 0 when it names none)."""
    from ldm.convert.diffusers import vae_config_from_diffusers, vae_from_diffusers
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        folder = folder / "vae"
    dcfg, sd = read_diffusers_folder(folder)
    cfg = vae_config_from_diffusers(dcfg)
    return cfg, vae_from_diffusers(sd, cfg), float(dcfg.get("scaling_factor") or 0.0)
