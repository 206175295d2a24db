#!/usr/bin/env python
"""Train the first-stage autoencoder (paper §3.1): KL- or VQ-regularised, any f, on img2dataset shards,
with Ray Train (DDP across workers), evaluated on held-out shards and tracked in MLflow.

  python jobs/train_autoencoder.py --input data/shards/train --preset demo --reg kl --f 4 --max-steps 4000 \\
      --mlflow-uri sqlite:///mlruns/mlflow.db
  python jobs/train_autoencoder.py --input data/shards/train --preset demo --compare-f 2,4,8   # paper §4.1

The result (export/autoencoder.safetensors in the last checkpoint, the MLflow `model` artifact and a
registered model version) is what `jobs/encode_latents.py --autoencoder` takes.

Exit status: 0 trained; 2 bad arguments or config; 4 training failed.
"""
import argparse

from _common import run

from pipeline.train_autoencoder import AETrainOptions


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. autoencoder.ch=64 loss.disc_start=2000)")
    p.add_argument("--input", required=True, help="training shards: folder, glob or list file (local or s3://)")
    p.add_argument("--eval-input", default="", help="held-out shards for PSNR/SSIM/FD (default: the sibling test/ "
                   "folder of a .../train input)")
    p.add_argument("--preset", default="demo", help="config preset whose autoencoder/loss sections are used")
    p.add_argument("--config", default="", help="YAML config applied on top of the preset")
    p.add_argument("--reg", choices=["kl", "vq"], default="", help="regularisation (default: the preset's)")
    p.add_argument("--f", type=int, default=0, help="downsampling factor, a power of two (default: the preset's)")
    p.add_argument("--compare-f", default="", help="comma-separated f values: train one model per f and report "
                   "PSNR vs latent size (paper §4.1) as an MLflow parent run with child runs")
    t = p.add_argument_group("optimisation")
    t.add_argument("--max-steps", type=int, default=2000, help="generator steps")
    t.add_argument("--batch-size", type=int, default=32, help="images per worker per step")
    t.add_argument("--lr", type=float, default=4.5e-6 * 32, help="Adam learning rate (betas 0.5, 0.9)")
    t.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="cosine",
                   help="LR after warm-up, for the generator and the discriminator")
    t.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up steps")
    t.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR / peak LR for cosine and linear")
    t.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights for the export (0 = off)")
    t.add_argument("--shuffle-buffer", type=int, default=2000, help="local shuffle buffer (images) per worker")
    t.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    s = p.add_argument_group("distribution")
    s.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP)")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    s.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker (0 = auto)")
    s.add_argument("--threads-per-worker", type=int, default=0, help="torch threads per worker (0 = auto)")
    s.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    s.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded local Ray (0 = all)")
    s.add_argument("--object-store-mb", type=int, default=512, help="object store of the embedded local Ray")
    c = p.add_argument_group("checkpoints and tracking")
    c.add_argument("--storage-path", default="runs", help="Ray Train storage for run dirs and checkpoints")
    c.add_argument("--name", default="", help="run name; reuse it (or --resume RUN_DIR) to continue")
    c.add_argument("--resume", default="", help="a run dir, a Ray checkpoint dir, or mlflow:RUN_ID")
    c.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps")
    c.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept")
    c.add_argument("--sample-every", type=int, default=500, help="input|reconstruction grid every M steps (0 = off)")
    c.add_argument("--log-every", type=int, default=50, help="status line every N steps")
    c.add_argument("--mlflow-uri", default="", help="MLflow tracking URI (http://host:port or sqlite:///path)")
    c.add_argument("--experiment", default="train_autoencoder", help="MLflow experiment")
    c.add_argument("--register-model", default="", help="registered model name (default ae-PRESET-REG-fF)")
    c.add_argument("--eval-max-images", type=int, default=2000, help="held-out images evaluated (0 = all)")
    c.add_argument("--no-fd", action="store_true", help="skip the FD-EffNetLite0 metric (faster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.train_autoencoder import run_compare_f, run_train_autoencoder
    a = parse(argv)
    opts = AETrainOptions(
        input=a.input, eval_input=a.eval_input, preset=a.preset, config_yaml=a.config, overrides=tuple(a.overrides),
        reg=a.reg, f=a.f, num_workers=a.num_workers, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
        lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio,
        ema_decay=a.ema_decay, checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
        sample_every=a.sample_every, log_every=a.log_every, shuffle_buffer=a.shuffle_buffer, seed=a.seed,
        use_gpu=a.use_gpu, cpus_per_worker=a.cpus_per_worker, threads_per_worker=a.threads_per_worker,
        max_failures=a.max_failures, storage_path=a.storage_path, name=a.name, resume=a.resume,
        mlflow_uri=a.mlflow_uri, experiment=a.experiment, register_model=a.register_model,
        eval_max_images=a.eval_max_images, eval_fd=not a.no_fd, num_cpus=a.num_cpus, object_store_mb=a.object_store_mb)
    if a.compare_f:
        run_compare_f(opts, [int(x) for x in a.compare_f.split(",") if x.strip()])
    else:
        run_train_autoencoder(opts)
    return 0


if __name__ == "__main__":
    run(main, "stage1")
