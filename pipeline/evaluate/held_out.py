"""A fixed held-out set for scoring samples: the first N good records of held-out shards (shards in sorted
order, records in file order), preprocessed exactly as the encoder saw the training images, with their
captions and, where the shards carry one, their class label; each conditioning kind turns it into its own conditions
(`Kind.held_out`)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ldm.layout import unpadded_boxes
from pipeline.data.preprocess import PreprocessConfig, preprocess_batch
from pipeline.data.sources import discover_shards, read_shard


@dataclass(frozen=True)
class HeldOut:
    images: torch.Tensor          # (N, 3, H, W) in [-1, 1]
    captions: tuple[str, ...]
    labels: tuple[int, ...] | None  # every record's "label" metadata, or None if any lacks one
    fashion_mnist: bool           # every record came from Fashion-MNIST (the in-project classifier can judge)
    label_maps: np.ndarray | None = None  # (N, H, W) uint8 class ids, when read with label_maps=True
    metas: tuple = ()             # each record's metadata (e.g. a scene's layout)
    layouts: tuple = ()           # each image's boxes [class, top, left, h, w] in its pixels, when read with layouts

    def pixels(self) -> np.ndarray:
        """The images as (N, H, W, 3) uint8."""
        return ((self.images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def read_held_out(input_uri: str, resolution: int, n: int, batch: int = 256, label_maps: bool = False,
                  layouts: int = 0) -> HeldOut:
    """The first `n` good records of `input_uri` (with their label maps, or up to `layouts` boxes each: records
    without them are skipped); raises if the shards hold fewer than 2."""
    cfg = PreprocessConfig(resolution=resolution, label_maps=label_maps, layout_boxes=layouts)
    shard_set = discover_shards(input_uri)
    images, captions, metas, maps, boxes = [], [], [], [], []
    for i, uri in enumerate(sorted(shard_set.shards)):
        pending = []
        for rec in read_shard({"uri": uri, "shard": i}, shard_set.layout):
            if rec["shard_error"]:
                raise ValueError(f"held-out shard {rec['shard_error']}")
            if rec["key"]:
                pending.append(rec)
        for j in range(0, len(pending), batch):
            chunk = pending[j:j + batch]
            out = preprocess_batch({k: np.array([r[k] for r in chunk], dtype=object)
                                    for k in ("key", "caption", "meta", "image", "skip", "label_map")}, cfg)
            for k in range(len(chunk)):
                if not out["skip"][k] and len(images) < n:
                    images.append(np.frombuffer(out["pixels"][k], np.uint8).reshape(resolution, resolution, 3))
                    captions.append(str(out["caption"][k]))
                    metas.append(json.loads(out["meta"][k] or "{}"))
                    if label_maps:
                        maps.append(np.frombuffer(out["label_map"][k], np.uint8).reshape(resolution, resolution))
                    if layouts:
                        boxes.append(unpadded_boxes(np.frombuffer(out["layout"][k], np.int16)))
        if len(images) >= n:
            break
    if len(images) < 2:
        raise ValueError(f"{input_uri}: fewer than 2 usable held-out images at {resolution} px (found "
                         f"{len(images)}); point --input at held-out shards written by jobs/make_shards.py or "
                         f"img2dataset")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = tuple(int(m["label"]) for m in metas) if all("label" in m for m in metas) else None
    fashion = all(str(m.get("url", "")).startswith("package://fashion-mnist/") for m in metas)
    return HeldOut(x, tuple(captions), labels, fashion, np.stack(maps) if label_maps else None, tuple(metas),
                   tuple(boxes))
