"""Aspect-ratio buckets (NovelAI / SDXL / mosaicml's bucketed crops): instead of a square centre crop, each image
goes to the bucket of near-equal pixel count whose aspect is nearest its own, is resized to cover it and cropped
only by the rounding left over.

  buckets(256, 64, 3.0) -> [(384, 192), (320, 192), (256, 256), (192, 320), (192, 384)]  (h, w)
"""
from __future__ import annotations

import math


def buckets(resolution: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, each height with the width nearest resolution**2 pixels (within
    about step/side of it), up to `max_aspect`: from tall to wide, the square one included."""
    if resolution % step:
        raise ValueError(f"--resolution {resolution} is not a multiple of --bucket-step {step}")
    area, out = resolution * resolution, set()
    for h in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        w = round(area / h / step) * step
        if w >= step and max(h / w, w / h) <= max_aspect:
            out.add((h, w))
            out.add((w, h))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest(w: int, h: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (h, w) whose aspect is nearest an image of w x h (in log-aspect)."""
    a = math.log(w / h)
    return min(options, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - a), -hw[0] * hw[1]))


def cover(w: int, h: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image of w x h is resized to so it covers the bucket, aspect kept: (width, height)."""
    bh, bw = bucket
    s = max(bw / w, bh / h)
    return max(bw, round(w * s)), max(bh, round(h * s))
