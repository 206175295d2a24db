#!/usr/bin/env python
"""What inpainting's condition costs, measured side by side in one run: the masked image's latent cached as K
variants per image at encode time (what ldm-ray does) vs encoded at train time (what SD-inpainting's training does).

1. the encode job on the same shards without and with --inpaint-variants K: seconds and cache bytes;
2. one training step of the inpainting UNet (forward + backward, batch B) vs the first stage's encoder forward on
   B masked images: the extra share of every step that train-time encoding would add (and it must keep the pixels
   in the cache, r*r*3 bytes per row, where the cached variants keep K latents and holes).

Caching costs K encoder passes per image once; train-time encoding costs one per image per epoch. So caching is the
cheaper compute from K epochs on, and frees the training workers of the first stage; train-time encoding draws a
fresh mask every epoch.

  python bench/inpaint_cost.py --images 2000 --variants 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched import add_tiny, figures, tiny  # noqa: E402


def encode(shards: str, out: str, variants: int, autoencoder: str, resolution: int, batch: int) -> dict:
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    t0 = time.time()
    s = run_encode(EncodeOptions(input=shards, output=out, autoencoder=autoencoder, text_encoder="none",
                                 preprocess=PreprocessConfig(resolution=resolution, min_caption_chars=0,
                                                             inpaint_variants=variants),
                                 batch_size=batch), log=lambda *a: None)
    size = sum(f.stat().st_size for f in Path(out, "parts").glob("*.parquet"))
    return {"seconds": time.time() - t0, "kept": s["kept"], "bytes": size}


def step_costs(preset: str, batch: int, repeats: int) -> dict:
    """Seconds of one UNet training step (fwd + bwd) and of one encoder forward on `batch` masked images."""
    import numpy as np
    import torch

    from ldm.autoencoder import build_autoencoder, encode_latent
    from pipeline.presets import get_preset
    from ldm.masks import eval_masks, mask_out
    from ldm.model import LatentDiffusion
    cfg = get_preset(preset)
    r, (c, h, w) = cfg.autoencoder.resolution, cfg.autoencoder.latent_shape
    net, ae = LatentDiffusion(cfg), build_autoencoder(cfg.autoencoder).eval()
    opt = torch.optim.AdamW(net.unet.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (batch, r, r, 3), dtype=torch.uint8)
    holes = torch.from_numpy(np.stack(eval_masks(batch, r, r)))
    z, cond = torch.randn(batch, c, h, w), torch.randn(batch, c + 1, h, w)
    t = torch.randint(0, 1000, (batch,))

    def unet_step():
        loss = (net.unet(z, t, concat=cond) - z).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def encoder_pass():
        x = mask_out(images, holes).permute(0, 3, 1, 2).float() / 127.5 - 1
        encode_latent(ae, x)

    out = {}
    for name, fn in (("unet_step", unet_step), ("encoder", encoder_pass)):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t0) / repeats
    out["pixel_bytes"], out["variant_bytes"] = r * r * 3, c * h * w * 2 + h * w
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST images to encode")
    p.add_argument("--variants", type=int, default=4, help="K, the cached masks per image")
    p.add_argument("--preset", default="demo-inpaint", help="the inpainting LDM (its first stage is the encoder)")
    p.add_argument("--batch-size", type=int, default=64, help="encode batch and training batch")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps / encoder passes")
    add_tiny(p)
    a = tiny(p.parse_args(argv), images=64, variants=2, batch_size=16, repeats=1)

    from ldm.autoencoder import build_autoencoder
    from ldm.checkpoint import save_components
    from ldm.config import to_dict
    from pipeline.presets import get_preset
    from pipeline.common.runtime import init_ray
    from pipeline.data.make_shards import fashion_records, write_shards
    cfg = get_preset(a.preset)
    init_ray(None, 512)
    with tempfile.TemporaryDirectory() as d:
        ae = f"{d}/ae.safetensors"
        save_components(ae, {"autoencoder": build_autoencoder(cfg.autoencoder).state_dict()},
                        {"autoencoder": to_dict(cfg.autoencoder)})
        write_shards(fashion_records("train", a.images, 0, "png"), f"{d}/shards", "webdataset", 500, seed=0)
        res = cfg.autoencoder.resolution
        encode(f"{d}/shards", f"{d}/warm", 0, ae, res, a.batch_size)  # Ray Data and the actors warm
        plain = encode(f"{d}/shards", f"{d}/plain", 0, ae, res, a.batch_size)
        cached = encode(f"{d}/shards", f"{d}/cached", a.variants, ae, res, a.batch_size)
    steps = step_costs(a.preset, a.batch_size, a.repeats)
    k, n = a.variants, plain["kept"]
    print(f"\ninpainting's condition, {n} images at {res}px, preset {a.preset}, K = {k}")
    mb = 2 ** 20
    print(f"  encode job     without variants {plain['seconds']:.1f} s, {plain['bytes'] / mb:.2f} MB | with K={k}: "
          f"{cached['seconds']:.1f} s, {cached['bytes'] / mb:.2f} MB -> x{cached['seconds'] / plain['seconds']:.2f} "
          f"time, x{cached['bytes'] / plain['bytes']:.2f} bytes (once)")
    print(f"  training step  UNet fwd+bwd (batch {a.batch_size}) {1e3 * steps['unet_step']:.0f} ms | encoder fwd on "
          f"{a.batch_size} masked images {1e3 * steps['encoder']:.0f} ms -> train-time encoding adds "
          f"{100 * steps['encoder'] / steps['unet_step']:.0f}% to every step")
    print(f"  per row        cached: {k} x {steps['variant_bytes']} B of latent + hole; train-time: "
          f"{steps['pixel_bytes']} B of pixels")
    print(f"  break-even     caching K={k} costs {k} encoder passes per image once, train-time one per epoch: "
          f"caching is the cheaper compute from {k} epochs on")
    figures(encode_time_ratio=cached["seconds"] / plain["seconds"], cache_bytes_ratio=cached["bytes"] / plain["bytes"],
            train_time_encoding_step_share=steps["encoder"] / steps["unet_step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
