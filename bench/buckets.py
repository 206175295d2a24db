#!/usr/bin/env python
"""Aspect-ratio buckets on the real photos, end to end, and what they cost against square crops, side by side.

The photos bundled with scikit-image / scikit-learn / mvtb-data (landscape, square, portrait), each also turned
upright, so every shape is there:
1. stage 1: a KL f=4 autoencoder (the demo preset) trained on them;
2. encode twice: square centre crops (the default) and `--bucket` with `--resolutions 32,64` (two resolutions in one
   pass) and `--flip-latents`: seconds and images/s of each;
3. the LDM (demo preset, micro-conditioned) at 32 px on square crops and on buckets, the same steps and batch:
   steady samples/s of each (the cost of bucketing);
4. the bucketed run continued at 64 px (`--resume-from`, `--resolution 64`): the 256 -> 512 curriculum in small;
5. a grid of wide, tall and square samples from it (`docs/figures/buckets_grid.png` with --figure).

  python bench/buckets.py --ae-steps 400 --ldm-steps 300 --phase2-steps 150
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched import add_tiny, figures, tiny  # noqa: E402

OVERRIDES = ("unet.micro_cond=true",)


def photo_shards(out: Path) -> int:
    """The real photos and each turned upright (portrait shapes from real pixels), as webdataset shards."""
    from PIL import Image

    from pipeline.data.make_shards import photo_records, write_shards
    recs = []
    for r in photo_records("train", 0, "png"):
        recs.append(r)
        im = Image.open(io.BytesIO(r.image)).convert("RGB").transpose(Image.Transpose.ROTATE_90)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        recs.append(dataclasses.replace(r, image=buf.getvalue(), width=im.width, height=im.height,
                                        source=f"{r.source}-upright"))
    write_shards(iter(recs), str(out), "webdataset", 64, seed=0)
    return len(recs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae-steps", type=int, default=400, help="stage-1 steps (batch 16)")
    p.add_argument("--ldm-steps", type=int, default=300, help="LDM steps at 32 px, each feed")
    p.add_argument("--phase2-steps", type=int, default=150, help="LDM steps at 64 px after the 32 px phase")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="", help="work folder (default: a temporary one)")
    p.add_argument("--figure", default="", help="also write the sample grid here (e.g. docs/figures/buckets_grid.png)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the wide, tall and square samples")
    add_tiny(p)
    a = tiny(p.parse_args(), ae_steps=4, ldm_steps=4, phase2_steps=2, batch_size=4, sample_steps=2)
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    from pipeline.evaluate.grid import save_grid
    from pipeline.evaluate.sample import sample_images
    from pipeline.train.autoencoder_driver import run_train_autoencoder
    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import AETrainOptions, TrainOptions

    out = Path(a.out or tempfile.mkdtemp(prefix="bench-buckets-"))
    quiet = lambda *_: None  # noqa: E731
    n = photo_shards(out / "shards")
    print(f"photos: {n} records (each photo and the photo turned upright) -> {out}")

    t0 = time.time()
    ae = run_train_autoencoder(AETrainOptions(
        input=str(out / "shards"), eval_input=str(out / "shards"), preset="demo", overrides=("loss.rec_loss=l2",),
        max_steps=a.ae_steps, batch_size=16, lr=2e-3, warmup_steps=20, checkpoint_every=a.ae_steps, sample_every=0,
        log_every=1000, storage_path=str(out / "runs"), name="stage1", eval_max_images=64, eval_fd=False,
        in_memory="yes"), quiet)
    print(f"stage 1: {a.ae_steps} steps, {time.time() - t0:.0f} s, PSNR {ae['eval']['psnr']:.1f} dB (on the training "
          f"photos, square 32 px crops)")

    enc = {}
    for name, pre in (("square", PreprocessConfig(resolution=32)),
                      ("buckets", PreprocessConfig(resolution=32, bucket=True, bucket_step=8, extra_resolutions=(64,),
                                                   flip_latents=True))):
        t0 = time.time()
        s = run_encode(EncodeOptions(input=str(out / "shards"), output=str(out / f"latents-{name}"),
                                     autoencoder=ae["export"], preprocess=pre, max_length=16, batch_size=32), quiet)
        enc[name] = (time.time() - t0, s)
        print(f"encode {name:8s} {s['kept']} kept, {enc[name][0]:.1f} s ({s['kept'] / enc[name][0]:.1f} img/s)"
              + (f"; buckets at 32 px {s['buckets']}; rows at 64 px {s['resolutions']['64']}; flip gap "
                 f"{s['flip_gap']:.1%}" if name == "buckets" else ""))

    common = dict(preset="demo", overrides=OVERRIDES, num_workers=1, zero_stage=2, batch_size=a.batch_size, lr=1e-3,
                  warmup_steps=20, sample_every=0, log_every=1000, storage_path=str(out / "runs"), ema_decay=0.999)
    runs = {}
    for name in ("square", "buckets"):
        runs[name] = run_train(TrainOptions(latents=str(out / f"latents-{name}"), max_steps=a.ldm_steps,
                                            checkpoint_every=a.ldm_steps, name=f"ldm-{name}", **common), quiet)
    sq, bk = runs["square"]["samples_per_s"], runs["buckets"]["samples_per_s"]
    print(f"train 32 px, batch {a.batch_size}, {a.ldm_steps} steps: square crops {sq:.1f} samples/s, aspect buckets "
          f"{bk:.1f} samples/s: buckets / square = {bk / sq:.2f}x (loss {runs['square']['loss']:.3f} vs "
          f"{runs['buckets']['loss']:.3f})")

    total = a.ldm_steps + a.phase2_steps
    p2 = run_train(TrainOptions(latents=str(out / "latents-buckets"), resolution=64, max_steps=total,
                                checkpoint_every=total, name="ldm-buckets-64", resume_from=runs["buckets"]["run_dir"],
                                **common), quiet)
    print(f"phase 2 at 64 px from step {a.ldm_steps}: to step {p2['step']}, {p2['samples_per_s']:.1f} samples/s, "
          f"loss {p2['loss']:.3f}")

    prompts = [r["caption"] for r in _captions(out / "latents-buckets", 4)]
    rows = []
    for size, what in (((48, 80), "wide"), ((80, 48), "tall"), ((64, 64), "square")):
        images, _ = sample_images(p2["export"], prompts, 1, steps=a.sample_steps, cfg_scale=3.0, size=size)
        rows.append(images)
        print(f"samples {what}: asked {size[0]}x{size[1]}, drawn at the bucket {images.shape[-2]}x{images.shape[-1]}")
    if a.figure:
        import torch
        side = max(max(r.shape[-2:]) for r in rows)
        padded = [torch.nn.functional.pad(r, (0, side - r.shape[-1], 0, side - r.shape[-2]), value=1.0) for r in rows]
        save_grid(torch.cat(padded), a.figure, nrow=len(prompts), upscale=2)
        print(f"grid (rows wide, tall, square; prompts {prompts}) -> {a.figure}")
    figures(buckets_over_square=bk / sq, square_samples_per_s=sq, buckets_samples_per_s=bk,
            phase2_samples_per_s=p2["samples_per_s"], encode_buckets_over_square=enc["square"][0] / enc["buckets"][0])


def _captions(cache: Path, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    from pipeline.cache.reader import part_files
    seen, out = set(), []
    for f in part_files(str(cache)):
        for r in pq.read_table(f, columns=["caption"]).to_pylist():
            if r["caption"] not in seen:
                seen.add(r["caption"])
                out.append(r)
            if len(out) == n:
                return out
    return out


if __name__ == "__main__":
    main()
