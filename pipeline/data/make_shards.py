"""Write LAION-style image-caption shards exactly as img2dataset does, from real data that packages ship.

- Fashion-MNIST (Debian `dataset-fashion-mnist`), captions from class names and templates;
- real colour photos bundled with scikit-image, scikit-learn and `mvtb-data`, captions written here;
- Fashion-MNIST scenes: 2-3 items on a 64x64 canvas, with their per-pixel label map (`KEY.seg.png`, a `seg`
  column in parquet: 0 background, c + 1 an item of class c) and their boxes (`layout` in the metadata: [class,
  top, left, height, width] per item) for semantic synthesis and layout-to-image (paper §4.3).

Layouts: webdataset (`NNNNN.tar` with `KEY.png|jpg`, `KEY.txt`, `KEY.json`, plus `NNNNN.parquet` metadata
and `NNNNN_stats.json`) or parquet (`NNNNN.parquet` with the image bytes in a `png`/`jpg` column, plus
`NNNNN_stats.json`). Deterministic given a seed; a rerun skips shards already written.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.common import storage

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
# noun phrases with their article, as a caption writer would say them
FASHION_PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                   "a sneaker", "a bag", "an ankle boot")
TEMPLATES = ("a photo of {}", "a black and white picture of {}", "a grayscale photo of {}",
             "a product photo of {}", "{} on a plain black background", "a low resolution photo of {}",
             "a picture of {}", "a close-up photo of {}")

# real photos that packages ship, with captions written for them
PHOTO_CAPTIONS = {
    "skimage:astronaut": "a portrait of an astronaut in a white spacesuit in front of a flag",
    "skimage:chelsea": "a ginger tabby cat looking to the side",
    "skimage:cat": "a close-up photo of a ginger cat",
    "skimage:coffee": "a cup of coffee on a saucer with a spoon",
    "skimage:rocket": "a rocket on a launch pad under a blue sky",
    "skimage:hubble_deep_field": "a deep field photo of distant galaxies in space",
    "skimage:immunohistochemistry": "a microscope image of stained tissue",
    "skimage:colorwheel": "a colour wheel with all the hues",
    "skimage:retina": "a medical photo of a human retina",
    "skimage:camera": "a black and white photo of a man with a camera on a tripod",
    "skimage:coins": "a black and white photo of old coins on a table",
    "skimage:moon": "a black and white photo of the surface of the moon",
    "skimage:clock": "a black and white photo of a wall clock",
    "skimage:brick": "a close-up photo of a brick wall",
    "skimage:grass": "a close-up photo of grass",
    "skimage:gravel": "a close-up photo of gravel",
    "sklearn:china.jpg": "a chinese temple with red pillars surrounded by trees",
    "sklearn:flower.jpg": "a pink flower in bloom with green leaves",
    "mvtb:butterfly.jpg": "a butterfly with spotted wings on a flower",
    "mvtb:church.png": "a church with a tall tower",
    "mvtb:flowers1.png": "a bunch of colourful flowers",
    "mvtb:flowers2.png": "colourful flowers in a garden",
    "mvtb:flowers3.png": "a close-up photo of flowers",
    "mvtb:flowers4.png": "a flower bed with many flowers",
    "mvtb:flowers5.png": "yellow and red flowers",
    "mvtb:flowers6.png": "a photo of blooming flowers",
    "mvtb:flowers7.png": "flowers in the sun",
    "mvtb:flowers8.png": "a field of flowers",
    "mvtb:flowers9.png": "a garden full of flowers",
    "mvtb:monalisa.png": "a painting of a woman with a faint smile",
    "mvtb:notre-dame.png": "the facade of a gothic cathedral",
    "mvtb:parks.png": "a park with trees and a lawn",
    "mvtb:penguins.png": "a group of penguins standing on rocks",
    "mvtb:road.png": "a road seen from a car",
    "mvtb:street.png": "a city street with buildings",
    "mvtb:shark1.png": "a shark under water",
    "mvtb:sharks.png": "sharks swimming in the ocean",
    "mvtb:tomato_14.png": "ripe red tomatoes on the vine",
    "mvtb:tomato_35.png": "tomatoes growing in a greenhouse",
    "mvtb:castle.png": "a castle on a hill",
    "mvtb:eiffel-1.png": "the eiffel tower seen from below",
    "mvtb:building2-1.png": "a modern office building",
    "mvtb:lab-scene.png": "a laboratory with equipment on a bench",
    "mvtb:roof.png": "a tiled roof of a house",
    "mvtb:wally.png": "a cartoon man in a red and white striped shirt",
}


@dataclass
class Record:
    image: bytes
    ext: str
    caption: str
    width: int
    height: int
    label: int | None = None
    source: str = ""
    label_map: bytes | None = None       # a PNG of per-pixel class ids (semantic synthesis)
    layout: list | None = None           # [[class, top, left, height, width], ...] (layout-to-image)


def read_idx(path: str) -> np.ndarray:
    """The IDX format of (Fashion-)MNIST: magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    img, lab = Path(root) / f"{prefix}-images-idx3-ubyte.gz", Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise FileNotFoundError(f"{img} not found: install Debian's dataset-fashion-mnist "
                                f"(apt-get install dataset-fashion-mnist, done by infra/local/setup.sh)")
    return read_idx(str(img)), read_idx(str(lab))


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if fmt == "jpg":
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def fashion_records(split: str, limit: int | None, seed: int, fmt: str) -> Iterator[Record]:
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    order = rng.permutation(len(images))[: limit or len(images)]
    for i in order:
        label = int(labels[i])
        caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(FASHION_PHRASES[label])
        caption = caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption
        yield Record(encode_image(images[i], fmt), fmt, caption, 28, 28, label, f"fashion-mnist/{split}/{i}")


SCENE_SIZE = 64
SCENE_THRESHOLD = 40  # an item's pixel brighter than this belongs to it in the label map


def scene_records(split: str, limit: int, seed: int, size: int = SCENE_SIZE) -> Iterator[Record]:
    """Scenes of 2-3 Fashion-MNIST items (28x28, native scale) in distinct quadrants of a size x size black canvas,
    each jittered inside its quadrant; the label map marks each item's pixels (> SCENE_THRESHOLD) with its class
    + 1, and the layout holds its box."""
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng([seed, 2 if split == "train" else 3])
    half = size // 2
    for n in range(limit):
        canvas, seg, layout = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8), []
        for cell in sorted(int(v) for v in rng.choice(4, int(rng.integers(2, 4)), replace=False)):
            i = int(rng.integers(len(images)))
            top = half * (cell // 2) + int(rng.integers(0, half - 28 + 1))
            left = half * (cell % 2) + int(rng.integers(0, half - 28 + 1))
            item, c = images[i], int(labels[i])
            canvas[top:top + 28, left:left + 28] = item
            seg[top:top + 28, left:left + 28][item > SCENE_THRESHOLD] = c + 1
            layout.append([c, top, left, 28, 28])
        caption = "a scene with " + ", ".join(FASHION_PHRASES[b[0]] for b in layout)
        yield Record(encode_image(canvas, "png"), "png", caption, size, size, None,
                     f"fashion-mnist-scenes/{split}/{n}", encode_image(seg, "png"), layout)


def _load_photo(name: str) -> np.ndarray | None:
    source, item = name.split(":", 1)
    try:
        if source == "skimage":
            import skimage.data
            return getattr(skimage.data, item)()
        if source == "sklearn":
            from sklearn.datasets import load_sample_image
            return load_sample_image(item)
        import mvtbdata
        path = Path(mvtbdata.__file__).parent / "images" / item
        return np.asarray(Image.open(path)) if path.exists() else None
    except Exception:  # noqa: BLE001 - an image that a package version lacks is simply not used
        return None


def photo_records(split: str, seed: int, fmt: str, test_fraction: float = 0.15) -> Iterator[Record]:
    rng = np.random.default_rng(seed)
    names = sorted(PHOTO_CAPTIONS)
    is_test = {n: v < test_fraction for n, v in zip(names, rng.random(len(names)))}
    for name in names:
        if is_test[name] != (split == "test"):
            continue
        arr = _load_photo(name)
        if arr is None:
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        yield Record(encode_image(np.ascontiguousarray(arr), fmt), fmt, PHOTO_CAPTIONS[name], arr.shape[1],
                     arr.shape[0], None, name)


def laion_columns(key: str, seed: int) -> dict:
    """Deterministic LAION-style scores for data that has none; all pass the default filters."""
    r = np.random.default_rng(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)).random(4)
    return {"similarity": round(0.28 + 0.12 * r[0], 4), "punsafe": round(0.2 * r[1] ** 2, 4),
            "pwatermark": round(0.3 * r[2], 4), "aesthetic": round(4.5 + 1.5 * r[3], 4)}


def shard_bytes(records: list[Record], shard: int, layout: str, seed: int) -> dict[str, bytes]:
    """The files of one shard: {suffix: bytes}, suffixes ".tar", ".parquet", "_stats.json"."""
    rows = []
    tar_buf = io.BytesIO()
    tar = tarfile.open(fileobj=tar_buf, mode="w") if layout == "webdataset" else None
    for i, rec in enumerate(records):
        key = f"{shard:05d}{i:04d}"
        meta = {"url": f"package://{rec.source}", "caption": rec.caption, "key": key, "status": "success",
                "error_message": None, "width": rec.width, "height": rec.height, "original_width": rec.width,
                "original_height": rec.height, **laion_columns(key, seed)}
        if rec.label is not None:
            meta["label"] = rec.label
        if rec.layout is not None:
            meta["layout"] = rec.layout
        if tar is not None:
            seg = ((f"{key}.seg.png", rec.label_map),) if rec.label_map is not None else ()
            for name, data in ((f"{key}.{rec.ext}", rec.image), *seg, (f"{key}.txt", rec.caption.encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            rows.append(meta)
        else:
            rows.append({**meta, rec.ext: rec.image, **({"seg": rec.label_map} if rec.label_map is not None else {})})
    out = {}
    if tar is not None:
        tar.close()
        out[".tar"] = tar_buf.getvalue()
    columns = list(dict.fromkeys(k for r in rows for k in r))  # union: image formats and labels may mix
    buf = io.BytesIO()
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), buf)
    out[".parquet"] = buf.getvalue()
    out["_stats.json"] = json.dumps({"count": len(records), "successes": len(records), "failed_to_download": 0,
                                     "failed_to_resize": 0, "status_dict": {"success": len(records)}}).encode()
    return out


def write_shards(records: Iterator[Record], output: str, layout: str, shard_size: int, seed: int,
                 progress=None) -> dict:
    """Write records into NNNNN shards under `output`; shards that already exist are kept (resume)."""
    storage.makedirs(output)
    written = skipped = count = 0
    batch, shard = [], 0

    def flush():
        nonlocal written, skipped, shard, batch
        main = storage.join(output, f"{shard:05d}{'.tar' if layout == 'webdataset' else '.parquet'}")
        stats = storage.join(output, f"{shard:05d}_stats.json")
        if storage.exists(stats):  # the stats file is written last: its presence means the shard is whole
            skipped += 1
        else:
            files = shard_bytes(batch, shard, layout, seed)
            for suffix in sorted(files, key=lambda s: s == "_stats.json"):
                storage.write_bytes_atomic(storage.join(output, f"{shard:05d}{suffix}"), files[suffix])
            written += 1
        if progress:
            progress(shard, main)
        shard, batch = shard + 1, []

    for rec in records:
        batch.append(rec)
        count += 1
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return {"records": count, "shards": shard, "written": written, "kept_existing": skipped}
