#!/usr/bin/env python
"""LDM training-step throughput, measured side by side in one run (one process, same UNet, same batch):

1. streaming the latent cache through Ray Data (`iter_torch_batches`) vs the same loop on in-memory tensors;
2. encoding images on the fly with the frozen autoencoder vs the cache, printed next to the ideal
   1 + (encoder cost / UNet step cost) that pre-encoding saves;
3. our UNet train step vs diffusers' UNet2DConditionModel at a matched config (same weights).

  python bench/train_throughput.py --images 1024 --preset demo --batch-size 32 --steps 30
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from ldm.autoencoder import build_autoencoder, encode_latent
    from ldm.config import get_preset
    from ldm.diffusion import Schedule, diffusion_loss
    from ldm.unet import UNetModel
    from pipeline.encode import EncodeOptions, run_encode
    from pipeline.latent_cache import part_files, read_manifest
    from pipeline.make_shards import fashion_records, write_shards
    from pipeline.preprocess import PreprocessConfig, decode_image, resize_crop
    from pipeline.sources import discover_shards, read_shard

    torch.set_num_threads(2)
    cfg = get_preset(a.preset)
    res = cfg.autoencoder.resolution
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_shards(fashion_records("train", a.images, 0, "png"), str(tmp / "shards"), "webdataset", 256, seed=0)
    ray.init(num_cpus=2, object_store_memory=256 * 2 ** 20, include_dashboard=False, logging_level="ERROR")
    run_encode(EncodeOptions(input=str(tmp / "shards"), output=str(tmp / "latents"), autoencoder=f"random:{a.preset}",
                             text_encoder="none", preprocess=PreprocessConfig(resolution=res)), log=lambda *x: None)
    m = read_manifest(str(tmp / "latents"))
    shape = tuple(m["latent_shape"])
    B = a.batch_size
    ctx_dim = cfg.unet.context_dim or 8
    context = torch.randn(B, 8, ctx_dim)

    torch.manual_seed(0)
    unet = UNetModel(cfg.unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator().manual_seed(0)

    def step(z0, model=None, call=None):
        net = model or unet
        o = opt if model is None else call["opt"]
        fn = (lambda x, t: net(x, t, context=context)) if call is None else call["fwd"]
        loss = diffusion_loss(fn, z0, cfg.diffusion, sched, generator=gen).mean()
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    def timed(batches, fn) -> float:
        it = iter(batches)
        for _ in range(a.warmup):
            fn(next(it))
        t0 = time.perf_counter()
        for _ in range(a.steps):
            fn(next(it))
        return a.steps * B / (time.perf_counter() - t0)

    def cycle(xs):
        while True:
            yield from xs

    # (A) in-memory latents
    import pyarrow.parquet as pq
    tables = [pq.read_table(f, columns=["latent_mean", "latent_std"]) for f in part_files(str(tmp / "latents"), m)]
    mean = torch.tensor(np.concatenate([np.array(t["latent_mean"].to_pylist(), np.float32) for t in tables]))
    std = torch.tensor(np.concatenate([np.array(t["latent_std"].to_pylist(), np.float32) for t in tables]))
    mem_batches = [(mean[i:i + B].view(-1, *shape), std[i:i + B].view(-1, *shape))
                   for i in range(0, len(mean) - B + 1, B)]
    draw = lambda ms: ms[0] + ms[1] * torch.randn(ms[0].shape, generator=gen)  # noqa: E731
    ips_mem = timed(cycle(mem_batches), lambda ms: step(draw(ms)))

    # (B) streaming the cache through Ray Data
    ds = ray.data.read_parquet(part_files(str(tmp / "latents"), m)).select_columns(["latent_mean", "latent_std"])

    def stream():
        while True:
            for b in ds.iter_torch_batches(batch_size=B, drop_last=True, local_shuffle_buffer_size=256):
                yield b["latent_mean"].float().view(-1, *shape), b["latent_std"].float().view(-1, *shape)
    ips_stream = timed(stream(), lambda ms: step(draw(ms)))

    # (C) encoding images on the fly with the frozen autoencoder
    ae = build_autoencoder(cfg.autoencoder).eval().requires_grad_(False)
    pre = PreprocessConfig(resolution=res)
    shards = discover_shards(str(tmp / "shards"))
    px = []
    for i, sh in enumerate(shards.shards):
        for r in read_shard({"uri": sh, "shard": i}, shards.layout):
            if r["key"]:
                px.append(resize_crop(decode_image(r["image"], pre)[0], pre, r["key"])[0])
    imgs = torch.tensor(np.stack(px)).permute(0, 3, 1, 2).float() / 127.5 - 1
    img_batches = [imgs[i:i + B] for i in range(0, len(imgs) - B + 1, B)]

    def encode(x):
        with torch.no_grad():
            mu, sd = encode_latent(ae, x)
        return mu, sd
    ips_fly = timed(cycle(img_batches), lambda x: step(draw(encode(x))))
    t0 = time.perf_counter()
    for x in img_batches[:10]:
        encode(x)
    enc_cost = (time.perf_counter() - t0) / 10
    unet_cost = B / ips_mem
    ideal = 1 + enc_cost / unet_cost

    # (D) diffusers UNet2DConditionModel at a matched config, same weights
    from matched import diffusers_twin
    theirs = diffusers_twin(unet, shape[1], ctx_dim)
    opt_d = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    call_d = {"opt": opt_d, "fwd": lambda x, t: theirs(x, t, encoder_hidden_states=context).sample}
    ips_diffusers = timed(cycle(mem_batches), lambda ms: step(draw(ms), theirs, call_d))
    ips_ours = timed(cycle(mem_batches), lambda ms: step(draw(ms)))

    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"\ntrain-step throughput: preset {a.preset} UNet ({n_params:.1f}M params), latents {shape}, batch {B}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, fp32, {torch.get_num_threads()} threads")
    print(f"  in-memory latents           : {ips_mem:8.1f} samples/s")
    print(f"  streaming the cache (Ray)   : {ips_stream:8.1f} samples/s   "
          f"RATIO stream/in-memory {ips_stream / ips_mem:5.2f}x")
    print(f"  encoding images on the fly  : {ips_fly:8.1f} samples/s   "
          f"RATIO cache/on-the-fly {ips_stream / ips_fly:5.2f}x"
          f"  (ideal 1 + encoder/UNet = 1 + {enc_cost * 1e3:.0f} ms / {unet_cost * 1e3:.0f} ms = {ideal:.2f}x)")
    print("  ours vs diffusers UNet2DConditionModel (matched config, same weights):")
    print(f"    ours {ips_ours:8.1f} samples/s | diffusers {ips_diffusers:8.1f} samples/s | RATIO ours/diffusers "
          f"{ips_ours / ips_diffusers:5.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
