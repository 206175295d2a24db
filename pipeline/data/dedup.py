"""Duplicate removal at encode time (about 30% of LAION-2B is duplicated: Webster et al. 2023).

Each decoded image gets two 64-bit fingerprints:
- `image_hash`, of its pixels and size: equal for the same image, whatever file format or metadata it came in;
- `phash`, the perceptual hash (DCT of the 32x32 grey image, the 8x8 lowest frequencies against their median):
  within a few bits for a resized, recompressed or slightly edited copy.
A record is a duplicate of an earlier one when its image hash is equal (skip reason `duplicate_image`) or, with
`--dedup near`, its phash is within `--dedup-distance` bits (`near_duplicate`). With `--dedup-by image+caption`
both must also have the same caption (case and spaces ignored).

One `DedupIndex` actor per encode run holds the fingerprints of the records kept so far, across shards; a resumed
run seeds it from the rows its cache already holds, so duplicates are found across runs as well. The first
record to claim a fingerprint keeps it (the order shards finish in decides which copy that is); a claim is by
record key, so a retried task that claims again keeps its own rows.
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

MODES = ("off", "exact", "near")
BY = ("image", "image+caption")


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u  # parquet int64


def image_hash(im: Image.Image) -> int:
    """64 bits of BLAKE2b over the decoded RGB pixels and the size."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{im.size[0]}x{im.size[1]}".encode())
    h.update(im.tobytes())
    return _signed(int.from_bytes(h.digest(), "big"))


_N = 32
_DCT = np.cos(np.pi / _N * (np.arange(_N)[:, None]) * (np.arange(_N)[None, :] + 0.5))  # DCT-II basis


def phash(im: Image.Image) -> int:
    """The perceptual hash: 32x32 grey (antialiased), 2-D DCT, the 8x8 lowest frequencies thresholded at their
    median (the DC term left out of the median)."""
    g = np.asarray(im.convert("L").resize((_N, _N), Image.BILINEAR, reducing_gap=2.0), np.float64)
    low = (_DCT @ g @ _DCT.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return _signed(int("".join("1" if b else "0" for b in bits), 2))


def caption_hash(caption: str) -> int:
    """The namespace of a record's fingerprints with --dedup-by image+caption: its caption, case and spaces
    ignored."""
    text = " ".join(str(caption or "").lower().split())
    return _signed(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))


def bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of distance + 1 bit bands covering 64 bits: two hashes within `distance` bits agree on at
    least one whole band (pigeonhole), so a band lookup finds every near duplicate."""
    n = distance + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    out, at = [], 0
    for w in widths:
        out.append((at, w))
        at += w
    return out


class DedupIndex:
    """The fingerprints of the records kept so far (a Ray actor during an encode run)."""

    def __init__(self, mode: str, distance: int):
        if mode not in MODES[1:]:
            raise ValueError(f"dedup mode {mode!r}: use exact or near")
        self.mode, self.distance = mode, distance
        self.exact: dict[tuple[int, int], str] = {}
        self.bands = bands(distance) if mode == "near" else []
        self.buckets: list[dict[tuple[int, int], list[tuple[int, str]]]] = [{} for _ in self.bands]

    def claim(self, keys, image_hashes, phashes, namespaces) -> list[str]:
        """For each record: "" when it is new (its fingerprints now held for it, or it already held them), else
        the skip reason (`duplicate_image`, `near_duplicate`)."""
        out = []
        for key, ih, ph, ns in zip(keys, image_hashes, phashes, namespaces):
            key, ih, ph, ns = str(key), int(ih), int(ph) & ((1 << 64) - 1), int(ns)
            owner = self.exact.get((ns, ih))
            if owner is not None and owner != key:
                out.append("duplicate_image")
                continue
            if self.mode == "near" and owner is None and self._near(ns, ph, key):
                out.append("near_duplicate")
                continue
            if owner is None:
                self.exact[(ns, ih)] = key
                for b, (shift, width) in zip(self.buckets, self.bands):
                    b.setdefault((ns, ph >> shift & ((1 << width) - 1)), []).append((ph, key))
            out.append("")
        return out

    def _near(self, ns: int, ph: int, key: str) -> bool:
        for b, (shift, width) in zip(self.buckets, self.bands):
            for other, owner in b.get((ns, ph >> shift & ((1 << width) - 1)), ()):
                if owner != key and bin(ph ^ other).count("1") <= self.distance:
                    return True
        return False

    def size(self) -> int:
        return len(self.exact)
