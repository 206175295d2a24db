import numpy as np
import torch

from ldm.masks import box_mask, eval_masks, latent_mask, mask_out, random_mask, stroke_mask


def test_training_masks_are_large_seeded_and_both_kinds():
    rng = np.random.default_rng(0)
    masks = [random_mask(32, 32, rng) for _ in range(100)]
    share = np.array([m.mean() for m in masks])
    assert ((share >= 0.1) & (share <= 0.6)).all() and share.mean() > 0.2  # LaMa-style large holes
    again = [random_mask(32, 32, np.random.default_rng(0)) for _ in range(1)]
    assert (again[0] == masks[0]).all()
    boxes = box_mask(32, 32, np.random.default_rng(1))
    rows, cols = np.flatnonzero(boxes.any(1)), np.flatnonzero(boxes.any(0))
    assert boxes.any() and stroke_mask(32, 32, np.random.default_rng(1)).any() and len(rows) >= 8 and len(cols) >= 8
    assert all((a == b).all() for a, b in zip(eval_masks(4, 16, 16), eval_masks(4, 16, 16)))


def test_masked_image_and_latent_hole():
    img = torch.full((1, 4, 4, 3), 250, dtype=torch.uint8)
    hole = torch.zeros(1, 4, 4, dtype=torch.bool)
    hole[0, 0, 0] = True
    out = mask_out(img, hole)
    assert out[0, 0, 0].tolist() == [128] * 3 and out[0, 3, 3].tolist() == [250] * 3
    small = latent_mask(hole[:, None], 2)
    assert small.shape == (1, 1, 2, 2) and small[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]  # any pixel hidden
