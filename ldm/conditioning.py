"""tau_theta's inputs for training and sampling alike (paper §3.3): the Conditioner.

The conditioning kind (ldm/kinds/, one module each) says what a condition is; the Conditioner holds what every kind
draws on (the config, the device, the first stage's f and latent scale, a frozen text encoder or the trained
transformer's tokenizer) and adds SDXL's micro-conditioning, which goes beside any kind.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.config import ConditioningConfig
from ldm.kinds import kind_of
from ldm.kinds.common import apply_drop, drop_mask  # noqa: F401 - CFG dropout, used with the Conditioner
from ldm.text_encoders import FrozenHFTextEncoder


class Conditioner:
    """One kind's conditions, for training batches (`batch`) and for sampling (`prompts`, with the null condition
    classifier-free guidance contrasts against). Inpainting needs the run's latent scale (the masked image's latent is
    scaled as z is, §4.3.2) and, to take images and masks at sampling, the first stage's `encode` (uint8 NHWC pixels ->
    posterior mean)."""

    def __init__(self, cfg: ConditioningConfig, text: FrozenHFTextEncoder | None = None, tokenize=None,
                 device="cpu", downsample_factor: int = 1, latent_scale=None, encode=None, latent_channels: int = 4,
                 micro: bool = False):
        self.cfg, self.text, self.tokenize, self.device = cfg, text, tokenize, torch.device(device)
        self.kind = kind_of(cfg.kind)
        self.micro = micro or self.kind.sizes  # sizes and crop beside the condition (unet.micro_cond), or in it
        self.channels = latent_channels  # C of the cache's flat latents: a layout's canvas is their side x f
        self.f = downsample_factor  # the first stage's f: a low-res image is resized to the latent's size
        self.latent_scale, self.encode = latent_scale, encode
        self.null: dict = {}
        self.kind.setup(self)

    @classmethod
    def build(cls, model: nn.Module, text_encoder_path: str = "", device="cpu", latent_scale=None,
              encode=None) -> "Conditioner":
        """For a LatentDiffusion `model`: loads the frozen text encoder (a local folder, "" = the offline MiniLM)
        when the config asks for one."""
        cfg = model.cfg.conditioning
        text = kind_of(cfg.kind).frozen_encoder(cfg, text_encoder_path, device)
        tokenize = getattr(getattr(model, "cond_stage", None), "tokenize", None)  # the trainable text transformer
        return cls(cfg, text, tokenize, device, model.cfg.autoencoder.downsample_factor, latent_scale, encode,
                   model.cfg.autoencoder.embed_dim, model.cfg.unet.micro_cond)

    @property
    def mode(self) -> str:
        """The kind's name ("text", "class", "none", "lowres", "inpaint", "semantic", "layout", ...)."""
        return self.kind.name

    @property
    def guided(self) -> bool:
        """Whether sampling contrasts against a null: a dense condition only if training dropped it."""
        return not self.kind.dense or bool(self.cfg.cond_drop_prob)

    def prompts(self, prompts: list) -> tuple[dict, dict | None]:
        """(cond, uncond) for sampling; uncond None: the kind has no trained null, sample unguided."""
        return self.kind.prompts(self, prompts)

    def batch(self, batch: dict, drop: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A training batch's condition (the kind's), the samples in `drop` set to the null; micro-conditioned (or
        a kind that conditions on sizes itself, SDXL), also each row's original size, crop and target size."""
        out = self.kind.batch(self, batch, drop, generator)
        return self.kind.with_sizes(self, out, self.sizes(batch, drop.shape[0]), drop) if self.micro else out

    def sizes(self, batch: dict, n: int) -> torch.Tensor:
        """(n, 6) original height, width, crop top, left (the cache's orig_h, orig_w, crop_top, crop_left) and target
        height, width (an aspect bucket's, or the square latent's side x f)."""
        dev = self.device
        if "target_h" in batch:
            th, tw = batch["target_h"].to(dev), batch["target_w"].to(dev)
        else:  # square latents: the side from the flat latent
            th = tw = torch.full((n,), self.square_side(batch), device=dev)
        return torch.stack([batch["orig_h"].to(dev), batch["orig_w"].to(dev), batch["crop_top"].to(dev),
                            batch["crop_left"].to(dev), th, tw], 1).float()

    def square_side(self, batch: dict) -> int:
        """The pixel side of a batch's square latents (flat C*h*w in the cache), h x the first stage's f."""
        return int(round((batch["latent_mean"].shape[1] // self.channels) ** 0.5)) * self.f

    def with_micro(self, cond: dict, uncond: dict | None, n: int, size: tuple[int, int],
                   orig_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0)) -> tuple:
        """Sampling's micro-conditions (SDXL): the image as if it were `orig_size` (default: the sample's own size,
        i.e. a full-resolution original) cropped at `crop` to `size`."""
        o = orig_size or size
        micro = torch.tensor([[o[0], o[1], crop[0], crop[1], size[0], size[1]]], dtype=torch.float32,
                             device=self.device).expand(n, -1)
        return self.kind.sampled_sizes(self, cond, uncond, micro)
