"""Decode, validate, filter, resize and crop image-caption records (CPU stage of the encode pipeline).

Every bad record is kept as a row with a `skip` reason (so counts add up per shard) and no pixels.
Defaults are what a LAION user expects (punsafe < 0.5, pwatermark < 0.5, aspect <= 3, a caption);
all are overridable from the command line.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.data.dedup import caption_hash, image_hash, phash

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

SKIP_REASONS = ("missing_image", "missing_caption", "caption_too_long", "bad_metadata", "unsafe", "watermark",
                "low_aesthetic", "low_similarity", "not_an_image", "corrupt_image", "too_small", "too_large",
                "bad_aspect", "missing_label_map", "bad_label_map", "missing_layout", "bad_layout", "too_many_boxes",
                "duplicate_image", "near_duplicate", "shard_error", "empty_shard")


@dataclass(frozen=True)
class PreprocessConfig:
    resolution: int = 256
    crop: str = "center"                 # "center" | "random" | "tile" (a tile of the resolution grid; both seeded)
    resize: int = 0                      # the shorter side is resized to this before the crop; 0 = resolution
    min_size: int = 0                    # shorter side in pixels; 0 = resolution // 2
    max_pixels: int = 64_000_000         # decompression-bomb guard
    max_aspect: float = 3.0
    max_punsafe: float = 0.5
    max_pwatermark: float = 0.5
    min_aesthetic: float = 0.0           # 0 = off
    min_similarity: float = 0.0          # 0 = off
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    seed: int = 0
    lowres_factor: int = 0               # also keep the crop bicubic-downscaled by this (super-resolution); 0 = no
    inpaint_variants: int = 0            # also draw this many inpainting masks per crop (seeded by key); 0 = none
    label_maps: bool = False             # also keep each record's per-pixel class map, resized and cropped as its image
    layout_boxes: int = 0                # also keep up to this many of the metadata's layout boxes, moved with the
    #                                      resize and crop (layout-to-image); 0 = none
    flip_latents: bool = False           # the encoder also keeps the latent of the image mirrored left-right
    extra_resolutions: tuple[int, ...] = ()  # also crop (and encode) each image at these sizes, multiples of
    #                                      resolution, in the same pass; left out where the image is smaller
    bucket: bool = False                 # aspect-ratio buckets of ~resolution^2 pixels instead of square crops
    bucket_step: int = 64                # bucket sides are multiples of this (pixels)
    dedup: str = "off"                   # off | exact | near: drop records whose image an earlier one has (dedup.py)
    dedup_distance: int = 4              # near: phash bits two copies may differ in
    dedup_by: str = "image"              # image | image+caption: a duplicate must also have the same caption

    @property
    def effective_min_size(self) -> int:
        return self.min_size or self.resolution // 2

    def to_dict(self) -> dict:
        return {**asdict(self), "effective_min_size": self.effective_min_size}


# the column names each score goes by: img2dataset's LAION-2B/5B parquet (lower case), LAION-Aesthetics
# ("AESTHETIC_SCORE"), and mosaicml/diffusion-style shards ("aesthetic_score")
SCORE_COLUMNS = {"punsafe": ("punsafe", "PUNSAFE"), "pwatermark": ("pwatermark", "PWATERMARK"),
                 "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
                 "similarity": ("similarity", "SIMILARITY")}


def laion_score(meta: dict, name: str):
    """A record's LAION score `name` from its metadata under any of its column names: a float, None when absent,
    NaN when unreadable."""
    v = next((meta[c] for c in SCORE_COLUMNS[name] if meta.get(c) is not None), None)
    if v is None:
        return None  # column absent: no filter
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def check_metadata(caption: str, meta_json: str, cfg: PreprocessConfig) -> str | None:
    """The skip reason of a record's caption and LAION scores, or None to keep it. With min_caption_chars=0 a
    missing or blank caption is kept (caption-less data, for unconditional and label-conditioned models)."""
    caption = "" if caption is None else str(caption).strip()
    if cfg.min_caption_chars > 0 and len(caption) < cfg.min_caption_chars:
        return "missing_caption"
    if len(caption) > cfg.max_caption_chars:
        return "caption_too_long"
    meta = {}
    if meta_json:
        try:
            meta = json.loads(meta_json)
        except ValueError:
            return "bad_metadata"
        if not isinstance(meta, dict):
            return "bad_metadata"
    scores = {n: laion_score(meta, n) for n in SCORE_COLUMNS}
    if any(v is not None and not math.isfinite(v) for v in scores.values()):
        return "bad_metadata"
    if scores["punsafe"] is not None and scores["punsafe"] >= cfg.max_punsafe:
        return "unsafe"
    if scores["pwatermark"] is not None and scores["pwatermark"] >= cfg.max_pwatermark:
        return "watermark"
    if cfg.min_aesthetic and scores["aesthetic"] is not None and scores["aesthetic"] < cfg.min_aesthetic:
        return "low_aesthetic"
    if cfg.min_similarity and scores["similarity"] is not None and scores["similarity"] < cfg.min_similarity:
        return "low_similarity"
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """L/LA/P/CMYK/RGBA/I;16/I/F -> RGB; transparency composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, cfg: PreprocessConfig) -> tuple[Image.Image | None, str | None]:
    try:
        with warnings.catch_warnings():  # over Pillow's pixel limit: a warning at open, an error over twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, "not_an_image"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "too_large"
    except Exception:  # noqa: BLE001
        return None, "corrupt_image"
    w, h = im.size
    if w * h > cfg.max_pixels:
        return None, "too_large"
    if min(w, h) < cfg.effective_min_size:
        return None, "too_small"
    if max(w, h) / max(1, min(w, h)) > cfg.max_aspect:
        return None, "bad_aspect"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
        return to_rgb(im), None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "too_large"
    except Exception:  # noqa: BLE001 - truncated / corrupt data
        return None, "corrupt_image"


def keyed_rng(cfg: PreprocessConfig, key: str) -> np.random.Generator:
    """A generator seeded by --seed and the record's key: a rerun draws the same crops and masks."""
    return np.random.default_rng(int(hashlib.sha256(f"{cfg.seed}:{key}".encode()).hexdigest()[:12], 16))


def resized(w: int, h: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """The size an image of w x h is resized to before its crop: shorter side -> resize (or resolution)."""
    side = max(cfg.resize, cfg.resolution)
    s = side / min(w, h)
    return max(side, round(w * s)), max(side, round(h * s))


def resize_crop(im: Image.Image, cfg: PreprocessConfig, key: str) -> tuple[np.ndarray, int, int]:
    """Shorter side -> resize or resolution (bicubic, antialiased), then a resolution^2 crop; returns offsets."""
    r = cfg.resolution
    nw, nh = resized(*im.size, cfg)
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    if cfg.crop in ("random", "tile"):
        rng = keyed_rng(cfg, key)
        if cfg.crop == "tile":
            top, left = r * int(rng.integers(0, nh // r)), r * int(rng.integers(0, nw // r))
        else:
            top, left = int(rng.integers(0, nh - r + 1)), int(rng.integers(0, nw - r + 1))
    else:
        top, left = (nh - r) // 2, (nw - r) // 2
    arr = np.asarray(im.crop((left, top, left + r, top + r)), dtype=np.uint8)
    return arr, top, left


def bucket_crop(im: Image.Image, cfg: PreprocessConfig, key: str) -> tuple[np.ndarray, int, int]:
    """Aspect-ratio bucketing (pipeline/data/buckets.py): resized (bicubic, antialiased) to cover the bucket nearest
    the image's aspect, then cropped by what the rounding leaves (centred, or seeded with --crop random)."""
    from pipeline.data.buckets import buckets, cover, nearest
    bh, bw = nearest(*im.size, buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect))
    nw, nh = cover(*im.size, (bh, bw))
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    if cfg.crop == "random":
        rng = keyed_rng(cfg, key)
        top, left = int(rng.integers(0, nh - bh + 1)), int(rng.integers(0, nw - bw + 1))
    else:
        top, left = (nh - bh) // 2, (nw - bw) // 2
    return np.asarray(im.crop((left, top, left + bw, top + bh)), dtype=np.uint8), top, left


def crop_at(im: Image.Image, cfg: PreprocessConfig, size: tuple[int, int], base: tuple[int, int, int, int],
            r: int) -> bytes:
    """The crop of the same region at resolution `r` (a multiple of cfg.resolution): the base crop (h, w, top, left)
    scaled by r / resolution, from the image resized to cover it; b"" where that needs upscaling (the image is
    smaller than this resolution asks)."""
    k = r // cfg.resolution
    bh, bw, top, left = (v * k for v in base)
    w, h = size
    s = max(bw / w, bh / h) if cfg.bucket else max(cfg.resize * k, r) / min(w, h)
    if s > 1.0 + 1e-9:
        return b""
    nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    top, left = min(top, nh - bh), min(left, nw - bw)
    return np.asarray(im.crop((left, top, left + bw, top + bh)), dtype=np.uint8).tobytes()


def crop_label_map(data: bytes, size: tuple[int, int], cfg: PreprocessConfig, top: int, left: int):
    """A record's label map (PNG of class ids, the image's size) resized (nearest: ids stay ids) and cropped exactly as
    its image: (uint8 r x r, None), or (None, skip reason)."""
    if not data:
        return None, "missing_label_map"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.size != size or im.mode not in ("L", "P"):  # 8-bit ids: grayscale, or a palette's indices
                return None, "bad_label_map"
            seg = Image.fromarray(np.asarray(im, dtype=np.uint8))
    except (OSError, UnidentifiedImageError, ValueError):
        return None, "bad_label_map"
    r, (nw, nh) = cfg.resolution, resized(*size, cfg)
    if (nw, nh) != size:
        seg = seg.resize((nw, nh), Image.NEAREST)
    return np.asarray(seg.crop((left, top, left + r, top + r)), dtype=np.uint8), None


def crop_layout(meta_json: str, size: tuple[int, int], cfg: PreprocessConfig, top: int, left: int):
    """A record's boxes (metadata "layout": [[class, top, left, height, width], ...] in pixels of the original image)
    scaled and cropped exactly as its image and clipped to the crop; boxes left with no area are dropped. Returns
    (int16 (layout_boxes, 5) padded with -1, None) or (None, skip reason)."""
    try:
        boxes = json.loads(meta_json).get("layout") if meta_json else None
    except (ValueError, AttributeError):
        return None, "bad_metadata"
    if boxes is None:
        return None, "missing_layout"
    try:
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    except (TypeError, ValueError):
        return None, "bad_layout"
    if not np.isfinite(arr).all() or (arr[:, 0] < 0).any() or (arr[:, 3:] <= 0).any() or \
            (arr[:, 0] != np.round(arr[:, 0])).any():
        return None, "bad_layout"
    r, (nw, nh) = cfg.resolution, resized(*size, cfg)
    sy, sx = nh / size[1], nw / size[0]
    y0, x0 = np.clip(arr[:, 1] * sy - top, 0, r), np.clip(arr[:, 2] * sx - left, 0, r)
    y1 = np.clip((arr[:, 1] + arr[:, 3]) * sy - top, 0, r)
    x1 = np.clip((arr[:, 2] + arr[:, 4]) * sx - left, 0, r)
    y0, x0, y1, x1 = np.round(y0), np.round(x0), np.round(y1), np.round(x1)
    keep = (y1 > y0) & (x1 > x0)
    if keep.sum() > cfg.layout_boxes:
        return None, "too_many_boxes"
    out = np.full((cfg.layout_boxes, 5), -1, np.int16)
    out[: keep.sum()] = np.stack([arr[:, 0], y0, x0, y1 - y0, x1 - x0], 1)[keep]
    return out, None


def inpaint_masks(key: str, cfg: PreprocessConfig) -> np.ndarray:
    """The record's inpainting masks, (inpaint_variants, r, r) bool: LaMa-style strokes and boxes (paper §4.5), drawn
    from a generator seeded by the key, so a rerun draws the same ones."""
    from ldm.masks import random_mask
    rng = keyed_rng(cfg, f"mask:{key}")
    r = cfg.resolution
    return np.stack([random_mask(r, r, rng) for _ in range(cfg.inpaint_variants)])


def drop_duplicates(index, batch: dict, skip: np.ndarray, image_hashes, phashes, cfg: PreprocessConfig) -> None:
    """Claim the good records' fingerprints in the run's DedupIndex (one call per batch); a record an earlier one
    already holds gets its skip reason."""
    import ray
    good = np.flatnonzero(skip == "")
    if not len(good):
        return
    ns = [caption_hash(batch["caption"][i]) if cfg.dedup_by == "image+caption" else 0 for i in good]
    reasons = ray.get(index.claim.remote([str(batch["key"][i]) for i in good], image_hashes[good].tolist(),
                                         phashes[good].tolist(), ns))
    for i, r in zip(good, reasons):
        if r:
            skip[i] = r


INT_COLUMNS = {"orig_w": np.int32, "orig_h": np.int32, "crop_top": np.int32, "crop_left": np.int32,
               "image_hash": np.int64, "phash": np.int64, "bucket_h": np.int32, "bucket_w": np.int32}


def byte_columns(cfg: PreprocessConfig) -> list[str]:
    """The byte columns a batch gets: the crop's pixels, and what the settings add beside them."""
    return ["pixels", *(f"pixels_{r}" for r in cfg.extra_resolutions), *(["lowres"] if cfg.lowres_factor else []),
            *(["masks"] if cfg.inpaint_variants else []), *(["label_map"] if cfg.label_maps else []),
            *(["layout"] if cfg.layout_boxes else [])]


def preprocess_record(batch: dict, i: int, cfg: PreprocessConfig) -> tuple[str | None, dict]:
    """Record i of a batch: (its skip reason, or None and its columns)."""
    reason = check_metadata(batch["caption"][i], batch["meta"][i], cfg)
    if reason is None:
        im, reason = decode_image(batch["image"][i], cfg)
    if reason is not None:
        return reason, {}
    key = str(batch["key"][i])
    arr, top, left = (bucket_crop if cfg.bucket else resize_crop)(im, cfg, key)
    out = {"orig_w": im.size[0], "orig_h": im.size[1], "image_hash": image_hash(im), "phash": phash(im),
           "crop_top": top, "crop_left": left, "bucket_h": arr.shape[0], "bucket_w": arr.shape[1]}
    for r in cfg.extra_resolutions:  # the same crop at each extra resolution
        out[f"pixels_{r}"] = crop_at(im, cfg, im.size, (arr.shape[0], arr.shape[1], int(top), int(left)), r)
    if cfg.label_maps:
        seg, reason = crop_label_map(batch["label_map"][i] if "label_map" in batch else b"", im.size, cfg,
                                     int(top), int(left))
        if reason is not None:
            return reason, {}
        out["label_map"] = seg.tobytes()
    if cfg.layout_boxes:
        boxes, reason = crop_layout(batch["meta"][i], im.size, cfg, int(top), int(left))
        if reason is not None:
            return reason, {}
        out["layout"] = boxes.tobytes()
    out["pixels"] = arr.tobytes()
    if cfg.lowres_factor:
        from ldm.kinds.lowres import downscale  # here: the kinds import torch, which a decode worker need not load
        out["lowres"] = downscale(arr, cfg.lowres_factor).tobytes()
    if cfg.inpaint_variants:
        out["masks"] = inpaint_masks(key, cfg).astype(np.uint8).tobytes()
    return None, out


def preprocess_batch(batch: dict, cfg: PreprocessConfig, dedup=None) -> dict:
    """Ray Data map_batches (numpy format): adds pixels (uint8 HxWx3 bytes), orig size, crop offsets, the decoded
    image's fingerprints (image_hash, phash: pipeline/data/dedup.py; with `dedup`, a DedupIndex actor, records whose
    image an earlier record has are skipped as duplicate_image / near_duplicate), with
    lowres_factor the crop downscaled (lowres, uint8 bytes), with inpaint_variants its masks (masks, uint8 bytes),
    with label_maps its class map cropped alike (label_map, uint8 bytes), with layout_boxes its boxes moved alike
    (layout, int16 bytes)."""
    n = len(batch["key"])
    cols = {k: np.full(n, b"", dtype=object) for k in byte_columns(cfg)}
    cols.update({k: np.zeros(n, t) for k, t in INT_COLUMNS.items()})
    skip = np.array(batch["skip"], dtype=object)
    for i in range(n):
        if skip[i]:
            continue
        reason, values = preprocess_record(batch, i, cfg)
        if reason is not None:
            skip[i] = reason
            continue
        for k, v in values.items():
            cols[k][i] = v
    if dedup is not None:
        drop_duplicates(dedup, batch, skip, cols["image_hash"], cols["phash"], cfg)
        for k in byte_columns(cfg):
            cols[k][skip != ""] = b""
    out = {k: v for k, v in batch.items() if k not in ("image", "label_map")}
    out.update(cols, skip=skip)
    return out
