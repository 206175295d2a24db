"""Checkpoint io: safetensors files holding several components + the config; import of CompVis `.ckpt`
state dicts and diffusers-format folders (weights only: `weights_only=True` or safetensors, never pickle).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.config import AutoencoderConfig, UNetConfig

FORMAT = "ldm-ray/1"


def new_file_mode() -> int:
    """What open() gives a new file under this process' umask (mkstemp's 0600 would survive the rename and lock
    out a reader running as another user, e.g. a training pod with its own UID)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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

_VAE_RES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _read_diffusers_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return cfg, read_state_dict(folder / name)
    raise FileNotFoundError(f"{folder} holds no diffusion_pytorch_model.safetensors/.bin")


def diffusers_vae_config(dcfg: dict) -> AutoencoderConfig:
    boc = list(dcfg["block_out_channels"])
    return AutoencoderConfig(reg="kl", resolution=int(dcfg.get("sample_size", 256)), in_channels=dcfg["in_channels"],
                             out_ch=dcfg["out_channels"], ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
                             num_res_blocks=dcfg["layers_per_block"], attn_resolutions=(),
                             z_channels=dcfg["latent_channels"], embed_dim=dcfg["latent_channels"],
                             norm_groups=dcfg.get("norm_num_groups", 32))


def diffusers_vae_to_compvis(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers|attentions)"
                     r"\.(\d+)\.(.*)", k)
        if m:
            side, kind, i, sub, j, rest = m.groups()
            i = int(i) if side == "encoder" else num_levels - 1 - int(i)
            base = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
            if sub == "resnets":
                k2 = f"{base}.block.{j}.{_rename(rest, _VAE_RES)}"
            elif sub == "attentions":
                k2 = f"{base}.attn.{j}.{_rename(rest, _VAE_ATTN)}"
            else:
                k2 = f"{base}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{rest}"
        elif ".mid_block." in k:
            side, rest = k.split(".mid_block.")
            rest = re.sub(r"^resnets\.(\d)", lambda mm: f"block_{int(mm.group(1)) + 1}", rest)
            if rest.startswith("attentions.0."):
                rest = "attn_1." + _rename(rest[len("attentions.0."):], _VAE_ATTN)
            else:
                rest = rest.replace("conv_shortcut", "nin_shortcut")
            k2 = f"{side}.mid.{rest}"
        else:
            k2 = k.replace("conv_norm_out", "norm_out")
        if (".attn_1." in k2 or re.search(r"\.attn\.\d+\.", k2)) and k2.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # linear -> 1x1 conv
        out[k2] = v
    return out


def diffusers_unet_to_compvis(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    out = {}
    for k, v in sd.items():
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            side, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down_blocks":
                idx = 1 + i * (n + 1) + j
                k2 = {"resnets": f"input_blocks.{idx}.0.{_rename(rest, _UNET_RES)}",
                      "attentions": f"input_blocks.{idx}.1.{rest}",
                      "downsamplers": f"input_blocks.{(i + 1) * (n + 1)}.0.{rest.replace('conv', 'op', 1)}"}[sub]
            else:
                idx = i * (n + 1) + j
                has_attn = 2 ** (levels - 1 - i) in cfg.attention_resolutions
                k2 = {"resnets": f"output_blocks.{idx}.0.{_rename(rest, _UNET_RES)}",
                      "attentions": f"output_blocks.{idx}.1.{rest}",
                      "upsamplers": f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.{rest}"}[sub]
        elif k.startswith("mid_block."):
            rest = k[len("mid_block."):]
            if rest.startswith("attentions.0."):
                k2 = "middle_block.1." + rest[len("attentions.0."):]
            else:
                j, rest2 = re.match(r"resnets\.(\d)\.(.*)", rest).groups()
                k2 = f"middle_block.{0 if j == '0' else 2}.{_rename(rest2, _UNET_RES)}"
        else:
            k2 = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "class_embedding": "label_emb",
                  "conv_norm_out": "out.0", "conv_out": "out.2"}.get(k.rsplit(".", 1)[0], None)
            if k2 is None:
                raise KeyError(f"unexpected diffusers UNet key {k!r}")
            k2 = f"{k2}.{k.rsplit('.', 1)[1]}"
        out[k2] = v
    return out


def load_diffusers_vae(folder: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    dcfg, sd = _read_diffusers_folder(folder)
    cfg = diffusers_vae_config(dcfg)
    return cfg, diffusers_vae_to_compvis(sd, len(cfg.ch_mult))

