"""Flips that survive the cache: each row takes its cached mirrored latent with probability p, from the trainer's
seeded generator (so a resumed run draws the same flips)."""
import torch

from pipeline.train.ldm_loop import flipped_posterior


def batch(n=400):
    return {"latent_mean": torch.zeros(n, 6, dtype=torch.float16), "latent_std": torch.ones(n, 6, dtype=torch.float16),
            "latent_flip_mean": torch.full((n, 6), 7.0, dtype=torch.float16),
            "latent_flip_std": torch.full((n, 6), 2.0, dtype=torch.float16)}


def test_rows_take_the_mirrored_latent_with_probability_p():
    b = batch()
    m, s = flipped_posterior(b, 0.0, torch.Generator().manual_seed(0), "cpu")
    assert m.eq(0).all() and s.eq(1).all()
    m, s = flipped_posterior(b, 1.0, torch.Generator().manual_seed(0), "cpu")
    assert m.eq(7).all() and s.eq(2).all()
    m, s = flipped_posterior(b, 0.5, torch.Generator().manual_seed(0), "cpu")
    rows = m[:, 0].eq(7)
    assert 150 < rows.sum() < 250 and m.eq(7).eq(rows[:, None]).all() and s.eq(2).eq(rows[:, None]).all()  # whole rows
    m2, _ = flipped_posterior(b, 0.5, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(m, m2)  # the same generator state, the same flips
