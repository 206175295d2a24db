"""Layout-to-image (paper §4.3.1): each box's class and corners a token of a transformer trained with the UNet and
cross-attended (ldm/layout.py); an empty layout (a start token only) is its null. Hybrid with layout_concat: the boxes
also drawn per class at the latent's size and concatenated to z_t."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.inputs import read_layout
from ldm.layout import LayoutEncoder, box_raster, layout_tokens, unpadded_boxes

SHAPE = '{"size": [H, W], "boxes": [[class, top, left, height, width], ...]}'


class Layout(Kind):
    name = "layout"
    spatial = True
    inputs = (Input("layout", "--layout", read_layout, f"a layout (a JSON file, repeatable; served: JSON text): "
                    f"{SHAPE} in pixels of that canvas; the output has its size unless --size says otherwise (the "
                    f"boxes keep their place relative to the canvas)", "JSON"),)
    sample_columns = ("layout",)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, ae, un = cfg.conditioning, cfg.autoencoder, cfg.unet
        if not c.num_classes:
            raise ConfigError("conditioning.kind='layout' needs conditioning.num_classes=N (box classes 0..N-1)")
        if un.context_dim != c.n_embed:
            raise ConfigError(f"conditioning.kind='layout' cross-attends to its transformer's tokens: set "
                              f"unet.context_dim=conditioning.n_embed={c.n_embed}")
        if un.num_classes is not None:
            raise ConfigError("conditioning.kind='layout' has no class label: set unet.num_classes=null")
        want = c.num_classes if c.layout_concat else 0
        if c.concat_channels != want:
            raise ConfigError(f"conditioning.kind='layout' with layout_concat={c.layout_concat} concatenates {want} "
                              f"box channels: set conditioning.concat_channels={want} (and unet.in_channels="
                              f"{ae.embed_dim + want})")

    def check_cache(self, cfg, manifest, cache):
        n, most = manifest.get("preprocess", {}).get("layout_boxes", 0), cfg.conditioning.max_boxes
        if not n or n > most:
            raise CacheMismatch(
                f"conditioning.kind=layout takes up to conditioning.max_boxes={most} boxes per image, but the cache "
                f"{cache} was encoded " + (f"with --layout-boxes {n}" if n else "without layouts")
                + f": re-encode shards whose metadata holds a \"layout\" into a new --output with --layout-boxes "
                  f"{most} (or set conditioning.max_boxes={n})")

    def columns(self, cfg, cached_emb):
        return ("layout",)

    def cond_stage(self, cfg):  # §4.3.1: the boxes' transformer, trained with the UNet
        c = cfg.conditioning
        return LayoutEncoder(c.num_classes, c.layout_grid, c.n_embed, c.n_layer, c.n_head)

    def condition(self, c, boxes: torch.Tensor, height: int, width: int) -> dict:
        """(B, N, 5) pixel boxes [class, top, left, h, w] (class -1: padding) on an height x width canvas -> the
        transformer's tokens, padded to max_boxes (and, hybrid, the boxes drawn per class)."""
        cfg = c.cfg
        if boxes.shape[1] > cfg.max_boxes:
            raise ValueError(f"a layout holds {boxes.shape[1]} boxes but the model takes at most {cfg.max_boxes}")
        boxes = F.pad(boxes, (0, 0, 0, cfg.max_boxes - boxes.shape[1]), value=-1)
        out = {"tokens": layout_tokens(boxes, height, width, cfg.layout_grid, cfg.num_classes)}
        if cfg.layout_concat:  # hybrid: the boxes drawn per class at the latent's size, concatenated to z_t
            out["concat"] = box_raster(boxes, height, width, cfg.num_classes, c.f)
        return out

    def batch(self, c, batch, drop, generator):
        n = drop.shape[0]
        boxes = batch["layout"].to(c.device).view(n, -1, 5).clone()  # pixel boxes of the crop, -1 padded
        boxes[drop] = -1  # a dropped layout has no boxes: the null condition
        side = c.square_side(batch)
        return self.condition(c, boxes, side, side)

    def one(self, c, prompt: dict) -> dict:
        """{"size": [H, W], "boxes": [[class, top, left, h, w], ...]} -> its condition (a batch of 1)."""
        if not isinstance(prompt, dict) or "size" not in prompt or "boxes" not in prompt:
            raise ValueError(f"a layout is {SHAPE} in pixels, got {prompt!r}")
        boxes = torch.tensor([list(b) for b in prompt["boxes"]], dtype=torch.float32).view(-1, 5)
        bad = [b for b in boxes.tolist() if not 0 <= b[0] < c.cfg.num_classes or b[3] <= 0 or b[4] <= 0]
        if bad:
            raise ValueError(f"layout boxes {bad}: a box is [class, top, left, height, width] with a class in "
                             f"0..{c.cfg.num_classes - 1} and a positive size")
        h, w = (int(v) for v in prompt["size"])
        return self.condition(c, boxes[None], h, w)

    def prompts(self, c, prompts):
        def stack(ps):
            each = [self.one(c, p) for p in ps]
            return {k: torch.cat([e[k] for e in each]).to(c.device) for k in each[0]}
        return stack(prompts), stack([{"size": p["size"], "boxes": []} for p in prompts])  # null: no boxes

    def canvas(self, c, prompts, size, trained):
        """--size, else the layouts' own canvas (one size), else the training size; each layout's boxes moved to
        that canvas (they keep their place relative to it)."""
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, dict) or {"size", "boxes"} - set(p)]
        if bad:
            raise ValueError(f"a layout model takes {SHAPE} per sample; sample(s) {bad[:5]} are not")
        sizes = {tuple(int(v) for v in p["size"]) for p in prompts}
        target = size or (next(iter(sizes)) if len(sizes) == 1 else trained)

        def moved(p: dict) -> dict:
            (h, w), (th, tw) = p["size"], target
            return {"size": list(target), "boxes": [[k, t * th / h, le * tw / w, bh * th / h, bw * tw / w]
                                                    for k, t, le, bh, bw in p["boxes"]]}
        return [moved(p) for p in prompts], (None if target == trained else target)

    def sample_prompts(self, cfg, rows, side):
        return [{"size": [side, side], "boxes": unpadded_boxes(r["layout"])} for r in rows[:8]]

    def held_out_reads(self, cfg) -> dict:
        return {"layouts": cfg.conditioning.max_boxes}

    def held_out(self, cfg, held) -> list:
        if not held.layouts:
            raise ValueError("a layout-to-image model needs held-out shards read with their layouts")
        side = list(held.images.shape[-2:])
        return [{"size": side, "boxes": b} for b in held.layouts]

    def from_inputs(self, values, n):
        return list(values["layout"])

    def describe(self, prompt, i: int) -> str:
        return f"layout {i} ({prompt['size'][0]}x{prompt['size'][1]}: " + ", ".join(
            f"class {k} at top {t} left {le} {h}x{w}" for k, t, le, h, w in prompt["boxes"]) + ")"


register(Layout())
