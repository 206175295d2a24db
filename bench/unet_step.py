#!/usr/bin/env python
"""One LDM training step (forward + backward + AdamW) of our UNet vs diffusers' UNet2DConditionModel at a matched
config with the same weights, timed side by side in one process, on CPU or a CUDA GPU, fp32 or bf16 autocast.

Also prints how far the two forward passes are apart in the chosen precision (the same weights must give the
same function) and the peak GPU memory of each.

  python bench/unet_step.py --preset demo --batch-size 32                        # CPU, fp32
  python bench/unet_step.py --preset sd15 --batch-size 16 --device cuda --precision bf16
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
    ap.add_argument("--preset", default="demo",
                    help="model preset whose UNet is timed (e.g. tiny, demo, sd15, sd21, sdxl-base)")
    ap.add_argument("--batch-size", type=int, default=32, help="latents per step")
    ap.add_argument("--context-len", type=int, default=77, help="text tokens the cross-attention attends to")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model, after the warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, theirs, ours, ...); best kept")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast(bfloat16)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    add_tiny(ap)
    a = tiny(ap.parse_args(), preset="tiny", batch_size=4, context_len=8, steps=1, warmup=1, rounds=1)

    import torch

    from ldm.diffusion import Schedule, diffusion_loss
    from matched import diffusers_twin, seeded_unet
    from pipeline.presets import get_preset

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = get_preset(a.preset)
    f = cfg.autoencoder.downsample_factor
    shape = (cfg.unet.in_channels, cfg.autoencoder.resolution // f, cfg.autoencoder.resolution // f)
    ctx_dim = cfg.unet.context_dim or 8
    B = a.batch_size
    ours = seeded_unet(cfg.unet)
    theirs = diffusers_twin(ours, shape[1], ctx_dim)
    ours, theirs = ours.to(dev), theirs.to(dev)
    sched = Schedule.from_config(cfg.diffusion)
    g = torch.Generator(device=dev).manual_seed(0)
    z0 = torch.randn(B, *shape, generator=g, device=dev)
    context = torch.randn(B, a.context_len, ctx_dim, generator=g, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    fwd = {"ours": lambda x, t: ours(x, t, context=context),
           "diffusers": lambda x, t: theirs(x, t, encoder_hidden_states=context).sample}
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-5),
            "diffusers": torch.optim.AdamW(theirs.parameters(), lr=1e-5)}

    # the same function: both forward passes on one batch before any update
    with torch.no_grad(), amp:
        t = torch.randint(0, 1000, (B,), generator=g, device=dev)
        o1, o2 = fwd["ours"](z0, t).float(), fwd["diffusers"](z0, t).float()
    rel = ((o1 - o2).norm() / o2.norm()).item()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(name):
        with amp:
            loss = diffusion_loss(fwd[name], z0, cfg.diffusion, sched, generator=g).mean()
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    best = {"ours": 0.0, "diffusers": 0.0}
    peak = {}
    for r in range(a.rounds):
        for name in ("ours", "diffusers"):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(a.warmup):
                step(name)
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(name)
            sync()
            best[name] = max(best[name], a.steps * B / (time.perf_counter() - t0))
            if dev.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30

    n = sum(p.numel() for p in ours.parameters()) / 1e6
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nUNet train step: preset {a.preset} ({n:.1f}M params), latents {shape}, "
          f"context {a.context_len}x{ctx_dim}, "
          f"batch {B}, {a.precision}, {where}; best of {a.rounds} rounds of {a.steps} steps after {a.warmup} warm-up")
    print(f"  forward outputs, same weights: relative difference {rel:.2e}")
    for name in ("ours", "diffusers"):
        mem = f" | peak {peak[name]:.1f} GiB allocated (both models resident)" if peak else ""
        print(f"  {name:9s}: {best[name]:8.1f} samples/s{mem}")
    print(f"  RATIO ours/diffusers {best['ours'] / best['diffusers']:5.2f}x")
    figures(ours_samples_per_s=best["ours"], diffusers_samples_per_s=best["diffusers"],
            ours_over_diffusers=best["ours"] / best["diffusers"], forward_relative_difference=rel)


if __name__ == "__main__":
    main()
