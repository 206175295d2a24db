#!/usr/bin/env python
"""Bytes per training worker before launch (pipeline/train/memory_plan.py): weights, gradients, optimizer state, EMA,
activations and the total, for a preset at a ZeRO stage, worker count, batch and precision; with --check, the plan
of a config that fits on this machine next to a real DeepSpeed step's measured peak memory.

  python bench/memory_plan.py --preset sd15 --zero 2 --workers 8 --batch 8 --precision bf16 --resolution 512
  python bench/memory_plan.py --all --workers 8 --batch 8 --precision bf16 --grad-checkpointing
  python bench/memory_plan.py --check            # sd15's structure at width 128 on this CPU: plan vs measured
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from matched import add_tiny, figures, free_port, tiny  # noqa: E402

SD = ("sd15", "sd21", "sdxl-base")


def config(preset: str, width: int, ckpt: bool):
    from dataclasses import replace

    from ldm.config import get_preset
    cfg = get_preset(preset)
    unet = replace(cfg.unet, grad_checkpointing=ckpt, **({"model_channels": width} if width else {}))
    return replace(cfg, unet=unet)


def table(a) -> None:
    from pipeline.train.memory_plan import plan
    presets = SD if a.all else (a.preset,)
    print(f"per worker, GiB: ZeRO-{a.zero}, {a.workers} worker(s), batch {a.batch} per worker, {a.precision}, "
          f"{'with' if a.grad_checkpointing else 'without'} activation checkpointing, device {a.device}")
    print("| preset | px | params | grads | optimizer | EMA | activations | step | framework | peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in presets:
        cfg = config(p, a.width, a.grad_checkpointing)
        px = a.resolution or cfg.autoencoder.resolution
        side = px // cfg.autoencoder.downsample_factor
        r = plan(cfg, zero_stage=a.zero, workers=a.workers, batch=a.batch, latent_hw=(side, side),
                 precision=a.precision, device=a.device).row()
        print(f"| {p} | {px} | " + " | ".join(f"{r[k]:.2f}" for k in ("params", "grads", "optimizer", "ema",
                                                                       "activations", "step", "framework", "total"))
              + " |")
        figures(**{f"{p.replace('-', '_')}_total_gib": r["total"]})


def measure(a) -> dict:
    """In a fresh process (this file --measure-one): one rank, real DeepSpeed, the peak RSS over training steps."""
    import threading

    import psutil
    import torch
    torch.set_num_threads(a.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from ldm.model import LatentDiffusion
    from pipeline.train.ldm_loop import import_deepspeed
    from pipeline.train.sharded_ema import build_ema
    deepspeed = import_deepspeed(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    peak, done = [psutil.Process().memory_info().rss], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], psutil.Process().memory_info().rss)
            time.sleep(0.002)
    threading.Thread(target=poll, daemon=True).start()
    cfg = config(a.preset, a.width, a.grad_checkpointing)
    model = LatentDiffusion(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config={"train_micro_batch_size_per_gpu": a.batch,
                                              "zero_optimization": {"stage": a.zero},
                                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4,
                                                                                         "torch_adam": True}}})
    ema = build_ema(engine, a.zero, 0, 1, 0.999, None)
    side = (a.resolution or cfg.autoencoder.resolution) // cfg.autoencoder.downsample_factor
    u = cfg.unet
    start = 0
    for i in range(a.steps + 1):
        if i == 1:  # after the first step (the optimizer state exists): the steady peak of training steps
            start, peak[0] = peak[0], psutil.Process().memory_info().rss
        x = torch.randn(a.batch, u.in_channels, side, side)
        ctx = torch.randn(a.batch, 77, u.context_dim) if u.context_dim else None
        loss = engine(x, torch.randint(0, 1000, (a.batch,)), context=ctx).square().mean()
        engine.backward(loss)
        engine.step()
        ema.update()
    done.set()
    return {"peak": peak[0], "start_peak": start}


def check(a) -> None:
    from pipeline.train.memory_plan import GiB, plan
    cfg = config(a.preset, a.width, a.grad_checkpointing)
    side = (a.resolution or cfg.autoencoder.resolution) // cfg.autoencoder.downsample_factor
    p = plan(cfg, zero_stage=a.zero, workers=1, batch=a.batch, latent_hw=(side, side), precision="fp32", device="cpu")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS: RSS = what is live
    cmd = [sys.executable, __file__, "--measure-one", "--preset", a.preset, "--width", str(a.width), "--zero",
           str(a.zero), "--batch", str(a.batch), "--resolution", str(a.resolution), "--steps", str(a.steps),
           "--threads", str(a.threads), "--port", str(free_port())] + (["--grad-checkpointing"] if
                                                                        a.grad_checkpointing else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        sys.exit(r.stdout[-2000:] + r.stderr[-3000:])
    got = json.loads(r.stdout.strip().splitlines()[-1])
    measured = got["peak"]
    row = p.row()
    print(f"{a.preset} UNet at width {a.width or 'full'}, latent {side}x{side}, batch {a.batch}, ZeRO-{a.zero}, 1 "
          f"worker, fp32 on this CPU, {'with' if a.grad_checkpointing else 'without'} activation checkpointing")
    print("  plan (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    print(f"  measured peak RSS: {measured / GiB:.2f} GiB over {a.steps} training steps (set-up and the first step, "
          f"where DeepSpeed builds its flat buffers and the optimizer state: {got['start_peak'] / GiB:.2f} GiB)")
    figures(plan_over_measured=p.total / measured)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15", help="model preset (sd15, sd21, sdxl-base, demo, ...)")
    ap.add_argument("--all", action="store_true", help="a row for each of sd15, sd21 and sdxl-base")
    ap.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="DeepSpeed ZeRO stage")
    ap.add_argument("--workers", type=int, default=1, help="training workers (data-parallel ranks)")
    ap.add_argument("--batch", type=int, default=4, help="latents per worker per micro-step")
    ap.add_argument("--precision", choices=["fp32", "bf16", "autocast"], default="bf16", help="training precision")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on")
    ap.add_argument("--resolution", type=int, default=0, help="image side in pixels (0 = the preset's)")
    ap.add_argument("--width", type=int, default=0, help="the UNet's model_channels (0 = the preset's)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="what the workers train on")
    ap.add_argument("--check", action="store_true",
                    help="plan vs a real 1-worker fp32 DeepSpeed run's peak RSS on this CPU (default: sd15 at width "
                    "128, 256 px, batch 4)")
    ap.add_argument("--steps", type=int, default=3, help="--check: training steps measured (after a first one)")
    ap.add_argument("--threads", type=int, default=2, help="--check: torch threads")
    add_tiny(ap)
    ap.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = tiny(ap.parse_args(), preset="tiny", width=0, batch=2, resolution=0, steps=1)
    if a.measure_one:
        print(json.dumps(measure(a)))
        return
    if a.tiny:  # the table and the check, both
        table(a)
        a.check = True
    elif a.check and not a.width:
        a.width, a.resolution = 128, a.resolution or 256
    if a.check:
        check(a)
    else:
        table(a)


if __name__ == "__main__":
    main()
