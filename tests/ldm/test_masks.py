import numpy as np
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConditioningConfig
from ldm.latent_scale import LatentScale
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


def test_inpaint_condition_draws_one_cached_variant_per_row():
    cfg = ConditioningConfig(kind="inpaint", concat_channels=5, cond_drop_prob=0.0)
    c = Conditioner(cfg, latent_scale=LatentScale(scale=2.0, shift=0.5))
    n, k = 6, 3
    lat = torch.arange(k, dtype=torch.float32).view(1, k, 1, 1, 1).expand(n, k, 4, 2, 2).reshape(n, -1)
    holes = torch.zeros(n, k, 2, 2, dtype=torch.uint8)
    holes[:, :, 0, 0] = 1
    batch = {"latent_mean": torch.zeros(n, 16), "inpaint_latent": lat, "inpaint_mask": holes.reshape(n, -1)}
    cond = c.batch(batch, torch.zeros(n, dtype=torch.bool), torch.Generator().manual_seed(0))["concat"]
    assert cond.shape == (n, 5, 2, 2)
    picked = cond[:, 0, 0, 0] / 2.0 + 0.5  # the variant index, back through the latent scale
    assert set(picked.tolist()) <= {0.0, 1.0, 2.0} and len(set(picked.tolist())) > 1
    assert (cond[:, 4, 0, 0] == 1).all() and (cond[:, 4, 1, 1] == 0).all()
    encode = lambda px: px.permute(0, 3, 1, 2).float()[:, :1].repeat(1, 4, 1, 1)[..., ::2, ::2] / 255  # noqa: E731
    c.encode, c.f = encode, 2
    image, mask = np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    cond, uncond = c.prompts([{"image": image, "mask": mask}])
    assert uncond is None and cond["concat"].shape == (1, 5, 2, 2)
    assert cond["concat"][0, 4].tolist() == [[0, 0], [0, 1]]
    assert float(cond["concat"][0, 0, 1, 1]) == pytest.approx((128 / 255 - 0.5) * 2, abs=1e-6)  # the gray hole


def test_semantic_condition_is_the_share_of_each_class_per_latent_cell():
    cfg = ConditioningConfig(kind="semantic", num_classes=3, concat_channels=3, cond_drop_prob=0.0)
    c = Conditioner(cfg, downsample_factor=2)
    m = np.zeros((4, 4), np.uint8)
    m[0, 0], m[0, 1], m[2:, 2:] = 1, 2, 2
    cond, uncond = c.prompts([m])
    assert uncond is None and cond["concat"].shape == (1, 3, 2, 2)  # never dropped in training: no null
    assert cond["concat"][0, :, 0, 0].tolist() == [0.5, 0.25, 0.25] and cond["concat"][0, 2, 1, 1] == 1
    assert torch.allclose(cond["concat"].sum(1), torch.ones(1, 2, 2))
    batch = c.batch({"label_map": torch.from_numpy(np.stack([m, m])).reshape(2, -1)}, torch.tensor([False, True]))
    assert torch.equal(batch["concat"][0], cond["concat"][0]) and not batch["concat"][1].any()  # dropped: zeros
    with pytest.raises(ValueError, match="holds id 5 but the model knows ids 0..2"):
        c.prompts([np.full((4, 4), 5, np.uint8)])
    guided = Conditioner(ConditioningConfig(kind="semantic", num_classes=3, concat_channels=3), downsample_factor=2)
    cond, uncond = guided.prompts([m])  # trained with dropout (zeros): zeros are its null for guidance
    assert torch.equal(uncond["concat"], torch.zeros_like(cond["concat"]))
