"""Text-to-image sampling from a trained LDM export (paper §3.3, §4.3) for jobs/sample.py and the demo: load the
export, its first stage and its text encoder, then ldm.sampling.generate (z_T ~ N(0, I) -> DDIM / DPM-Solver++ /
DDPM with classifier-free guidance -> D(z))."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from ldm.autoencoder import pixel_encoder
from ldm.checkpoint import load_components
from ldm.conditioning import Conditioner
from ldm.config import LDMConfig, from_dict
from ldm.diffusion import Schedule
from ldm.latent_scale import LatentScale
from ldm.model import LatentDiffusion
from ldm.sampling import generate


def load_ldm(export: str, use_ema: bool = True, device="cpu") -> tuple[LatentDiffusion, dict]:
    """A consolidated export (jobs/train_ldm.py) -> the LatentDiffusion module and its metadata."""
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
            "mlflow_run_id": meta.get("mlflow_run_id", ""),
            "latent_shape": tuple(json.loads(meta["latent_shape"])),
            # the aspect buckets it was trained on ((h, w) pixels; [] = square crops): --size picks the nearest
            "buckets": [tuple(b) for b in json.loads(meta.get("buckets", "[]"))]}
    return net.to(device).eval(), info


def open_image(src):
    """PIL's Image.open of a path or of a file's bytes."""
    import io

    from PIL import Image
    return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)


def read_rgb(src) -> np.ndarray:
    """An image file (a path or its bytes) as an (h, w, 3) uint8 array: a super-resolution model's low-res input."""
    with open_image(src) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_label_map(src) -> np.ndarray:
    """A label map file (a path or its bytes): an 8-bit grayscale or palette PNG whose pixel values are class ids."""
    with open_image(src) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"a label map is an 8-bit grayscale or palette PNG of class ids, not mode {im.mode}")
        return np.asarray(im, dtype=np.uint8)


def read_mask(src) -> np.ndarray:
    """A mask file (a path or its bytes) as an (h, w) bool array: white (> 127) is the hole to inpaint (SD's way)."""
    with open_image(src) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8) > 127


class LDMSampler:
    """An export loaded once (UNet, its first stage, its text encoder): call it with prompts to get images."""

    def __init__(self, export: str, autoencoder: str = "", text_encoder: str = "", device="cpu",
                 tracking_uri: str = "", precision: str = "fp32"):
        """precision: fp32, or autocast (fp32 weights, bf16 matmuls/convs: the layout demo's 200 scenes in 25 s
        instead of 46 s on a CPU with native bf16)."""
        from pipeline.common.models import load_autoencoder, local_file, text_encoder_path
        if precision not in ("fp32", "autocast"):
            raise ValueError(f"precision {precision!r}: use fp32 or autocast")
        self.autocast = precision == "autocast"
        self.net, self.info = load_ldm(local_file(export, tracking_uri), device=device)
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
        cfg = self.conditioner.cfg
        if self.mode != "lowres" or not 0 <= level <= cfg.lowres_noise_max:
            raise ValueError(f"noise level {level}: only a super-resolution model trained with noise augmentation "
                             f"takes one, in [0, {cfg.lowres_noise_max}] (this model: {self.mode} conditioning)")
        self.conditioner.cfg = dataclasses.replace(cfg, lowres_noise_sample=level)

    @property
    def mode(self) -> str:
        return self.conditioner.mode

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
                 sampler: str = "ddim", seeds: list[int] | None = None, eta: float = 0.0,
                 size: tuple[int, int] | None = None, orig_size: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if (orig_size is not None or crop != (0, 0)) and not self.conditioner.micro:
            raise ValueError("--orig-size / --crop set a micro-conditioned model's size and crop conditions "
                             "(unet.micro_cond); this model was trained without them")
        if self.mode == "lowres":  # the output is the low-res images' size times the factor (any size: §4.3.2)
            sizes = {tuple(np.asarray(p).shape) for p in prompts}
            shape = next(iter(sizes))
            if len(sizes) != 1 or len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"a super-resolution model takes low-res RGB images of one size (h, w, 3); got "
                                 f"shapes {sorted(sizes)}")
            h, w, _ = shape
            k = self.conditioner.cfg.lowres_factor
            if size is not None and size != (h * k, w * k):
                raise ValueError(f"--size {size[0]}x{size[1]} does not match the low-res images: {h}x{w} x{k} is "
                                 f"{h * k}x{w * k}")
            size = None if (h * k, w * k) == (self.resolution, self.resolution) else (h * k, w * k)
        if self.mode == "inpaint":
            size = self.inpaint_size(prompts, size)
        if self.mode == "semantic":  # the output is the label maps' size: any multiple of the UNet's (§4.3.2)
            sizes = {np.asarray(p).shape for p in prompts}
            shape = next(iter(sizes))
            if len(sizes) != 1 or len(shape) != 2:
                raise ValueError(f"a semantic synthesis model takes (h, w) label maps of one size; got shapes "
                                 f"{sorted(sizes)}")
            if size is not None and size != shape:
                raise ValueError(f"--size {size[0]}x{size[1]} does not match the label maps ({shape[0]}x{shape[1]})")
            size = shape
        if self.mode == "layout":
            prompts, size = self.layout_size(prompts, size)
        if size is not None and self.info["buckets"] and size not in self.info["buckets"]:
            from pipeline.data.buckets import nearest
            size = nearest(size[1], size[0], self.info["buckets"])  # a bucketed model: the bucket of that aspect
        dev = torch.device(self.device).type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
            images = generate(self.net, self.conditioner, self.info["latent_scale"], self.decode, prompts,
                              self.latent_shape(size), self.alphas_cumprod, steps=steps, cfg_scale=cfg_scale,
                              seed=seed, sampler=sampler, parameterization=self.net.cfg.diffusion.parameterization,
                              device=self.device, seeds=seeds, eta=eta, orig_size=orig_size, crop=crop).float()
        if self.mode == "inpaint":  # the known pixels as given, the generated ones in the hole (§4.5)
            known = torch.from_numpy(np.stack([p["image"] for p in prompts])).permute(0, 3, 1, 2).float() / 127.5 - 1
            hole = torch.from_numpy(np.stack([np.asarray(p["mask"], bool) for p in prompts]))[:, None].to(images.device)
            images = torch.where(hole, images, known.to(images.device))
        return images

    def layout_size(self, prompts: list, size: tuple[int, int] | None) -> tuple[list, tuple[int, int] | None]:
        """A layout model's output size: --size, else the layouts' own canvas (one size), else the training size;
        each layout's boxes moved to that canvas (they keep their place relative to it)."""
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, dict) or {"size", "boxes"} - set(p)]
        if bad:
            raise ValueError(f'a layout model takes {{"size": [H, W], "boxes": [[class, top, left, height, width], '
                             f'...]}} per sample; sample(s) {bad[:5]} are not')
        sizes = {tuple(int(v) for v in p["size"]) for p in prompts}
        trained = tuple(v * self.f for v in self.latent_shape()[1:])
        target = size or (next(iter(sizes)) if len(sizes) == 1 else trained)

        def moved(p: dict) -> dict:
            (h, w), (th, tw) = p["size"], target
            return {"size": list(target), "boxes": [[c, t * th / h, le * tw / w, bh * th / h, bw * tw / w]
                                                    for c, t, le, bh, bw in p["boxes"]]}
        return [moved(p) for p in prompts], (None if target == trained else target)

    def inpaint_size(self, prompts: list, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """An inpainting model's output size: its images' (one size, any multiple of the UNet's; §4.3.2)."""
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, dict) or {"image", "mask"} - set(p)]
        if bad:
            raise ValueError(f"an inpainting model takes {{'image': (h, w, 3) uint8, 'mask': (h, w) bool}} per sample; "
                             f"sample(s) {bad[:5]} are not")
        sizes = {(np.asarray(p["image"]).shape, np.asarray(p["mask"]).shape) for p in prompts}
        (img, mask) = next(iter(sizes))
        if len(sizes) != 1 or len(img) != 3 or img[2] != 3 or mask != img[:2]:
            raise ValueError(f"an inpainting model takes RGB images of one size with masks of that size; got "
                             f"(image, mask) shapes {sorted(sizes)}")
        if size is not None and size != img[:2]:
            raise ValueError(f"--size {size[0]}x{size[1]} does not match the images to inpaint ({img[0]}x{img[1]})")
        return None if img[:2] == (self.resolution, self.resolution) else tuple(img[:2])


def sample_images(export: str, prompts: list, n_per_prompt: int = 1, autoencoder: str = "", text_encoder: str = "",
                  steps: int = 50, cfg_scale: float = 5.0, seed: int = 0, sampler: str = "ddim",
                  device="cpu", eta: float = 0.0, size: tuple[int, int] | None = None,
                  noise_level: int | None = None, orig_size: tuple[int, int] | None = None,
                  crop: tuple[int, int] = (0, 0), precision: str = "fp32") -> tuple[torch.Tensor, list]:
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
