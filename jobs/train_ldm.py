#!/usr/bin/env python
"""Train a latent diffusion model (paper §3.2-3.3) on a latent cache with Ray Train + DeepSpeed ZeRO.

  python jobs/train_ldm.py --latents data/latents --preset demo --num-workers 2 --zero-stage 2 --max-steps 2000 \\
      --mlflow-uri sqlite:///mlruns/mlflow.db unet.model_channels=96 diffusion.parameterization=v

Trailing key=value arguments override the preset (after --config YAML). A rerun with the same --name and
--storage-path (or --resume RUN_DIR) continues from the latest checkpoint; raise --max-steps to train on.

Exit status: 0 trained; 2 bad arguments, config or cache; 4 training failed (non-finite loss, workers).
"""
import argparse

from _common import run

from pipeline.train_config import TrainOptions


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. unet.model_channels=64)")
    d = p.add_argument_group("data and model")
    d.add_argument("--latents", required=True, help="latent cache written by jobs/encode_latents.py (local or s3://)")
    d.add_argument("--preset", default="demo", help="config preset: tiny, demo, ldm-kl-8, sd-v1-like")
    d.add_argument("--config", default="", help="YAML config applied on top of the preset")
    d.add_argument("--autoencoder", default="", help="first stage for sample grids (default: the cache's own source); "
                   "its identity must match the cache's")
    d.add_argument("--text-encoder", default="", help="frozen text encoder folder (default: the cache's)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--max-steps", type=int, default=1000, help="optimizer steps to train to (total, across resumes)")
    t.add_argument("--batch-size", type=int, default=32, help="latents per worker per micro-step")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up steps")
    t.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="LR after warm-up")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR / peak LR for cosine and linear")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    t.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (with warm-up)")
    t.add_argument("--ema-every", type=int, default=1, help="update the EMA every N steps (ZeRO-3 gathers weights)")
    t.add_argument("--nan-tolerance", type=int, default=5, help="stop after this many non-finite steps in a row")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, noise and data order")
    t.add_argument("--shuffle-buffer", type=int, default=1000, help="local shuffle buffer (rows) per worker")
    s = p.add_argument_group("distribution (Ray Train + DeepSpeed)")
    s.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU on a GPU cluster)")
    s.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2, help="DeepSpeed ZeRO stage")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    s.add_argument("--offload", action="store_true", help="ZeRO-Offload the optimizer (and params at stage 3) to CPU")
    s.add_argument("--deepspeed-config", default="", help="JSON deep-merged over infra/deepspeed/zero{stage}.json")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    s.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs reserved per worker (0 = auto; leave "
                   "some for Ray Data)")
    s.add_argument("--threads-per-worker", type=int, default=0, help="torch threads per worker (0 = auto)")
    s.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    s.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded local Ray (0 = all)")
    s.add_argument("--object-store-mb", type=int, default=512, help="object store of the embedded local Ray")
    c = p.add_argument_group("checkpoints, samples, tracking")
    c.add_argument("--storage-path", default="runs", help="where Ray Train keeps run dirs and checkpoints (local or s3://)")
    c.add_argument("--name", default="", help="run name (default ldm-PRESET-TIMESTAMP); reuse it to resume")
    c.add_argument("--resume", default="", help="a run dir, a Ray checkpoint dir, or mlflow:RUN_ID to continue from")
    c.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint + Ray report every N steps")
    c.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept")
    c.add_argument("--sample-every", type=int, default=500, help="sample grid every M steps (0 = off)")
    c.add_argument("--sample-prompts", default="", help="';'-separated prompts (class ids for class-conditional "
                   "models); default: the first 8 distinct captions of the cache")
    c.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for sample grids")
    c.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale for sample grids")
    c.add_argument("--log-every", type=int, default=10, help="status line every N steps")
    c.add_argument("--mlflow-uri", default="", help="MLflow tracking URI: http://host:port or sqlite:///path/mlflow.db")
    c.add_argument("--experiment", default="train_ldm", help="MLflow experiment")
    c.add_argument("--register-model", default="", help="registered model name (default ldm-PRESET)")
    return p.parse_args(argv)


def options(a) -> TrainOptions:
    return TrainOptions(
        latents=a.latents, preset=a.preset, config_yaml=a.config, overrides=tuple(a.overrides),
        num_workers=a.num_workers, zero_stage=a.zero_stage, precision=a.precision, offload=a.offload,
        deepspeed_config=a.deepspeed_config, max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
        lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, lr_schedule=a.lr_schedule,
        min_lr_ratio=a.min_lr_ratio, grad_clip=a.grad_clip, ema_decay=a.ema_decay, ema_every=a.ema_every,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints, sample_every=a.sample_every,
        sample_prompts=tuple(x.strip() for x in a.sample_prompts.split(";") if x.strip()),
        sample_steps=a.sample_steps, cfg_scale=a.cfg_scale, log_every=a.log_every, shuffle_buffer=a.shuffle_buffer,
        seed=a.seed, autoencoder=a.autoencoder, text_encoder=a.text_encoder, use_gpu=a.use_gpu,
        cpus_per_worker=a.cpus_per_worker, threads_per_worker=a.threads_per_worker, max_failures=a.max_failures,
        nan_tolerance=a.nan_tolerance, storage_path=a.storage_path, name=a.name, resume=a.resume,
        mlflow_uri=a.mlflow_uri, experiment=a.experiment, register_model=a.register_model, num_cpus=a.num_cpus,
        object_store_mb=a.object_store_mb)


def main(argv=None) -> int:
    from pipeline.train_ldm import run_train
    run_train(options(parse(argv)))
    return 0


if __name__ == "__main__":
    run(main, "train")
