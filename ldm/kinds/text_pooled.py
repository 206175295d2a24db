"""SDXL's conditioning (Podell et al. 2023, §2.1-2.2): one caption through several frozen text encoders (CLIP ViT-L
and OpenCLIP ViT-bigG), their penultimate layers concatenated as the context the UNet cross-attends to (768 + 1280 =
2048), and the vector y added to the time embedding: the last encoder's pooled projection (1280) beside Fourier
features of the image's original size, crop offsets and target size (6 x 256), 2816 in all. The null is zeros (the
context and the pooled embedding); the sizes stay as they are. The cache holds the embeddings (encode with
--store-text-embeddings)."""
from __future__ import annotations

import torch

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import apply_drop
from ldm.kinds.inputs import read_text
from ldm.kinds.text import check_embeddings, distinct_captions


def size_features(micro: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 6) original height / width, crop top / left, target height / width -> (B, 6 dim) Fourier features."""
    from ldm.unet import timestep_embedding
    return timestep_embedding(micro.reshape(-1).float(), dim).view(micro.shape[0], -1)


class TextPooled(Kind):
    name = "text_pooled"
    sizes = True
    inputs = (Input("prompt", "--prompt", read_text, "a caption (repeatable)", "TEXT"),)
    sample_columns = ("caption",)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, un = cfg.conditioning, cfg.unet
        want = c.pooled_dim + 6 * c.micro_dim
        if c.text_encoder != "hf" or not c.pooled_dim or un.context_dim is None:
            raise ConfigError("conditioning.kind='text_pooled' takes frozen encoders (conditioning.text_encoder=hf), "
                              "their width as unet.context_dim and the pooled width as conditioning.pooled_dim")
        if un.adm_in_channels != want:
            raise ConfigError(f"conditioning.kind='text_pooled' gives the UNet a vector of pooled_dim "
                              f"{c.pooled_dim} + 6 x micro_dim {c.micro_dim}: set unet.adm_in_channels={want}")
        if un.micro_cond:
            raise ConfigError("conditioning.kind='text_pooled' puts the sizes into its vector y: set "
                              "unet.micro_cond=false")

    def check_cache(self, cfg, manifest: dict, cache: str) -> None:
        text, c = manifest.get("text_encoder", {}), cfg.conditioning
        if not (text.get("embeddings") and text.get("pooled_dim")):
            raise CacheMismatch(f"conditioning.kind=text_pooled trains on cached embeddings and pooled embeddings, "
                                f"but the cache {cache} has none: re-encode with --text-encoder <an SDXL diffusers "
                                f"folder or its text encoders> --store-text-embeddings")
        if (text.get("dim"), text.get("pooled_dim"), text.get("max_length")) != \
                (cfg.unet.context_dim, c.pooled_dim, c.max_length):
            raise CacheMismatch(f"the cache {cache}'s text embeddings are {text.get('max_length')} x {text.get('dim')} "
                                f"with pooled {text.get('pooled_dim')}; the config wants {c.max_length} x "
                                f"{cfg.unet.context_dim} with pooled {c.pooled_dim}: set conditioning.max_length, "
                                f"unet.context_dim and conditioning.pooled_dim to match")
        check_embeddings(cfg, text, cache)

    def columns(self, cfg, cached_emb):
        return ("text_emb", "text_pooled", "orig_h", "orig_w", "crop_top", "crop_left")

    def frozen_encoder(self, cfg, path, device):
        from ldm.text_encoders import FrozenTextEncoders
        return FrozenTextEncoders(path or cfg.text_encoder_path, cfg.max_length, cfg.text_layer,
                                  cfg.mask_padding).to(device)

    def setup(self, c) -> None:
        if c.text is None:
            raise ValueError("a text_pooled conditioning needs its frozen encoders (FrozenTextEncoders)")
        c.null = {"context": torch.zeros(1, c.cfg.max_length, c.text.dim, device=c.device),
                  "pooled": torch.zeros(1, c.cfg.pooled_dim, device=c.device)}

    def batch(self, c, batch, drop, generator):
        n = drop.shape[0]
        context = batch["text_emb"].to(c.device).float().view(n, c.cfg.max_length, -1)
        pooled = batch["text_pooled"].to(c.device).float().view(n, -1)
        return {"context": apply_drop(context, c.null["context"], drop),
                "pooled": apply_drop(pooled, c.null["pooled"], drop)}

    def prompts(self, c, prompts):
        context, pooled = c.text.embed([str(p) for p in prompts])
        n = len(prompts)
        return ({"context": context.to(c.device), "pooled": pooled.to(c.device)},
                {k: v.expand(n, *v.shape[1:]) for k, v in c.null.items()})

    def with_sizes(self, c, cond: dict, micro: torch.Tensor, drop: torch.Tensor) -> dict:
        """The vector y: the pooled embedding (zeros where dropped) and the sizes' features (kept)."""
        out = {k: v for k, v in cond.items() if k != "pooled"}
        return {**out, "y": torch.cat([cond["pooled"], size_features(micro, c.cfg.micro_dim).to(c.device)], 1)}

    def sampled_sizes(self, c, cond: dict, uncond: dict | None, micro: torch.Tensor) -> tuple:
        keep = torch.zeros(micro.shape[0], dtype=torch.bool, device=micro.device)
        return (self.with_sizes(c, cond, micro, keep),
                None if uncond is None else self.with_sizes(c, uncond, micro, keep))

    def sample_prompts(self, cfg, rows, side):
        return distinct_captions(rows)

    def held_out(self, cfg, held) -> list:
        return list(held.captions)


register(TextPooled())
