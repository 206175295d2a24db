#!/usr/bin/env python
"""One LDM training step (forward + backward + AdamW) in fp32 vs under bf16 autocast (fp32 weights, bf16
matmuls/convs: what `train_ldm --precision autocast` runs), the same UNet and batch, timed side by side in one
process, alternating rounds (this machine's speed drifts by +-20% over minutes).

Also prints how far the two forward passes are apart, and whether this CPU has native bf16 kernels (AVX512-BF16 or
AMX; without them autocast emulates bf16 and runs slower than fp32).

  python bench/autocast_step.py --preset demo-layout --batch-size 64     # the layout demo's step on this CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from matched import add_tiny, figures, tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo-layout", help="model preset whose UNet is timed (ldm/config.py)")
    ap.add_argument("--batch-size", type=int, default=64, help="latents per step")
    ap.add_argument("--context-len", type=int, default=5, help="tokens the cross-attention attends to")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per precision and round, after the warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per precision and round first")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (fp32, autocast, fp32, ...); best kept")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    add_tiny(ap)
    a = tiny(ap.parse_args(), preset="tiny", batch_size=4, steps=1, warmup=1, rounds=1)

    import copy

    import torch

    from pipeline.presets import get_preset
    from ldm.diffusion import Schedule, diffusion_loss
    from matched import seeded_unet
    from pipeline.data.make_shards import SCENE_SIZE
    from pipeline.common.precision import cpu_bf16

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = get_preset(a.preset)
    f = cfg.autoencoder.downsample_factor
    res = SCENE_SIZE if cfg.conditioning.kind == "layout" else cfg.autoencoder.resolution  # layout: whole scenes
    z_ch, extra = cfg.unet.out_channels, cfg.unet.in_channels - cfg.unet.out_channels
    B = a.batch_size
    base = seeded_unet(cfg.unet)
    nets = {"fp32": base, "autocast": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in nets.items()}
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(B, z_ch, res // f, res // f, generator=g)
    concat = torch.rand(B, extra, res // f, res // f, generator=g) if extra else None
    ctx = torch.randn(B, a.context_len, cfg.unet.context_dim, generator=g) if cfg.unet.context_dim else None
    sched = Schedule.from_config(cfg.diffusion)

    def amp(name):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "autocast")

    def fwd(name):
        return lambda x, t: nets[name](x, t, context=ctx, concat=concat)

    with torch.no_grad():
        t = torch.randint(0, 1000, (B,), generator=g)
        ref = fwd("fp32")(z0, t)
        with amp("autocast"):
            out = fwd("autocast")(z0, t).float()
    rel = ((out - ref).norm() / ref.norm()).item()

    def step(name):
        with amp(name):
            loss = diffusion_loss(fwd(name), z0, cfg.diffusion, sched, generator=g).mean()
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    best = {k: 0.0 for k in nets}
    for _ in range(a.rounds):
        for name in nets:
            for _ in range(a.warmup):
                step(name)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(name)
            best[name] = max(best[name], a.steps * B / (time.perf_counter() - t0))

    n = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"\nUNet train step: preset {a.preset} ({n:.1f}M params), latents {(z_ch, res // f, res // f)} + {extra} "
          f"concatenated, batch {B}, CPU with {torch.get_num_threads()} threads, native bf16: {cpu_bf16()}; "
          f"best of {a.rounds} rounds of {a.steps} steps after {a.warmup} warm-up")
    print(f"  forward outputs, same weights: relative difference {rel:.2e}")
    for name in nets:
        print(f"  {name:9s}: {best[name]:8.1f} samples/s")
    print(f"  RATIO autocast/fp32 {best['autocast'] / best['fp32']:5.2f}x")
    figures(fp32_samples_per_s=best["fp32"], autocast_samples_per_s=best["autocast"],
            autocast_over_fp32=best["autocast"] / best["fp32"], forward_relative_difference=rel,
            native_bf16=int(cpu_bf16()))


if __name__ == "__main__":
    main()
