"""Stable Diffusion single-file checkpoints (the CompVis / SGM key layout that ComfyUI, A1111 and diffusers'
from_single_file read): `model.diffusion_model.*` (the UNet), `model_ema.*` (its EMA, where kept),
`first_stage_model.*` (the KL-f8 autoencoder), and the text encoders: SD 1.x `cond_stage_model.transformer.*`
(CLIP ViT-L, Hugging Face names), SD 2.x `cond_stage_model.model.*` (OpenCLIP ViT-H), SDXL
`conditioner.embedders.0.transformer.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG).

Reading one gives a diffusers folder (sd_folder.py), which is then imported as any other; writing one takes our
export. A file written here carries its configs and tokenizers in its safetensors metadata, so it reads back whole; a
file from elsewhere has its configs read off its weights' shapes (heads: 8 for SD 1.x, 64 channels wide otherwise, as
every published model has) and needs a tokenizer folder.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ldm.config import AutoencoderConfig, LDMConfig, UNetConfig, from_dict, to_dict
from ldm.convert.clip import HF, config_from_hf, hf_to_openclip, openclip_to_hf

UNET, VAE, EMA = "model.diffusion_model.", "first_stage_model.", "model_ema."
TEXT = {"sd1": [("cond_stage_model.transformer.", "hf")], "sd2": [("cond_stage_model.model.", "openclip")],
        "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")]}
ACT = {"hf": "quick_gelu", "openclip": "gelu"}  # OpenAI's CLIP ViT-L uses QuickGELU, OpenCLIP's models GELU


def family_of(keys) -> str:
    """sd1 / sd2 / sdxl from a single file's keys."""
    keys = list(keys)
    for family in ("sdxl", "sd2", "sd1"):
        if any(k.startswith(TEXT[family][0][0]) for k in keys):
            return family
    if any(k.startswith(UNET) for k in keys):
        raise ValueError("a UNet without a text encoder this project knows (cond_stage_model.transformer / .model, "
                         "conditioner.embedders): not an SD 1.x / 2.x / XL single-file checkpoint")
    raise ValueError("no model.diffusion_model.* keys: not a Stable Diffusion single-file checkpoint")


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1)


def infer_unet_config(sd: dict, family: str) -> UNetConfig:
    """Our UNetConfig from a UNet's weights (our names); the heads are the family's (not in the weights)."""
    keys = list(sd)
    mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
    blocks = _count(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in range(blocks) if f"input_blocks.{i}.0.op.weight" in sd]
    n = (downs[0] - 1) if downs else blocks - 1
    levels = len(downs) + 1
    first = [1 + level * (n + 1) for level in range(levels)]
    mult = tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first)
    depths = tuple(_count(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") for i in first)
    attn = tuple(2 ** level for level in reversed(range(levels)) if depths[level])
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    middle = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    heads = {"num_heads": 8} if family == "sd1" else {"num_head_channels": 64}
    label = sd.get("label_emb.0.0.weight")
    depths = tuple(d or 1 for d in depths)  # a level without attention keeps 1, as SGM's configs write it
    return UNetConfig(in_channels=cin, out_channels=sd["out.2.weight"].shape[0], model_channels=mc, channel_mult=mult,
                      num_res_blocks=n, attention_resolutions=attn, **heads,
                      transformer_depth=depths[:1] if len(set(depths)) == 1 else depths,
                      transformer_depth_middle=-1 if middle == depths[-1] else middle,
                      use_linear_projection=sd.get("middle_block.1.proj_in.weight", torch.zeros(1, 1, 1)).ndim == 2,
                      context_dim=ctx, adm_in_channels=label.shape[1] if label is not None else 0,
                      num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None)


def infer_vae_config(sd: dict, resolution: int) -> AutoencoderConfig:
    """Our AutoencoderConfig from a KL first stage's weights (our names)."""
    keys = list(sd)
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    z = sd["decoder.conv_in.weight"].shape[1]
    return AutoencoderConfig(resolution=resolution, in_channels=sd["encoder.conv_in.weight"].shape[1],
                             out_ch=sd["decoder.conv_out.weight"].shape[0], ch=ch, ch_mult=mult,
                             num_res_blocks=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."), z_channels=z,
                             embed_dim=sd["post_quant_conv.weight"].shape[1])


def text_encoders(sd: dict, family: str, meta: dict) -> list[tuple[dict, dict]]:
    """[(Hugging Face CLIP weights, its CLIPTextConfig as a dict)] of the file's text encoders (SD 2.x's OpenCLIP:
    all but its last layer, as diffusers' SD 2 text encoder)."""
    out = []
    for i, (prefix, names) in enumerate(TEXT[family]):
        part = _sub(sd, prefix)
        if names == "openclip":
            layers = _count(part, r"transformer\.resblocks\.(\d+)\.")
            part = openclip_to_hf(part, layers - 1 if family == "sd2" else layers)
        config = json.loads(meta[f"ldm_ray.text_config.{i}"]) if f"ldm_ray.text_config.{i}" in meta else \
            config_from_hf(part, ACT[names])
        out.append((part, config))
    return out


def read_single_file(path: str | Path) -> tuple[dict, dict]:
    """(the file's tensors, its metadata): safetensors, or a .ckpt read weights-only (its state_dict)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return (obj.get("state_dict", obj) if isinstance(obj, dict) else obj), {}


def to_pipeline(path: str | Path, out: str | Path, tokenizers: list[str] = (), prediction: str = "") -> Path:
    """A single-file checkpoint as a diffusers folder under `out` (then read with sd_folder.read_pipeline): the
    UNet (its EMA where the file has one), the first stage, the text encoders with their tokenizers (the file's
    own, or `tokenizers` folders), a DDIM scheduler (`prediction`: eps or v; default the file's, else eps)."""
    from ldm.convert.sd_folder import write_pipeline
    sd, meta = read_single_file(path)
    family, cfg, parts, scale = contents(sd, meta)
    if prediction:
        cfg = _with_target(cfg, prediction)
    out = Path(out)
    folders = write_text_encoders(text_encoders(sd, family, meta), out, meta, tokenizers, path)
    return write_pipeline(out, cfg, parts.get("ema_unet") or parts["unet"], parts["autoencoder"], scale, folders,
                          cfg.autoencoder.resolution // cfg.autoencoder.downsample_factor)


def contents(sd: dict, meta: dict) -> tuple[str, LDMConfig, dict, float]:
    """(family, config, {unet, ema_unet, autoencoder, ...} in our names, published latent scale) of a single file:
    the config from its metadata when written here, else read off the weights."""
    from ldm.checkpoint import split_compvis_state_dict
    family = family_of(sd)
    parts = split_compvis_state_dict(sd)
    if "ldm_ray.config" in meta:  # written here: the whole config
        cfg = from_dict(LDMConfig, json.loads(meta["ldm_ray.config"]))
    else:
        from ldm.config import get_preset
        base = get_preset({"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl-base"}[family])
        vae = infer_vae_config(parts["autoencoder"], base.autoencoder.resolution)
        unet = infer_unet_config(parts.get("ema_unet") or parts["unet"], family)
        cfg = _with_target(replace(base, unet=unet, autoencoder=vae), "v" if family == "sd2" else "eps")
    return family, cfg, parts, float(meta.get("ldm_ray.scale_factor", 0.13025 if family == "sdxl" else 0.18215))


def first_stage(path: str | Path) -> tuple[AutoencoderConfig, dict, float]:
    """A single file's autoencoder: (config, weights in our names, published latent scale), as to_pipeline reads it."""
    sd, meta = read_single_file(path)
    _, cfg, parts, scale = contents(sd, meta)
    return cfg.autoencoder, parts["autoencoder"], scale


def _with_target(cfg: LDMConfig, prediction: str) -> LDMConfig:
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction {prediction!r}: eps or v")
    return replace(cfg, diffusion=replace(cfg.diffusion, parameterization=prediction))


def write_text_encoders(encoders: list[tuple[dict, dict]], out: Path, meta: dict, tokenizers, path) -> list:
    """Each text encoder as a Hugging Face folder (config.json, model.safetensors) beside its tokenizer's."""
    from safetensors.torch import save_file
    folders = []
    for i, (weights, config) in enumerate(encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        enc, tok = out / f"text_encoder{suffix}", out / f"tokenizer{suffix}"
        enc.mkdir(parents=True, exist_ok=True)
        arch = "CLIPTextModelWithProjection" if "projection_dim" in config else "CLIPTextModel"
        config = {**config, "architectures": [arch], "model_type": "clip_text_model"}
        (enc / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(enc / "model.safetensors"))
        if f"ldm_ray.tokenizer.{i}" in meta:
            tok.mkdir(parents=True, exist_ok=True)
            for name, text in json.loads(meta[f"ldm_ray.tokenizer.{i}"]).items():
                (tok / name).write_text(text)
        elif i < len(tokenizers) and tokenizers[i]:
            tok = Path(tokenizers[i])
        else:
            raise FileNotFoundError(f"{path} holds no tokenizer for its text encoder {i + 1}: give a CLIP tokenizer "
                                    f"folder for each (--tokenizer DIR, repeatable), e.g. the tokenizer/ (and "
                                    f"tokenizer_2/) of a diffusers folder of the same model family")
        folders.append((str(enc), str(tok)))
    return folders


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "vocab.txt")


def from_pipeline(model, text_folders: list[tuple[str, str]], ema_unet: dict | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a single file for an SDModel-like `model` (cfg, unet, vae, scale_factor): the SGM /
    CompVis layout, the configs and tokenizers in the metadata."""
    from ldm.text_encoders import _model_class
    cfg = model.cfg
    family = {"text_pooled": "sdxl"}.get(cfg.conditioning.kind) or (
        "sd2" if cfg.unet.use_linear_projection else "sd1")
    out = {f"{UNET}{k}": v for k, v in model.unet.items()}
    out.update({f"{VAE}{k}": v for k, v in model.vae.items()})
    if ema_unet is not None:  # LitEma's flat names: "diffusion_model.a.b" as "diffusion_modelab"
        out.update({EMA + ("diffusion_model." + k).replace(".", ""): v for k, v in ema_unet.items()})
    meta = {"ldm_ray.config": json.dumps(to_dict(cfg)), "ldm_ray.scale_factor": str(model.scale_factor),
            "ldm_ray.family": family}
    if len(text_folders) != len(TEXT[family]):
        raise ValueError(f"a {family} single file holds {len(TEXT[family])} text encoder(s); the model has "
                         f"{len(text_folders)}")
    for i, ((prefix, names), (enc, tok)) in enumerate(zip(TEXT[family], text_folders)):
        model = _model_class(enc).from_pretrained(enc, local_files_only=True)
        # CLIPTextModel's own keys start at embeddings. (transformers 5), the WithProjection model's at text_model.
        hf = {k if k.startswith(HF) or k == "text_projection.weight" else HF + k: v
              for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        meta[f"ldm_ray.text_config.{i}"] = json.dumps(config_from_hf(hf, ACT[names]) | _head_count(enc))
        weights = hf if names == "hf" else hf_to_openclip(hf, identity_layer=family == "sd2")
        out.update({f"{prefix}{k}": v for k, v in weights.items()})
        meta[f"ldm_ray.tokenizer.{i}"] = json.dumps({f: (Path(tok) / f).read_text() for f in TOKENIZER_FILES
                                                     if (Path(tok) / f).exists()})
    return out, meta


def _head_count(folder: str) -> dict:
    c = json.loads((Path(folder) / "config.json").read_text())
    return {k: c[k] for k in ("num_attention_heads", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
            if k in c}
