"""Inpainting masks (paper §4.5): large free-form strokes and boxes as in LaMa's training (Suvorov et al. 2022),
and the two views of a mask the model sees: the hole blanked out of the image, and the hole at the latent's size.
A mask is a bool (H, W) array, True where the image is unknown (to be generated)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _disk(mask: np.ndarray, cy: float, cx: float, r: float) -> None:
    h, w = mask.shape
    y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 1)
    x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def stroke_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """LaMa's "thick" free-form mask: 1-4 random polylines of 2-6 segments, each stroke 1/12-1/5 of the side wide."""
    mask = np.zeros((h, w), bool)
    side = min(h, w)
    for _ in range(int(rng.integers(1, 5))):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(side / 24, side / 10)
        for _ in range(int(rng.integers(2, 7))):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(side / 6, side / 2)
            ny, nx = np.clip(y + length * np.sin(angle), 0, h - 1), np.clip(x + length * np.cos(angle), 0, w - 1)
            for s in np.linspace(0, 1, max(2, int(length / max(r / 2, 0.5)))):  # stamps overlapping by half a radius
                _disk(mask, y + s * (ny - y), x + s * (nx - x), r)
            y, x = ny, nx
    return mask


def box_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """LaMa's box mask: 1-3 rectangles, each side 1/4-1/2 of the image's."""
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        bh, bw = int(rng.uniform(h / 4, h / 2)), int(rng.uniform(w / 4, w / 2))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[top:top + bh, left:left + bw] = True
    return mask


def random_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A training mask: strokes or boxes with equal odds, redrawn until it hides 10-60% of the image."""
    for _ in range(100):
        mask = (stroke_mask if rng.random() < 0.5 else box_mask)(h, w, rng)
        if 0.1 <= mask.mean() <= 0.6:
            return mask
    return mask


def eval_masks(n: int, h: int, w: int, seed: int = 1234) -> list[np.ndarray]:
    """A fixed set of `n` masks for held-out evaluation: the same for every model and baseline compared."""
    rng = np.random.default_rng(seed)
    return [random_mask(h, w, rng) for _ in range(n)]


def mask_out(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked image (SD-inpainting's x * (1 - m) in [-1, 1]): the hole mid-gray. uint8 (B,H,W,3), bool (B,H,W)."""
    return torch.where(mask.unsqueeze(-1).to(images.device), torch.full_like(images, 128), images)


def latent_mask(mask: torch.Tensor, f: int) -> torch.Tensor:
    """The hole at the latent's size: a latent cell is unknown when any of its f x f pixels is.
    (B,1,H,W) -> (B,1,H/f,W/f)."""
    return F.max_pool2d(mask.float(), f) if f > 1 else mask.float()
