"""Stable Diffusion models as diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder(_2)/,
tokenizer(_2)/, scheduler/): read one into our config and weights, write one from ours. SD 1.x / 2.x load with
`StableDiffusionPipeline.from_pretrained`, SDXL with `StableDiffusionXLPipeline.from_pretrained`."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoint import atomic_write_bytes, read_diffusers_folder
from ldm.config import ConditioningConfig, DiffusionConfig, LDMConfig
from ldm.convert.diffusers import (unet_config_from_diffusers, unet_config_to_diffusers, unet_from_diffusers,
                                   unet_to_diffusers, vae_config_from_diffusers, vae_config_to_diffusers,
                                   vae_from_diffusers, vae_to_diffusers)

PIPELINES = {"text": "StableDiffusionPipeline", "text_pooled": "StableDiffusionXLPipeline"}
# how each pipeline reads its text encoder(s), and what else its model_index.json says
TEXT_LAYER = {"text": "last", "text_pooled": "penultimate"}
INDEX_EXTRA = {"text": {"safety_checker": [None, None], "feature_extractor": [None, None],
                        "requires_safety_checker": False, "image_encoder": [None, None]},
               "text_pooled": {"force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
                               "feature_extractor": [None, None]}}
SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours: diffusers'
TARGETS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@dataclass
class SDModel:
    """A Stable Diffusion model in our terms: its config, UNet and first stage weights (our names), the published
    latent scale, and its text encoders' folders (each a model folder and its tokenizer's)."""
    cfg: LDMConfig
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    scale_factor: float
    text_folders: list[tuple[str, str]]


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").exists()


def _diffusion(s: dict) -> DiffusionConfig:
    schedule = {v: k for k, v in SCHEDULES.items()}.get(s.get("beta_schedule", "scaled_linear"))
    target = {v: k for k, v in TARGETS.items()}.get(s.get("prediction_type", "epsilon"))
    if schedule is None or target is None:
        raise ValueError(f"scheduler with beta_schedule={s.get('beta_schedule')!r}, prediction_type="
                         f"{s.get('prediction_type')!r}: not a schedule or target this project trains")
    return DiffusionConfig(timesteps=s.get("num_train_timesteps", 1000), beta_schedule=schedule,
                           linear_start=s.get("beta_start", 0.00085), linear_end=s.get("beta_end", 0.012),
                           parameterization=target, zero_terminal_snr=bool(s.get("rescale_betas_zero_snr")))


def _max_length(tokenizer_dir: Path, text_config: dict) -> int:
    tc = tokenizer_dir / "tokenizer_config.json"
    n = json.loads(tc.read_text()).get("model_max_length") if tc.exists() else None
    return int(n) if n and n < 100000 else int(text_config.get("max_position_embeddings", 77))


def read_pipeline(folder: str | Path) -> SDModel:
    """A diffusers SD 1.x / 2.x / XL folder -> our config (UNet and first stage from their configs, the schedule
    from the scheduler's, the conditioning from the pipeline class: CLIP's last layer for SD 1.x / 2.x, the
    penultimate layers of both encoders and the pooled projection for SDXL; every token attended), our weights."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    kind = {v: k for k, v in PIPELINES.items()}.get(index.get("_class_name"))
    if kind is None:
        raise ValueError(f"{folder}: a {index.get('_class_name')} folder; this project imports "
                         f"{' and '.join(PIPELINES.values())} folders")
    ucfg, sd = read_diffusers_folder(folder / "unet")
    unet_cfg, extra = unet_config_from_diffusers(ucfg)
    vcfg, vsd = read_diffusers_folder(folder / "vae")
    vae_cfg = vae_config_from_diffusers(vcfg)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    texts = [(folder / e, folder / t) for e, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
             if (folder / e).is_dir()]
    last = json.loads((texts[-1][0] / "config.json").read_text())
    cond = ConditioningConfig(kind=kind, text_encoder="hf", text_encoder_path=str(folder), mask_padding=False,
                              max_length=_max_length(texts[0][1], last), cond_drop_prob=0.1,
                              text_layer=TEXT_LAYER[kind], pooled_dim=last.get("projection_dim", 0) if len(texts) > 1
                              else 0,
                              micro_dim=extra["micro_dim"])
    cfg = LDMConfig(name=f"imported-{index['_class_name']}", autoencoder=vae_cfg, unet=unet_cfg,
                    diffusion=_diffusion(scheduler), conditioning=cond)
    return SDModel(cfg, unet_from_diffusers(sd, unet_cfg), vae_from_diffusers(vsd, vae_cfg),
                   float(vcfg.get("scaling_factor") or 0.0), [(str(e), str(t)) for e, t in texts])


def bake_latent_scale(vae: dict, scale) -> tuple[dict, float]:
    """(the first stage's weights, diffusers' scaling_factor) for a LatentScale: one scale and no shift stays SD's
    scaling_factor; a shift or a per-channel scale (diffusers' pipelines divide by one number) is folded into the
    1x1 convolutions around the latent: quant_conv then gives (z - shift) * scale (its log-variance + 2 log scale)
    and post_quant_conv takes z / scale + shift, with scaling_factor 1."""
    s, m = scale.scale, scale.shift
    if not isinstance(s, tuple) and not isinstance(m, tuple) and m == 0:
        return vae, float(s)
    c = vae["post_quant_conv.weight"].shape[1]
    s = torch.tensor(s if isinstance(s, tuple) else [s] * c, dtype=torch.float64)
    m = torch.tensor(m if isinstance(m, tuple) else [m] * c, dtype=torch.float64)
    out = dict(vae)
    w, b = vae["post_quant_conv.weight"].double(), vae["post_quant_conv.bias"].double()
    out["post_quant_conv.weight"] = (w / s.view(1, -1, 1, 1)).float()
    out["post_quant_conv.bias"] = (b + (w[:, :, 0, 0] * m.view(1, -1)).sum(1)).float()
    w, b = vae["quant_conv.weight"].double().clone(), vae["quant_conv.bias"].double().clone()
    w[:c] *= s.view(-1, 1, 1, 1)
    b[:c] = (b[:c] - m) * s
    b[c:] += 2 * torch.log(s)
    out["quant_conv.weight"], out["quant_conv.bias"] = w.float(), b.float()
    return out, 1.0


def _write_model(folder: Path, config: dict, sd: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    flat = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    atomic_write_bytes(folder / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(flat, tmp))


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """DDIMScheduler as ldm.sampling.sample_ddim steps: evenly spaced ("leading") steps offset by 1, the last step
    landing on alpha_bar_0."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.timesteps, "beta_start": cfg.linear_start,
            "beta_end": cfg.linear_end, "beta_schedule": SCHEDULES[cfg.beta_schedule], "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "prediction_type": TARGETS[cfg.parameterization], "rescale_betas_zero_snr": cfg.zero_terminal_snr}


def write_pipeline(folder: str | Path, cfg: LDMConfig, unet: dict, vae: dict, scale_factor: float,
                   text_folders: list[tuple[str, str]], sample_size: int) -> Path:
    """A diffusers folder of our UNet and first stage (the latent scale as the VAE's scaling_factor) with copies of the
    text encoders and tokenizers, loadable by the pipeline of the conditioning kind."""
    from transformers import AutoConfig
    kind = cfg.conditioning.kind
    if kind not in PIPELINES:
        raise ValueError(f"a {kind}-conditioned model has no diffusers pipeline to load it (diffusers has "
                         f"{' and '.join(PIPELINES.values())} for text kinds): export it with --format single-file")
    folder = Path(folder)
    _write_model(folder / "unet", unet_config_to_diffusers(cfg.unet, sample_size, cfg.conditioning.micro_dim),
                 unet_to_diffusers(unet, cfg.unet))
    _write_model(folder / "vae", vae_config_to_diffusers(cfg.autoencoder, scale_factor),
                 vae_to_diffusers(vae, cfg.autoencoder))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg.diffusion), indent=2))
    index = {"_class_name": PIPELINES[kind], "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    for (enc, tok), (src_enc, src_tok) in zip(names, text_folders):
        for src, dst in ((src_enc, enc), (src_tok, tok)):
            if Path(src).resolve() != (folder / dst).resolve():
                shutil.copytree(src, folder / dst, dirs_exist_ok=True)
        arch = (AutoConfig.from_pretrained(src_enc, local_files_only=True).architectures or ["CLIPTextModel"])[0]
        index[enc] = ["transformers", arch]
        index[tok] = ["transformers", _tokenizer_class(Path(src_tok))]
    index.update(INDEX_EXTRA[kind])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _tokenizer_class(folder: Path) -> str:
    tc = folder / "tokenizer_config.json"
    name = json.loads(tc.read_text()).get("tokenizer_class") if tc.exists() else None
    return name or ("CLIPTokenizer" if (folder / "merges.txt").exists() else "AutoTokenizer")


def _diffusers_version() -> str:
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return "0.30.0"
