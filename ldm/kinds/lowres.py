"""Super-resolution (paper §4.4, SR3's setting): the low-res image, resized to the latent's size (the spatial
rescaler), concatenated to z_t. Noise augmentation as in SD's x4 upscaler: the condition is noised to a level in
[0, lowres_noise_max] of a 1000-step DDPM schedule, the level given to the UNet as its class y."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import dense_prompts, drop_dense, one_size, square_images
from ldm.kinds.inputs import read_rgb

# the noise augmentation of a low-res condition (SD's x4 upscaler: "linear" betas 1e-4..0.02 over 1000 steps)
LOWRES_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2,
                                      0).float()


def downscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """The super-resolution input (paper §4.4, SR3's setting): bicubic, antialiased downscaling by `factor`."""
    from PIL import Image
    h, w = arr.shape[:2]
    return np.asarray(Image.fromarray(arr).resize((w // factor, h // factor), Image.BICUBIC), dtype=np.uint8)


class LowRes(Kind):
    name = "lowres"
    spatial = dense = True
    inputs = (Input("image", "--lowres", read_rgb, "a low-res image (PNG/JPEG, repeatable): the output is its size "
                    "times the model's lowres_factor", "IMAGE", "binary"),)
    sample_columns = ("lowres",)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, ae, un = cfg.conditioning, cfg.autoencoder, cfg.unet
        if c.concat_channels != ae.in_channels:
            raise ConfigError(f"conditioning.kind='lowres' concatenates the {ae.in_channels}-channel low-res image: "
                              f"set conditioning.concat_channels={ae.in_channels} (and unet.in_channels="
                              f"{ae.embed_dim + ae.in_channels})")
        if ae.resolution % c.lowres_factor:
            raise ConfigError(f"conditioning.lowres_factor={c.lowres_factor} must divide autoencoder.resolution="
                              f"{ae.resolution}")
        want = c.lowres_noise_max + 1 if c.lowres_noise_max else None
        if un.num_classes != want:
            raise ConfigError(f"conditioning.lowres_noise_max={c.lowres_noise_max} gives the UNet the noise level as "
                              f"its class: set unet.num_classes={'null' if want is None else want}")
        if not 0 <= c.lowres_noise_sample <= c.lowres_noise_max:
            raise ConfigError(f"conditioning.lowres_noise_sample={c.lowres_noise_sample} must be in "
                              f"[0, lowres_noise_max={c.lowres_noise_max}]")

    def check_cache(self, cfg, manifest, cache):
        k, want = manifest.get("preprocess", {}).get("lowres_factor", 0), cfg.conditioning.lowres_factor
        if k != want:
            raise CacheMismatch(f"conditioning.kind=lowres with conditioning.lowres_factor={want} needs a cache of "
                                f"low-res copies downscaled by that factor, but the cache {cache} was encoded "
                                + (f"with --lowres-factor {k}" if k else "without low-res copies")
                                + f": re-encode into a new --output with --lowres-factor {want}")

    def columns(self, cfg, cached_emb):
        return ("lowres",)

    def condition(self, c, images: torch.Tensor, level: torch.Tensor, generator) -> dict:
        """uint8 (B, h, w, 3) low-res images -> the concat condition at the latent's size (h k/f, w k/f), noised to
        `level` of the augmentation schedule (SD x4 upscaler), with the level as the UNet's class y."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = tuple(v * c.cfg.lowres_factor // c.f for v in x.shape[-2:])
        if size != tuple(x.shape[-2:]):  # the spatial rescaler: the condition meets z_t at its own size
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        if not c.cfg.lowres_noise_max:
            return {"concat": x}
        abar = LOWRES_ALPHAS_CUMPROD.to(x.device)[level.to(x.device).long()].view(-1, 1, 1, 1)
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=dev).to(x.device)
        return {"concat": abar.sqrt() * x + (1 - abar).sqrt() * noise, "y": level.to(x.device).long()}

    def batch(self, c, batch, drop, generator):
        draw_on = generator.device if generator is not None else c.device
        level = torch.randint(0, c.cfg.lowres_noise_max + 1, (drop.shape[0],), generator=generator, device=draw_on)
        return drop_dense(self.condition(c, square_images(batch["lowres"].to(c.device)), level.to(c.device),
                                         generator), drop)

    def prompts(self, c, prompts):
        images = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in prompts])).to(c.device)
        level = torch.full((len(prompts),), c.cfg.lowres_noise_sample, device=c.device)
        return dense_prompts(self.condition(c, images, level, torch.Generator(device=c.device).manual_seed(0)), c.cfg)

    def canvas(self, c, prompts, size, trained):
        """The output is the low-res images' size times the factor (any size: §4.3.2)."""
        shape = one_size({tuple(np.asarray(p).shape) for p in prompts}, "a super-resolution model takes low-res RGB "
                         "images (h, w, 3)")
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"a super-resolution model takes low-res RGB images (h, w, 3), not shape {shape}")
        h, w, _ = shape
        k = c.cfg.lowres_factor
        if size is not None and size != (h * k, w * k):
            raise ValueError(f"--size {size[0]}x{size[1]} does not match the low-res images: {h}x{w} x{k} is "
                             f"{h * k}x{w * k}")
        return prompts, (None if (h * k, w * k) == trained else (h * k, w * k))

    def noise_level(self, cfg, level: int):
        if not 0 <= level <= cfg.lowres_noise_max:
            raise ValueError(f"noise level {level}: this super-resolution model takes one in [0, "
                             f"{cfg.lowres_noise_max}] (conditioning.lowres_noise_max)")
        return replace(cfg, lowres_noise_sample=level)

    def sample_prompts(self, cfg, rows, side):
        low = np.asarray([r["lowres"] for r in rows[:8]], np.uint8)
        return list(square_images(torch.from_numpy(low)).numpy())

    def held_out(self, cfg, held) -> list:
        return [downscale(p, cfg.conditioning.lowres_factor) for p in held.pixels()]

    def from_inputs(self, values, n):
        return list(values["image"])

    def describe(self, prompt, i: int) -> str:
        return f"low-res image {i} ({prompt.shape[0]}x{prompt.shape[1]})"


register(LowRes())
