#!/usr/bin/env python
"""LDM training-step throughput, measured side by side in one run (same model, same batch, same machine):

1. the bare step: the text-conditional LDM step (cached MiniLM embeddings, CFG dropout, AdamW) on in-memory
   tensors, vs the same loop fed by jobs/train_ldm.py's planned epochs (pipeline/train/epoch_plan.py: Ray Data
   reads the parts a seeded plan names): streaming the parquet cache every epoch (`--in-memory no`), and from the
   parts the worker kept after one read (`--in-memory auto`, what the job does with a cache this size); and vs
   Ray Data's own feed (`iter_torch_batches` from the object store after one read), the job's feed before the
   planned epochs;
2. the product: jobs/train_ldm.py's Ray Train worker (DeepSpeed ZeRO-2, EMA, metrics) on the same cache, its
   steady samples/s (after 5 steps) vs the bare step, and vs the worker's own step (DeepSpeed + EMA) run in this
   process without Ray, which splits the gap into DeepSpeed's share and Ray's;
3. encoding images on the fly with the frozen autoencoder vs the cache, printed next to the ideal
   1 + (encoder cost / UNet step cost) that pre-encoding saves;
4. our UNet train step vs diffusers' UNet2DConditionModel at a matched config (same weights).

  python bench/train_throughput.py --images 1024 --preset demo --batch-size 64 --steps 100
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

from matched import add_tiny, figures, tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4,
                    help="epochs of --images each for the in-process step variants, run interleaved; the median "
                    "epoch is reported (this machine's speed drifts by +-20%% over minutes)")
    add_tiny(ap)
    a = tiny(ap.parse_args(), images=64, batch_size=8, steps=4, warmup=1, rounds=1)

    import numpy as np
    import ray
    import torch

    from ldm.autoencoder import DiagonalGaussian, build_autoencoder, encode_latent
    from ldm.conditioning import Conditioner, drop_mask
    from pipeline.presets import get_preset
    from ldm.diffusion import Schedule, diffusion_loss
    from ldm.latent_scale import LatentScale
    from ldm.model import LatentDiffusion
    from ldm.unet import UNetModel
    from pipeline.common.runtime import init_ray, training_stream_context
    from pipeline.encode.flow import EncodeOptions, run_encode
    from pipeline.cache.reader import part_files, part_rows, read_manifest
    from pipeline.data.make_shards import fashion_records, write_shards
    from pipeline.data.preprocess import PreprocessConfig, decode_image, resize_crop
    from pipeline.data.sources import discover_shards, read_shard
    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import TrainOptions

    torch.set_num_threads(2)
    cfg = get_preset(a.preset)
    res = cfg.autoencoder.resolution
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_shards(fashion_records("train", a.images, 0, "png"), str(tmp / "shards"), "webdataset", 256, seed=0)
    init_ray(2, 512)  # the embedded Ray every job starts
    run_encode(EncodeOptions(input=str(tmp / "shards"), output=str(tmp / "latents"), autoencoder=f"random:{a.preset}",
                             max_length=cfg.conditioning.max_length, store_text_embeddings=True,
                             preprocess=PreprocessConfig(resolution=res)), log=lambda *x: None)
    m = read_manifest(str(tmp / "latents"))
    shape = tuple(m["latent_shape"])
    B = a.batch_size
    ctx_dim = cfg.unet.context_dim or 8
    context = torch.randn(B, 8, ctx_dim)
    columns = ["latent_mean", "latent_std", "input_ids", "attention_mask", "text_emb"]

    sched = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator().manual_seed(0)

    def timed(batches, fn, steps=None) -> float:
        it, steps = iter(batches), steps or a.steps
        for _ in range(a.warmup):
            fn(next(it))
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(next(it))
        return steps * B / (time.perf_counter() - t0)

    def interleaved(variants: dict) -> dict:
        """{name: (epoch, step)}: one epoch of each variant in turn, --rounds times, each from a fresh iterator (a
        variant's own per-epoch start-up counts, and none of its work runs in another's turn); the median epoch's
        samples/s of each, so the machine's drift hits every variant alike."""
        for epoch, fn in variants.values():
            for _, b in zip(range(a.warmup), epoch()):
                fn(b)
        rates = {k: [] for k in variants}
        for _ in range(a.rounds):
            for k, (epoch, fn) in variants.items():
                t0, n = time.perf_counter(), 0
                for b in epoch():
                    fn(b)
                    n += 1
                rates[k].append(n * B / (time.perf_counter() - t0))
        return {k: float(np.median(v)) for k, v in rates.items()}

    def cycle(xs):
        while True:
            yield from xs

    # (A) the bare step: the worker's math (posterior sample, scale, CFG drop, L_LDM, clip, AdamW), in memory
    torch.manual_seed(0)
    ldm = LatentDiffusion(cfg)
    conditioner = Conditioner.build(ldm)
    ldm_opt = torch.optim.AdamW(ldm.parameters(), lr=1e-4, fused=True)  # as the worker's DeepSpeed preset
    scale = LatentScale.choose(0.0, m["totals"]["latent_channel_mean"], m["totals"]["scale_factor"])

    def ldm_loss_of(model, batch):
        post = DiagonalGaussian(mean=batch["latent_mean"].float().view(-1, *shape),
                                std=batch["latent_std"].float().view(-1, *shape))
        z0 = scale.to_diffusion(post.sample(gen))
        kw = conditioner.batch(batch, drop_mask(B, 0.1, gen))
        return diffusion_loss(model, z0, cfg.diffusion, sched, generator=gen, **kw).mean()

    def ldm_step(batch):
        loss = ldm_loss_of(ldm, batch)
        ldm_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ldm.parameters(), 1.0)
        ldm_opt.step()

    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in part_files(str(tmp / "latents"), m)])
    cols = {c: torch.tensor(np.array(table[c].to_pylist())) for c in columns}
    mem_batches = [{c: v[i:i + B] for c, v in cols.items()} for i in range(0, table.num_rows - B + 1, B)]

    # (B) the same step fed by the job's planned epochs (streamed, and from the parts kept after one read), and by
    # Ray Data's iter_torch_batches from the object store
    import itertools

    from pipeline.train.epoch_plan import PlannedBatches, RayDataParts
    files, rows = part_files(str(tmp / "latents"), m), part_rows(str(tmp / "latents"), m)

    def planned(keep: bool):
        reader, epochs = RayDataParts(files, rows, columns, keep), itertools.count()
        plan = PlannedBatches(reader, rows, 1, 0, B, 256, seed=0)
        return lambda: itertools.islice(plan({"epoch": next(epochs), "batch_in_epoch": 0}), sum(rows) // B)

    with training_stream_context():
        kept = ray.data.read_parquet(files).select_columns(columns).materialize()

    def ray_data_epoch():
        return kept.iter_torch_batches(batch_size=B, drop_last=True, local_shuffle_buffer_size=256)

    # (D2) the worker's step without Ray: the same loss in DeepSpeed ZeRO-2 (one rank, gloo) with the EMA update,
    # so the worker/bare gap splits into DeepSpeed's share and Ray's
    ds_step, ds_close = deepspeed_step(ldm_step_loss=ldm_loss_of, cfg=cfg, B=B)
    in_memory = lambda: iter(mem_batches)  # noqa: E731
    r = interleaved({"mem": (in_memory, ldm_step), "stream": (planned(False), ldm_step),
                     "kept": (planned(True), ldm_step), "ray_data": (ray_data_epoch, ldm_step),
                     "ds": (in_memory, ds_step)})
    ds_close()
    ips_mem, ips_stream, ips_kept, ips_ray, ips_ds = r["mem"], r["stream"], r["kept"], r["ray_data"], r["ds"]

    # (E) the Ray Train worker of jobs/train_ldm.py on the same cache (steady samples/s, after 5 steps), with the
    # bare step timed right before and after it
    bare_before = timed(cycle(mem_batches), ldm_step, len(mem_batches))
    w = run_train(TrainOptions(latents=str(tmp / "latents"), preset=a.preset, batch_size=B, lr=1e-4,
                               max_steps=a.steps + 5, warmup_steps=0, ema_decay=0.999, checkpoint_every=10 ** 9,
                               sample_every=0, log_every=10 ** 9, storage_path=str(tmp / "runs"), name="bench"),
                  log=lambda *x: None)
    ips_worker = w["samples_per_s"]
    bare_around = (bare_before + timed(cycle(mem_batches), ldm_step, len(mem_batches))) / 2

    # the raw UNet for (C) and (D)
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step(z0, model=None, call=None):
        net = model or unet
        o = opt if model is None else call["opt"]
        fn = (lambda x, t: net(x, t, context=context)) if call is None else call["fwd"]
        loss = diffusion_loss(fn, z0, cfg.diffusion, sched, generator=gen).mean()
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    draw = lambda ms: ms[0] + ms[1] * torch.randn(ms[0].shape, generator=gen)  # noqa: E731
    lat_batches = [(b["latent_mean"].float().view(-1, *shape), b["latent_std"].float().view(-1, *shape))
                   for b in mem_batches]
    ips_unet = timed(cycle(lat_batches), lambda ms: step(draw(ms)))

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
    unet_cost = B / ips_unet
    ideal = 1 + enc_cost / unet_cost

    # (D) diffusers UNet2DConditionModel at a matched config, same weights
    from matched import diffusers_twin
    theirs = diffusers_twin(unet, shape[1], ctx_dim)
    opt_d = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    call_d = {"opt": opt_d, "fwd": lambda x, t: theirs(x, t, encoder_hidden_states=context).sample}
    ips_diffusers = timed(cycle(lat_batches), lambda ms: step(draw(ms), theirs, call_d))
    ips_ours = timed(cycle(lat_batches), lambda ms: step(draw(ms)))

    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"\ntrain-step throughput: preset {a.preset} UNet ({n_params:.1f}M params), latents {shape}, batch {B}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, fp32, {torch.get_num_threads()} threads")
    print(f"  bare LDM step, in-memory    : {ips_mem:8.1f} samples/s   (median of {a.rounds} interleaved epochs)")
    print(f"  bare LDM step, parquet      : {ips_stream:8.1f} samples/s   "
          f"RATIO stream/in-memory {ips_stream / ips_mem:5.2f}x  (planned epochs, --in-memory no: parts read + "
          f"decoded every epoch)")
    print(f"  bare LDM step, kept parts   : {ips_kept:8.1f} samples/s   "
          f"RATIO kept/in-memory {ips_kept / ips_mem:5.2f}x  (planned epochs, --in-memory auto, the job's default "
          f"here)")
    print(f"  bare LDM step, Ray Data feed: {ips_ray:8.1f} samples/s   "
          f"RATIO kept/ray-data {ips_kept / ips_ray:5.2f}x  (iter_torch_batches from the object store, the job's "
          f"feed before the planned epochs)")
    print(f"  DeepSpeed ZeRO-2 + EMA step : {ips_ds:8.1f} samples/s   "
          f"RATIO deepspeed/bare step {ips_ds / ips_mem:5.2f}x  (the worker's step in this process, no Ray)")
    print(f"  Ray Train worker (ZeRO-2)   : {ips_worker:8.1f} samples/s   "
          f"RATIO worker/bare step {ips_worker / bare_around:5.2f}x  (bare step timed just before and after: "
          f"{bare_around:.1f})  worker/deepspeed step {ips_worker / ips_ds:5.2f}x")
    print(f"  UNet step, cached latents   : {ips_unet:8.1f} samples/s")
    print(f"  encoding images on the fly  : {ips_fly:8.1f} samples/s   "
          f"RATIO cache/on-the-fly {ips_unet / ips_fly:5.2f}x"
          f"  (ideal 1 + encoder/UNet = 1 + {enc_cost * 1e3:.0f} ms / {unet_cost * 1e3:.0f} ms = {ideal:.2f}x)")
    print("  ours vs diffusers UNet2DConditionModel (matched config, same weights):")
    print(f"    ours {ips_ours:8.1f} samples/s | diffusers {ips_diffusers:8.1f} samples/s | RATIO ours/diffusers "
          f"{ips_ours / ips_diffusers:5.2f}x")
    figures(stream_over_in_memory=ips_stream / ips_mem, kept_over_in_memory=ips_kept / ips_mem,
            kept_over_ray_data=ips_kept / ips_ray, deepspeed_over_bare=ips_ds / ips_mem,
            worker_over_bare=ips_worker / bare_around, cache_over_on_the_fly=ips_unet / ips_fly,
            ours_over_diffusers=ips_ours / ips_diffusers)
    ray.shutdown()


def deepspeed_step(ldm_step_loss, cfg, B: int):
    """The Ray Train worker's step (DeepSpeed engine at the job's default ZeRO stage, EMA every step) on one gloo
    rank in this process, and the function that tears its process group down."""
    import os

    import torch
    import torch.distributed as dist

    from ldm.ema import EMA
    from ldm.model import LatentDiffusion
    from pipeline.train.ldm_loop import deepspeed_config, full_state, import_deepspeed
    from pipeline.train.options import TrainOptions
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    o = TrainOptions(latents="-", batch_size=B, lr=1e-4)
    deepspeed = import_deepspeed(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    model = LatentDiffusion(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=deepspeed_config(o, "fp32", 1, cuda=False), dist_init_required=False)
    ema = EMA(full_state(engine, o.zero_stage), 0.999)

    def step(batch):
        loss = ldm_step_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module.state_dict())
    return step, dist.destroy_process_group


if __name__ == "__main__":
    main()
