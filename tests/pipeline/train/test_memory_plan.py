"""The memory plan before launch (pipeline/train/memory_plan.py): its terms, and the warning of a run that will not
fit. How close it comes to a measured run: bench/memory_plan.py --check (docs/benchmarks.md)."""
import torch

from ldm.config import get_preset
from ldm.model import LatentDiffusion
from pipeline.train.memory_plan import GiB, activation_bytes, check_fits, count_params, plan
from pipeline.train.options import TrainOptions


def test_terms_follow_zero_stage_precision_and_checkpointing():
    cfg = get_preset("demo")
    n, frozen = count_params(cfg)
    assert n + frozen == sum(p.numel() for p in LatentDiffusion(cfg).parameters())
    kw = dict(batch=4, latent_hw=(8, 8), device="cpu")
    z2 = plan(cfg, zero_stage=2, workers=4, precision="fp32", **kw)
    assert z2.params == 4 * (n + frozen) and z2.grads == 4 * n // 4 and z2.ema == 4 * n  # rank 0's whole EMA
    assert z2.optimizer == 12 * n // 4  # fp32 master + Adam's moments, partitioned
    z3 = plan(cfg, zero_stage=3, workers=4, precision="fp32", **kw)
    assert z3.ema == 4 * n // 4 and z3.params < z2.params  # the sharded EMA and weights
    bf16 = plan(cfg, zero_stage=2, workers=4, precision="bf16", **kw)
    assert bf16.grads == z2.grads // 2 and bf16.activations < z2.activations
    ck = plan(cfg, zero_stage=2, workers=4, precision="fp32", checkpointing=True, **kw)
    assert ck.activations < z2.activations and ck.total <= z2.total


def test_activations_grow_with_the_batch_and_leave_the_weights_out():
    cfg = get_preset("demo")
    one = activation_bytes(cfg, 1, (8, 8), torch.float32, False)
    four = activation_bytes(cfg, 4, (8, 8), torch.float32, False)
    assert four == 4 * one  # per-sample tensors only: no weight counted, nothing shared across the batch
    weights = 4 * sum(p.numel() for p in LatentDiffusion(cfg).unet.parameters())
    assert 0 < one < weights


def test_a_run_that_cannot_fit_is_warned_about_before_launch(ray_local):
    said = []
    ok = TrainOptions(latents="x", preset="demo", num_workers=1, batch_size=4, zero_stage=2, precision="fp32")
    p = check_fits(get_preset("demo"), ok, (8, 8), said.append)
    assert p.total < 2 * GiB and "memory plan per worker (GiB)" in said[0] and len(said) == 1
    huge = TrainOptions(latents="x", preset="sd15", num_workers=1, batch_size=4096, zero_stage=0, precision="fp32")
    check_fits(get_preset("sd15"), huge, (64, 64), said.append)
    assert "WARNING: a worker is planned to need" in said[-1] and "grad_checkpointing" in said[-1]
