"""Semantic synthesis (paper §4.3.2): a per-pixel label map one-hot over conditioning.num_classes ids (0: background),
pooled over each latent cell (the spatial rescaler: the share of each class in the cell), concatenated to z_t. Sampled
at the map's size: any multiple of the UNet's, beyond the training canvas (the UNet is convolutional)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import dense_prompts, drop_dense, image_only, one_size
from ldm.kinds.inputs import read_label_map


class Semantic(Kind):
    name = "semantic"
    spatial = dense = True
    inputs = (Input("label_map", "--label-map", read_label_map, "a label map (8-bit grayscale or palette PNG whose "
                    "values are class ids, repeatable): the output has its size, any multiple of the UNet's "
                    "(paper 4.3.2)", "PNG", "binary"),)
    sample_columns = ("label_map",)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, ae = cfg.conditioning, cfg.autoencoder
        if not c.num_classes or c.concat_channels != c.num_classes:
            raise ConfigError(f"conditioning.kind='semantic' concatenates the label map one-hot: set "
                              f"conditioning.num_classes=N (ids 0..N-1, 0 the background) and "
                              f"conditioning.concat_channels=N (and unet.in_channels={ae.embed_dim} + N)")
        image_only(cfg, self.name)

    def check_cache(self, cfg, manifest, cache):
        if not manifest.get("preprocess", {}).get("label_maps"):
            raise CacheMismatch(f"conditioning.kind=semantic trains on label maps, but the cache {cache} was encoded "
                                f"without them: re-encode shards whose records carry a KEY.seg.png (tar) or a seg "
                                f"column (parquet) into a new --output with --label-maps")

    def columns(self, cfg, cached_emb):
        return ("label_map",)

    def condition(self, c, maps: torch.Tensor) -> dict:
        """uint8 (B, H, W) class ids -> one-hot, pooled over each latent cell's f x f pixels, concatenated to z_t."""
        onehot = F.one_hot(maps.long(), c.cfg.num_classes).permute(0, 3, 1, 2).float()
        return {"concat": F.avg_pool2d(onehot, c.f) if c.f > 1 else onehot}

    def batch(self, c, batch, drop, generator):
        rows = batch["label_map"].to(c.device)  # (B, r*r) uint8
        side = int(round(rows.shape[1] ** 0.5))
        return drop_dense(self.condition(c, rows.view(drop.shape[0], side, side)), drop)

    def prompts(self, c, prompts):
        maps = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in prompts]))
        top = int(maps.max())
        if top >= c.cfg.num_classes:
            raise ValueError(f"a label map holds id {top} but the model knows ids 0..{c.cfg.num_classes - 1}")
        return dense_prompts(self.condition(c, maps.to(c.device)), c.cfg)

    def canvas(self, c, prompts, size, trained):
        """The output is the label maps' size (any multiple of the UNet's: §4.3.2)."""
        shape = one_size({np.asarray(p).shape for p in prompts}, "a semantic synthesis model takes (h, w) label maps")
        if len(shape) != 2:
            raise ValueError(f"a semantic synthesis model takes (h, w) label maps, not shape {shape}")
        if size is not None and size != shape:
            raise ValueError(f"--size {size[0]}x{size[1]} does not match the label maps ({shape[0]}x{shape[1]})")
        return prompts, tuple(shape)

    def sample_prompts(self, cfg, rows, side):
        out = []
        for r in rows[:8]:
            s = int(round(len(r["label_map"]) ** 0.5))
            out.append(np.asarray(r["label_map"], np.uint8).reshape(s, s))
        return out

    def held_out_reads(self, cfg) -> dict:
        return {"label_maps": True}

    def held_out(self, cfg, held) -> list:
        if held.label_maps is None:
            raise ValueError("a semantic synthesis model needs held-out shards read with their label maps")
        return list(held.label_maps)

    def from_inputs(self, values, n):
        return list(values["label_map"])

    def describe(self, prompt, i: int) -> str:
        return f"label map {i} ({prompt.shape[0]}x{prompt.shape[1]}, ids {sorted(set(prompt.flatten().tolist()))})"


register(Semantic())
