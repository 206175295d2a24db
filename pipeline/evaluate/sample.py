"""Text-to-image sampling from a trained LDM export (paper §3.3, §4.3) for jobs/sample.py and the demo: load the
export, its first stage and its text encoder, then ldm.sampling.generate (z_T ~ N(0, I) -> DDIM / DPM-Solver++ /
DDPM with classifier-free guidance -> D(z))."""
from __future__ import annotations

import json

import torch

from ldm.autoencoder import pixel_encoder
from ldm.checkpoint import load_components
from ldm.conditioning import Conditioner
from ldm.config import LDMConfig, from_dict
from ldm.diffusion import Schedule
from ldm.latent_scale import LatentScale
from ldm.model import LatentDiffusion
from ldm.sampling import generate


def load_imported(path: str, device="cpu") -> tuple[LatentDiffusion, dict]:
    """A Stable Diffusion model (diffusers folder or single file) -> the LatentDiffusion module and the metadata an
    export would give: the published latent scale, its own first stage and text encoder(s), its training size."""
    from pipeline.common.sd_import import import_sd, resolve_sd
    m = import_sd(path)
    net = LatentDiffusion(m.cfg)
    net.unet.load_state_dict(m.unet, strict=True)
    folder = str(resolve_sd(path))
    ae = m.cfg.autoencoder
    side = ae.resolution // ae.downsample_factor
    return net.to(device).eval(), {"latent_scale": LatentScale(m.scale_factor or 1.0, 0.0),
                                   "autoencoder": {"source": folder}, "text_encoder": {"source": folder},
                                   "step": None, "mlflow_run_id": "", "precision": "fp32",
                                   "latent_shape": (ae.embed_dim, side, side), "buckets": []}


def load_ldm(export: str, use_ema: bool = True, device="cpu") -> tuple[LatentDiffusion, dict]:
    """A consolidated export (jobs/train_ldm.py), or a Stable Diffusion model -> the LatentDiffusion module and its
    metadata."""
    from pipeline.common.sd_import import is_sd
    if is_sd(export):
        return load_imported(export, device)
    comps, config, meta = load_components(export)
    net = LatentDiffusion(from_dict(LDMConfig, config))
    pre = "ema_" if use_ema and "ema_unet" in comps else ""
    net.unet.load_state_dict(comps[f"{pre}unet"], strict=True)
    if net.cond_stage is not None:
        net.cond_stage.load_state_dict(comps[f"{pre}cond_stage"], strict=True)
    if "latent_scale" not in meta:
        raise ValueError(f"{export} has no latent_scale in its metadata: it was not written by jobs/train_ldm.py")
    info = {"latent_scale": LatentScale.from_json(meta["latent_scale"]),
            "autoencoder": json.loads(meta.get("autoencoder", "{}")),
            "text_encoder": json.loads(meta.get("text_encoder", "{}")), "step": meta.get("step"),
            "mlflow_run_id": meta.get("mlflow_run_id", ""), "precision": meta.get("precision", "fp32"),
            "latent_shape": tuple(json.loads(meta["latent_shape"])),
            # the aspect buckets it was trained on ((h, w) pixels; [] = square crops): --size picks the nearest
            "buckets": [tuple(b) for b in json.loads(meta.get("buckets", "[]"))]}
    return net.to(device).eval(), info


class LDMSampler:
    """An export loaded once (UNet, its first stage, its text encoder): call it with prompts to get images."""

    def __init__(self, export: str, autoencoder: str = "", text_encoder: str = "", device="cpu",
                 tracking_uri: str = "", precision: str = ""):
        """precision: one of pipeline.common.precision.PRECISIONS; "" = the one the export was trained in (fp32
        samples in fp32, bf16 and autocast under autocast)."""
        from pipeline.common.models import load_autoencoder, local_file, text_encoder_path
        from pipeline.common.precision import for_sampling
        self.net, self.info = load_ldm(local_file(export, tracking_uri), device=device)
        self.precision = for_sampling(precision or self.info["precision"], torch.device(device).type == "cuda")
        self.autocast = self.precision == "autocast"
        ae_spec = autoencoder or self.info["autoencoder"].get("source", "")
        ae = load_autoencoder(ae_spec, tracking_uri=tracking_uri)
        want = self.info["autoencoder"].get("weights_sha256")
        if want and ae.identity["weights_sha256"] != want:
            raise ValueError(f"autoencoder {ae_spec} (weights {ae.identity['weights_sha256']}) is not the one the "
                             f"model was trained with ({want}); pass --autoencoder with the right first stage")
        self.decode, self.resolution, self.device = ae.model.to(device).decode, ae.cfg.resolution, device
        self.f = ae.cfg.downsample_factor  # pixels per latent, the paper's f
        self.conditioner = Conditioner.build(self.net, text_encoder or text_encoder_path(self.info["text_encoder"]),
                                             device, self.info["latent_scale"], pixel_encoder(ae.model))
        self.alphas_cumprod = Schedule.from_config(self.net.cfg.diffusion).alphas_cumprod

    def untrained(self, seed: int = 0) -> "LDMSampler":
        """The same sampler (first stage, conditioning, schedule) with the LDM at its initial weights, drawn with
        `seed`: the baseline whose sample FD a trained model must beat."""
        import copy
        other = copy.copy(self)
        torch.manual_seed(seed)
        other.net = LatentDiffusion(self.net.cfg).to(self.device).eval()
        return other

    def set_noise_level(self, level: int) -> None:
        """A super-resolution model's noise-augmentation level of the low-res condition at sampling."""
        self.conditioner.cfg = self.kind.noise_level(self.conditioner.cfg, level)

    @property
    def mode(self) -> str:
        return self.conditioner.mode

    @property
    def kind(self):
        return self.conditioner.kind

    def latent_shape(self, size: tuple[int, int] | None = None) -> tuple:
        """The latent shape of images of `size` = (height, width) pixels; None: the training size."""
        shape = tuple(self.info["latent_shape"])
        if size is None:
            return shape
        # whole latents that the UNet's downsamplings divide
        f, m = self.f, self.f * 2 ** (len(self.net.cfg.unet.channel_mult) - 1)
        if any(v <= 0 or v % m for v in size):
            raise ValueError(f"sample size {size[0]}x{size[1]} is not a positive multiple of {m} (the first stage's "
                             f"f={f} times the UNet's {m // f}x downsampling): e.g. {2 * self.resolution}x"
                             f"{2 * self.resolution}")
        return (shape[0], size[0] // f, size[1] // f)

    @torch.no_grad()
    def __call__(self, prompts: list, *, steps: int = 50, cfg_scale: float = 5.0, seed: int = 0,
                 sampler: str = "auto", seeds: list[int] | None = None, eta: float = 0.0,
                 size: tuple[int, int] | None = None, orig_size: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if (orig_size is not None or crop != (0, 0)) and not self.conditioner.micro:
            raise ValueError("--orig-size / --crop set a micro-conditioned model's size and crop conditions "
                             "(unet.micro_cond); this model was trained without them")
        trained = tuple(v * self.f for v in self.latent_shape()[1:])
        prompts, size = self.kind.canvas(self.conditioner, prompts, size, trained)
        size = None if size == trained else size
        if size is not None and self.info["buckets"] and size not in self.info["buckets"]:
            from pipeline.data.buckets import nearest
            size = nearest(size[1], size[0], self.info["buckets"])  # a bucketed model: the bucket of that aspect
        dev = torch.device(self.device).type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
            images = generate(self.net, self.conditioner, self.info["latent_scale"], self.decode, prompts,
                              self.latent_shape(size), self.alphas_cumprod, steps=steps, cfg_scale=cfg_scale,
                              seed=seed, sampler=sampler, parameterization=self.net.cfg.diffusion.prediction,
                              device=self.device, seeds=seeds, eta=eta, orig_size=orig_size, crop=crop).float()
        return self.kind.finish(images, prompts)


def sample_images(export: str, prompts: list, n_per_prompt: int = 1, autoencoder: str = "", text_encoder: str = "",
                  steps: int = 50, cfg_scale: float = 5.0, seed: int = 0, sampler: str = "auto",
                  device="cpu", eta: float = 0.0, size: tuple[int, int] | None = None,
                  noise_level: int | None = None, orig_size: tuple[int, int] | None = None,
                  crop: tuple[int, int] = (0, 0), precision: str = "") -> tuple[torch.Tensor, list]:
    """Images for each prompt (a caption, a class id, a low-res image or an image and its mask), n_per_prompt each;
    noise_level overrides a super-resolution model's lowres_noise_sample; orig_size and crop set a micro-conditioned
    model's size and crop conditions (default: an uncropped original of the sample's size)."""
    full = [p for p in prompts for _ in range(n_per_prompt)]
    model = LDMSampler(export, autoencoder, text_encoder, device, precision=precision)
    if noise_level is not None:
        model.set_noise_level(noise_level)
    images = model(full, steps=steps, cfg_scale=cfg_scale, seed=seed, sampler=sampler, eta=eta, size=size,
                   orig_size=orig_size, crop=crop)
    return images, full
