"""Duplicate fingerprints on the real photos: an exact copy has the same image hash, a resized or recompressed
copy a phash within a few bits, distinct photos are far apart; the index finds every pair within the distance."""
import io

import numpy as np
from PIL import Image

from pipeline.data.dedup import DedupIndex, bands, image_hash, phash
from pipeline.data.make_shards import photo_records


def photos(n=12):
    out = []
    for r in photo_records("train", 0, "png"):
        out.append(Image.open(io.BytesIO(r.image)).convert("RGB"))
        if len(out) == n:
            break
    return out


def jpeg(im, q=80):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def dist(a, b):
    return bin((a ^ b) & (2 ** 64 - 1)).count("1")


def test_fingerprints_of_copies_and_of_distinct_photos():
    ims = photos()
    assert len(ims) == 12
    for im in ims:
        assert image_hash(im.copy()) == image_hash(im) != image_hash(jpeg(im))
        assert dist(phash(im), phash(jpeg(im))) <= 2
        assert dist(phash(im), phash(im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BICUBIC))) <= 4
    far = [dist(phash(a), phash(b)) for i, a in enumerate(ims) for b in ims[i + 1:]]
    assert min(far) > 8, sorted(far)[:5]


def test_bands_cover_every_pair_within_the_distance():
    for d in (0, 3, 4, 7):
        b = bands(d)
        assert len(b) == d + 1 and sum(w for _, w in b) == 64 and b[-1][0] + b[-1][1] == 64
    rng = np.random.default_rng(0)
    index = DedupIndex("near", 4)
    base = [int(x) for x in rng.integers(0, 2 ** 63, 200)]
    assert index.claim([f"k{i}" for i in range(200)], range(200), base, [0] * 200) == [""] * 200
    near = [b ^ sum(1 << int(p) for p in rng.choice(64, 4, replace=False)) for b in base]  # 4 bits off each
    far = [b ^ sum(1 << int(p) for p in rng.choice(64, 9, replace=False)) for b in base]  # 9 bits off
    assert index.claim([f"n{i}" for i in range(200)], range(1000, 1200), near, [0] * 200) == ["near_duplicate"] * 200
    assert index.claim([f"f{i}" for i in range(200)], range(2000, 2200), far, [0] * 200).count("") > 190
    # an exact copy, a claim repeated by the same key (a retried task), another namespace (caption)
    assert index.claim(["x", "k3", "y"], [5, 3, 5], [base[5], base[3], base[5]], [0, 0, 7]) == \
        ["duplicate_image", "", ""]
    assert DedupIndex("exact", 4).claim(["a", "b"], [1, 2], [9, 9], [0, 0]) == ["", ""]  # exact ignores phash
