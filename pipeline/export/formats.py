"""jobs/export.py: an ldm-ray export (or a run, a checkpoint, an MLflow model, a Stable Diffusion model) written as a
diffusers folder (StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained loads it) or as one
.safetensors in the CompVis / SGM key layout (ComfyUI, A1111, diffusers' from_single_file, and --init-from read it).
Only the text kinds have such pipelines; the paper's other conditionings are refused with the reason."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.config import LDMConfig
from pipeline.common import storage

FORMATS = ("diffusers", "single-file")


@dataclass
class Exportable:
    """A model in the shape the writers take: config, UNet (the EMA weights by default) and first stage in our
    names, its latent scale, its text encoders' folders, and its latent side (diffusers' sample_size)."""
    cfg: LDMConfig
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    latent_scale: object
    text_folders: list[tuple[str, str]]
    latent_side: int
    scale_factor: float = 0.0


def export_file(model: str, tracking_uri: str = "") -> str:
    """The export a --model names: an export file, a checkpoint dir (its export/), a run dir (its newest checkpoint's),
    or an MLflow model (downloaded)."""
    from pipeline.common.models import local_file
    from pipeline.train.checkpoints import list_checkpoints
    if model.startswith(("mlflow-models:/", "models:/", "runs:/")) or model.endswith(".safetensors"):
        return local_file(model, tracking_uri)
    inside = storage.join(model.rstrip("/"), "export", "model.safetensors")
    if storage.exists(inside):
        return local_file(inside)
    found = [c for c in list_checkpoints(model) if storage.exists(storage.join(c, "export", "model.safetensors"))]
    if not found:
        raise FileNotFoundError(f"--model {model}: no export in it (an export file, a checkpoint or run dir whose last "
                                f"checkpoint holds export/model.safetensors, or an MLflow model URI)")
    return local_file(storage.join(found[0], "export", "model.safetensors"))


def load_exportable(model: str, use_ema: bool = True, tracking_uri: str = "") -> Exportable:
    """A model to write: an ldm-ray export (its first stage and text encoder from where the export names them) or a
    Stable Diffusion model."""
    from ldm.latent_scale import LatentScale
    from ldm.text_encoders import encoder_folders, text_encoder_dir
    from pipeline.common.models import load_autoencoder, text_encoder_path
    from pipeline.common.sd_import import import_sd, is_sd
    from pipeline.evaluate.sample import load_ldm
    if is_sd(model):
        m = import_sd(model)
        side = m.cfg.autoencoder.resolution // m.cfg.autoencoder.downsample_factor
        return Exportable(m.cfg, m.unet, m.vae, LatentScale(m.scale_factor, 0.0), m.text_folders, side, m.scale_factor)
    net, info = load_ldm(export_file(model, tracking_uri), use_ema=use_ema)
    ae = load_autoencoder(info["autoencoder"].get("source", ""), tracking_uri=tracking_uri)
    text = text_encoder_path(info["text_encoder"])
    folders = [] if info["text_encoder"].get("kind") == "none" else encoder_folders(text_encoder_dir(text))
    return Exportable(net.cfg, net.unet.state_dict(), ae.model.state_dict(), info["latent_scale"], folders,
                      info["latent_shape"][-1])


def refuse(x: Exportable, fmt: str) -> None:
    """The paper's conditionings without a Stable Diffusion pipeline, and a single file without CLIP text encoders."""
    from ldm.convert.sd_folder import PIPELINES
    kind = x.cfg.conditioning.kind
    if kind not in PIPELINES:
        raise ValueError(f"a {kind}-conditioned model has no diffusers pipeline and no single-file layout that "
                         f"loads it ({', '.join(PIPELINES.values())} are text-to-image): its ldm-ray export is the "
                         f"model, for jobs/sample.py, the served MLflow model and --init-from")
    if x.cfg.diffusion.objective == "flow":
        raise ValueError("a rectified-flow UNet (diffusion.objective=flow) has no Stable Diffusion pipeline that "
                         "samples it: StableDiffusionPipeline's schedulers are ddpm ones (FlowMatchEulerDiscrete"
                         "Scheduler lacks the init_noise_sigma and scale_model_input it calls), and a single file "
                         "records no objective; its ldm-ray export is the model (jobs/sample.py --sampler euler|heun, "
                         "the served MLflow model, --init-from)")
    if x.cfg.unet.micro_cond:
        raise ValueError("the UNet's size-and-crop embedding (unet.micro_cond) has no counterpart in diffusers' "
                         "UNet2DConditionModel (SDXL's size conditioning is the text_pooled kind's): its ldm-ray "
                         "export is the model")
    if x.cfg.conditioning.text_encoder != "hf" or not x.text_folders:
        raise ValueError("the model's text encoder is trained with it (conditioning.text_encoder=transformer): no "
                         "Stable Diffusion pipeline loads that; its ldm-ray export is the model")
    if fmt == "single-file":
        import json
        archs = [json.loads((Path(e) / "config.json").read_text()).get("architectures", [""])[0]
                 for e, _ in x.text_folders]
        if not all(a.startswith("CLIPTextModel") for a in archs):
            raise ValueError(f"a single file holds CLIP text encoders (SD's layout); this model's are {archs}: "
                             f"export it with --format diffusers, which copies any Hugging Face text encoder")


def write(x: Exportable, fmt: str, out: str) -> str:
    """Write `x` as `fmt` at `out` (a folder for diffusers, a .safetensors file for single-file); -> the path."""
    from ldm.checkpoint import atomic_write_bytes
    from ldm.convert.sd_folder import bake_latent_scale, write_pipeline
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    refuse(x, fmt)
    vae, scaling = bake_latent_scale(x.vae, x.latent_scale)
    if fmt == "diffusers":
        return str(write_pipeline(out, x.cfg, x.unet, vae, scaling, x.text_folders, x.latent_side))
    from safetensors.torch import save_file

    from ldm.convert.single_file import from_pipeline
    tensors, meta = from_pipeline(Exportable(x.cfg, x.unet, vae, None, [], x.latent_side, scaling), x.text_folders)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(out, lambda tmp: save_file(flat, tmp, meta))
    return out


def export_model(model: str, fmt: str, out: str, use_ema: bool = True, tracking_uri: str = "", log=print) -> str:
    x = load_exportable(model, use_ema, tracking_uri)
    path = write(x, fmt, out)
    log(f"[export] {model} -> {fmt} at {path} ({x.cfg.conditioning.kind} conditioning, latent {x.latent_side}x"
        f"{x.latent_side}, {'EMA' if use_ema else 'raw'} weights)")
    return path
