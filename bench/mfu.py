#!/usr/bin/env python
"""What one device does with the two heavy models, per execution mode, measured side by side in one run:

1. the UNet's train step (forward + backward + fused AdamW) as samples/s and model FLOPs utilisation (MFU);
2. the encode job's encoder stage (`pipeline.encode.encoder.LatentEncoder`, the Ray Data actor's callable, on
   uint8 pixel batches as the CPU stage hands them over) as images/s.

Modes (joined with '+'):
  autocast   fp32 weights under torch.autocast(bfloat16) (the UNet: plain torch training; fp32 master weights)
  bf16       bf16 weights, as DeepSpeed's bf16 mode runs the module (the UNet keeps an fp32 master copy that
             the fused AdamW updates, as DeepSpeed does)
  cl         channels_last memory format (convolutions read NHWC; cuDNN's fast path for bf16)
  compile    torch.compile (inductor) of the whole model: GroupNorm + SiLU + residual adds fused
  flash      (UNet) scaled_dot_product_attention held to the FlashAttention-2 backend (torch picks cuDNN's first)
  nb         cuDNN's algorithm search off (torch.backends.cudnn.benchmark = False; the jobs turn it on on a GPU)

Model FLOPs are counted once per sample by torch.utils.flop_counter on the eager forward + backward (matmuls,
convolutions and attention, as MFU counts them; no recomputation), and divided by the step time and the
device's dense bf16 peak (the vendor's figure, --peak-tflops to override) and by the peak a large bf16 matmul
reaches on this device in the same run.

  python bench/mfu.py --device cuda --preset sd15 --unet-batch 32 --encoder-preset ldm-kl-8 \
      --encoder-resolution 256 --encoder-batch 128 --modes autocast,bf16,bf16+cl,bf16+cl+compile
  python bench/mfu.py --preset tiny --unet-batch 8 --encoder-preset tiny --encoder-resolution 32   # CPU check
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched import add_tiny, tiny  # noqa: E402

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "A10G": 70.0}


def vendor_peak(name: str) -> float:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return 0.0


def matmul_peak(dev: torch.device) -> float:
    """TFLOP/s of an 8192^3 bf16 matmul on this device (the best it does on dense work), mean of 10 after 3."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(dev)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call: the best of two runs of `steps` after `warmup` calls (compilation happens in warm-up)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(2):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def profile(fn, dev: torch.device, steps: int, label: str, out: Path | None) -> None:
    """Where a call's device time goes: torch.profiler over `steps` calls; prints the device-busy share of the wall
    time and the kernels that take most of it, grouped (attention, cuDNN's layout transposes, convolution, matmul,
    fused Triton, optimizer, copy, other); the full table goes to `out` when given."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with torch_profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(dev)
        wall = time.perf_counter() - t0
    if dev.type != "cuda":
        return
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    groups = {  # first match wins: cuDNN's attention and layout kernels carry "cudnn" in their names too
        "attention": ("sdpa", "flash", "fmha", "attention", "efficient"),
        "layout": ("nchwtonhwc", "nhwctonchw"),  # cuDNN transposing NCHW tensors for its NHWC kernels
        "conv": ("conv", "cudnn", "xmma", "implicit", "wgrad", "dgrad", "fprop"),
        "matmul": ("gemm", "cutlass", "nvjet", "cublas", "sm90_"),
        "triton": ("triton",), "optimizer": ("adam", "multi_tensor", "foreach"),
        "copy": ("memcpy", "copy", "memset")}
    per: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        g = next((k for k, words in groups.items() if any(w in name for w in words)), "other")
        per[g] = per.get(g, 0.0) + e.self_device_time_total / 1e6
    shares = " ".join(f"{k}={v / busy:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
    print(f"profile {label} device_busy_of_wall={busy / wall:.3f} ms_per_call={wall / steps * 1e3:.1f} "
          f"kernel_ms_per_call={busy / steps * 1e3:.1f} {shares}", flush=True)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    for e in top:
        print(f"  {e.self_device_time_total / 1e3 / steps:8.2f} ms/call x{e.count // steps:<4d} {e.key[:110]}",
              flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=80, max_name_column_width=140)
        (out / f"profile_{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.txt").write_text(table)


def unet_step_fn(preset: str, mode: set[str], batch: int, latent: int, dev: torch.device):
    """One train step of the preset's UNet in `mode`; returns (step(), model)."""
    from pipeline.presets import get_preset
    from ldm.diffusion import Schedule, diffusion_loss
    from ldm.unet import UNetModel

    cfg = get_preset(preset)
    torch.backends.cudnn.benchmark = "nb" not in mode
    torch.manual_seed(0)
    model = UNetModel(cfg.unet).to(dev)
    bf16 = "bf16" in mode
    fmt = torch.channels_last if "cl" in mode else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if bf16:  # the master copy keeps each weight's layout, so fused AdamW sees grads and states alike
        master = [p.detach().clone().float() for p in model.parameters()]
        model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(master, lr=1e-5, fused=dev.type == "cuda" or None)
    else:
        master = None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda" or None)
    net = torch.compile(model) if "compile" in mode else model
    sched = Schedule.from_config(cfg.diffusion)
    g = torch.Generator(device=dev).manual_seed(0)
    c = cfg.unet.in_channels
    z0 = torch.randn(batch, c, latent, latent, generator=g, device=dev).contiguous(memory_format=fmt)
    ctx_dim = cfg.unet.context_dim
    context = (torch.randn(batch, cfg.conditioning.max_length, ctx_dim, generator=g, device=dev)
               if ctx_dim else None)
    y = torch.randint(0, cfg.unet.num_classes, (batch,), device=dev) if cfg.unet.num_classes else None
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled="autocast" in mode)
    params = list(model.parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if "flash" in mode else contextlib.nullcontext

    def step():
        with amp, backend():
            loss = diffusion_loss(lambda x, t: net(x, t, context=context, y=y), z0, cfg.diffusion, sched,
                                  generator=g).float().mean()
        loss.backward()
        if master is not None:  # DeepSpeed bf16: fp32 master weights take the bf16 grads, then are cast back
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step, model


def unet_flops(preset: str, latent: int, dev: torch.device) -> float:
    """Model FLOPs of one sample's forward + backward, counted on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode
    from pipeline.presets import get_preset
    from ldm.unet import UNetModel

    cfg = get_preset(preset)
    model = UNetModel(cfg.unet).to(dev)
    n = 2
    x = torch.randn(n, cfg.unet.in_channels, latent, latent, device=dev)
    t = torch.randint(0, 1000, (n,), device=dev)
    ctx = (torch.randn(n, cfg.conditioning.max_length, cfg.unet.context_dim, device=dev)
           if cfg.unet.context_dim else None)
    y = torch.randint(0, cfg.unet.num_classes, (n,), device=dev) if cfg.unet.num_classes else None
    with FlopCounterMode(display=False) as fc:
        model(x, t, context=ctx, y=y).float().pow(2).mean().backward()
    del model
    return fc.get_total_flops() / n


def encoder_fn(preset: str, mode: set[str], batch: int, res: int):
    """The encode job's encoder callable on one batch of uint8 pixels, in `mode`; returns (call(), device_only()):
    the whole callable (bytes in, fp16 numpy out) and its model alone on pixels already on the device."""
    from pipeline.encode.encoder import LatentEncoder

    with contextlib.redirect_stderr(io.StringIO()):  # the random-weights warning, once per mode
        enc = LatentEncoder(f"random:{preset}", "", "none", 77, False, res, threads=torch.get_num_threads(),
                            precision="bf16" if "bf16" in mode else ("autocast" if "autocast" in mode else "fp32"),
                            compile="on" if "compile" in mode else "off", channels_last="cl" in mode,
                            cudnn_benchmark="nb" not in mode)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8)
    b = {"key": np.array([f"k{i}" for i in range(batch)]), "skip": np.array([""] * batch),
         "pixels": np.array([p.tobytes() for p in px], dtype=object), "caption": np.array(["a"] * batch)}
    x = enc.pixels_to_device(b["pixels"])
    return (lambda: enc(b)["latent_mean"]), (lambda: enc.encode(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="sd15", help="model preset whose UNet is timed ('' skips the UNet)")
    ap.add_argument("--unet-batch", type=int, default=32, help="latents per UNet step")
    ap.add_argument("--latent", type=int, default=0,
                    help="latent side (0 = the preset's resolution / f: 64 for sd15's 512 px)")
    ap.add_argument("--encoder-preset", default="ldm-kl-8",
                    help="preset whose autoencoder the encoder stage runs, random weights ('' skips it)")
    ap.add_argument("--encoder-resolution", type=int, default=256, help="image side fed to the encoder")
    ap.add_argument("--encoder-batch", type=int, default=128, help="images per encoder call (--encode-batch-size)")
    ap.add_argument("--modes", default="autocast,bf16,bf16+cl,bf16+cl+compile",
                    help="comma-separated modes, each a '+'-joined subset of autocast, bf16, cl, compile, flash, nb")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per mode (best of two runs)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation happens here)")
    ap.add_argument("--profile", type=int, default=0,
                    help="after timing a mode, profile this many calls (torch.profiler): device-busy share and the "
                         "kernels that take the time (0 = off)")
    ap.add_argument("--profile-dir", type=Path, default=None, help="write each profile's full kernel table here")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak of the device in TFLOP/s (default: the vendor's figure for known GPUs)")
    add_tiny(ap)
    a = tiny(ap.parse_args(), device="cpu", preset="tiny", unet_batch=2, latent=8, encoder_preset="tiny",
             encoder_resolution=16, encoder_batch=2, modes="autocast", steps=1, warmup=1)

    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = a.peak_tflops or vendor_peak(name)
    measured = matmul_peak(dev)
    print(f"device={name!r} torch={torch.__version__} vendor_peak_bf16_tflops={peak:.1f} "
          f"matmul_bf16_tflops={measured:.1f}", flush=True)
    modes = [set(m.split("+")) for m in a.modes.split(",") if m]
    if a.preset:
        from pipeline.presets import get_preset
        cfg = get_preset(a.preset)
        latent = a.latent or cfg.autoencoder.resolution // cfg.autoencoder.downsample_factor
        flops = unet_flops(a.preset, latent, dev)
        print(f"unet preset={a.preset} latent={cfg.unet.in_channels}x{latent}x{latent} batch={a.unet_batch} "
              f"model_gflops_per_sample_fwd_bwd={flops / 1e9:.1f}", flush=True)
        for mode in modes:
            step, model = unet_step_fn(a.preset, mode, a.unet_batch, latent, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            sec = timed(step, dev, a.warmup, a.steps)
            wall = time.perf_counter() - t0
            tflops = flops * a.unet_batch / sec / 1e12
            mem = f" peak_gib={torch.cuda.max_memory_allocated() / 2 ** 30:.1f}" if dev.type == "cuda" else ""
            mfu = f" mfu={tflops / peak:.3f}" if peak else ""
            print(f"unet mode={'+'.join(sorted(mode))} samples_per_s={a.unet_batch / sec:.1f} "
                  f"model_tflops={tflops:.1f}{mfu} of_matmul_peak={tflops / measured:.3f}{mem} "
                  f"bench_wall_s={wall:.0f}", flush=True)
            if a.profile:
                profile(step, dev, a.profile, f"unet_{'+'.join(sorted(mode))}_b{a.unet_batch}", a.profile_dir)
            del step, model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if a.encoder_preset:
        # the same random weights and pixels in every mode: fp32 gives the reference latents
        ref = encoder_fn(a.encoder_preset, {"fp32"}, a.encoder_batch, a.encoder_resolution)[0]().astype(np.float32)
        for mode in modes:
            call, device_only = encoder_fn(a.encoder_preset, mode, a.encoder_batch, a.encoder_resolution)
            t0 = time.perf_counter()
            sec = timed(call, dev, a.warmup, a.steps)
            dev_sec = timed(device_only, dev, 1, a.steps)
            err = np.linalg.norm(call().astype(np.float32) - ref) / np.linalg.norm(ref)
            print(f"encoder preset={a.encoder_preset} res={a.encoder_resolution} batch={a.encoder_batch} "
                  f"mode={'+'.join(sorted(mode))} images_per_s={a.encoder_batch / sec:.0f} "
                  f"model_alone_images_per_s={a.encoder_batch / dev_sec:.0f} "
                  f"latent_rel_err_vs_fp32={err:.2e} bench_wall_s={time.perf_counter() - t0:.0f}", flush=True)
            if a.profile:
                profile(call, dev, a.profile, f"encoder_{'+'.join(sorted(mode))}_b{a.encoder_batch}", a.profile_dir)
            del call, device_only
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
