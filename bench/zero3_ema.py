#!/usr/bin/env python
"""ZeRO-3 on 2 workers: what the EMA and activation checkpointing cost, side by side in one run.

Variants of one training step (forward, backward, AdamW) of a UNet of at least 100 M parameters under real DeepSpeed
ZeRO-3 on two ranks (gloo on 127.0.0.1):
  off       no EMA
  sharded   the EMA as the trainer keeps it: each rank averages its own partition (pipeline/train/sharded_ema.py)
  gathered  the design it replaced: the whole model gathered every step, rank 0 averaging a whole fp32 copy
  ckpt      activation checkpointing on (unet.grad_checkpointing), no EMA
Step times come from one rank pair that runs the variants in turn, round after round (so drift hits all alike);
memory from a fresh rank pair per variant (peak RSS per worker, allocations returned to the OS as they are freed).

  python bench/zero3_ema.py                          # sd15's UNet structure at width 128 (~142 M parameters)
  python bench/zero3_ema.py --width 320 --latent 32  # the full sd15 UNet (860 M), a larger activation share
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from matched import add_tiny, figures, free_port, tiny  # noqa: E402

VARIANTS = ("off", "sharded", "gathered", "ckpt")


def build(a, rank: int, world: int, port: int, ckpt: bool):
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(a.threads)
    from dataclasses import replace

    from ldm.config import get_preset
    from ldm.unet import UNetModel
    from pipeline.train.ldm_loop import import_deepspeed
    deepspeed = import_deepspeed(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    unet = UNetModel(replace(get_preset(a.preset).unet, model_channels=a.width, grad_checkpointing=ckpt))
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=unet.parameters(), config={
        "train_micro_batch_size_per_gpu": a.batch_size, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}})
    g = torch.Generator().manual_seed(rank)
    c = unet.cfg
    batch = (torch.randn(a.batch_size, c.in_channels, a.latent, a.latent, generator=g),
             torch.randint(0, 1000, (a.batch_size,), generator=g),
             torch.randn(a.batch_size, a.context_len, c.context_dim, generator=g) if c.context_dim else None)
    return engine, batch


def emas(engine, variant: str, rank: int, world: int):
    """(the sharded EMA or None, the gathered whole EMA on rank 0 or None) of a variant."""
    from ldm.ema import EMA
    from pipeline.train.ldm_loop import full_state
    from pipeline.train.sharded_ema import ShardedEMA
    sharded = ShardedEMA(engine.module, rank, world, 0.999, None) if variant == "sharded" else None
    whole = None
    if variant == "gathered":
        weights = full_state(engine, 3)
        whole = EMA(weights, 0.999) if rank == 0 else None
    return sharded, whole


def step(engine, batch, variant: str, sharded, whole, window=None) -> None:
    """One training step; `window(on)` marks forward + backward, where the activations live."""
    from pipeline.train.ldm_loop import full_state
    x, t, ctx = batch
    if window:
        window(True)
    loss = engine(x, t, context=ctx).float().square().mean()
    engine.backward(loss)
    if window:
        window(False)
    engine.step()
    if variant == "sharded":
        sharded.update()
    elif variant == "gathered":
        weights = full_state(engine, 3)  # every rank joins the gather; rank 0 averages
        if whole is not None:
            whole.update(weights)


def timing(rank: int, world: int, port: int, a, out: str) -> None:
    import torch.distributed as dist
    engine, batch = build(a, rank, world, port, ckpt=False)
    state = {v: emas(engine, v, rank, world) for v in ("sharded", "gathered")}
    times = {v: [] for v in VARIANTS}
    for r in range(a.warmup + a.steps):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:  # a rotating order each round
            engine.module.set_grad_checkpointing(v == "ckpt")
            dist.barrier()
            t0 = time.perf_counter()
            step(engine, batch, v, *state.get(v, (None, None)))
            dist.barrier()
            if r >= a.warmup:
                times[v].append(time.perf_counter() - t0)
    if rank == 0:
        params = sum(p.ds_numel for p in engine.module.parameters())
        Path(out, "timing.json").write_text(json.dumps({"times": times, "params": params}))


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def memory(rank: int, world: int, port: int, a, variant: str, out: str) -> None:
    """After one step (the optimizer state exists): the peak RSS over the measured steps, and the activations' own
    share: the peak during forward + backward over the RSS as each forward starts."""
    import gc
    engine, batch = build(a, rank, world, port, ckpt=variant == "ckpt")
    sharded, whole = emas(engine, variant, rank, world)
    step(engine, batch, variant, sharded, whole)
    gc.collect()
    peak, act, at, done = [rss()], [0], {"on": False, "start": 0, "top": 0}, threading.Event()

    def window(on: bool) -> None:
        if on:
            at.update(on=True, start=rss(), top=0)
        else:
            at["on"] = False
            act[0] = max(act[0], at["top"] - at["start"])

    def poll():
        while not done.is_set():
            now = rss()
            peak[0] = max(peak[0], now)
            if at["on"]:
                at["top"] = max(at["top"], now)
            time.sleep(0.002)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    for _ in range(a.steps):
        step(engine, batch, variant, sharded, whole, window)
    done.set()
    th.join()
    Path(out, f"memory_{variant}_{rank}.json").write_text(json.dumps({"act": act[0], "peak": peak[0]}))


def spawn(fn, *args) -> None:
    import torch.multiprocessing as mp
    mp.spawn(fn, args=(2, free_port(), *args), nprocs=2, join=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15", help="the model preset whose UNet structure is trained")
    ap.add_argument("--width", type=int, default=128, help="the UNet's model_channels (sd15: 320 = its full 860 M)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (8 x this pixels)")
    ap.add_argument("--batch-size", type=int, default=4, help="latents per worker per step")
    ap.add_argument("--context-len", type=int, default=77, help="text tokens the cross-attention attends to")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds of every variant first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    add_tiny(ap)
    a = tiny(ap.parse_args(), preset="tiny", width=32, latent=8, batch_size=1, context_len=4, steps=1, warmup=1)
    # large tensors mmapped and returned to the OS when freed, so the RSS follows what is live
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = tempfile.mkdtemp(prefix="zero3-ema-")
    spawn(timing, a, out)
    for v in VARIANTS:
        spawn(memory, a, v, out)
    t = json.loads(Path(out, "timing.json").read_text())
    med = {v: statistics.median(t["times"][v]) for v in VARIANTS}
    mem = {v: [json.loads(Path(out, f"memory_{v}_{r}.json").read_text()) for r in (0, 1)] for v in VARIANTS}
    peak = {v: max(m["peak"] for m in mem[v]) / 2 ** 20 for v in VARIANTS}
    act = {v: max(m["act"] for m in mem[v]) / 2 ** 20 for v in VARIANTS}
    print(f"ZeRO-3 x 2 workers, {a.preset} UNet at width {a.width}: {t['params'] / 1e6:.1f} M parameters, latent "
          f"{a.latent}x{a.latent}, batch {a.batch_size} per worker, fp32, {a.threads} thread(s) per worker")
    for v in VARIANTS:
        print(f"  {v:9s} step {med[v]:.3f} s (median of {len(t['times'][v])}) | peak RSS per worker {peak[v]:.0f} MB, "
              f"forward + backward's own {act[v]:.0f} MB")
    figures(ema_step_ratio=med["sharded"] / med["off"], ema_memory_ratio=peak["sharded"] / peak["off"],
            gathered_ema_step_ratio=med["gathered"] / med["off"],
            gathered_ema_memory_ratio=peak["gathered"] / peak["off"], ckpt_step_ratio=med["ckpt"] / med["off"],
            ckpt_memory_ratio=act["ckpt"] / max(act["off"], 1e-9),  # forward + backward's memory: what it saves
            ckpt_total_memory_ratio=peak["ckpt"] / peak["off"])


if __name__ == "__main__":
    main()
