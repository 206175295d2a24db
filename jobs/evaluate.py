#!/usr/bin/env python
"""Evaluate a first-stage autoencoder on held-out shards: PSNR, SSIM, FD-EffNetLite0 (a Fréchet distance of
ImageNet EfficientNet-Lite0 features of reconstructions vs inputs; not FID) and, for VQ, codebook usage.

  python jobs/evaluate.py --autoencoder runs/ae-demo/.../export/autoencoder.safetensors --input data/shards/test
  python jobs/evaluate.py --autoencoder mlflow-models:/ae-demo-kl-f4/1 --input s3://b/shards/test --resolution 32
"""
import argparse
import json

from _common import run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, help="ldm-ray safetensors, mlflow-models:/NAME/VERSION, s3://, "
                   "a diffusers vae/ folder, or random:PRESET (a baseline)")
    p.add_argument("--autoencoder-preset", default="", help="config preset for a CompVis .ckpt")
    p.add_argument("--input", required=True, help="held-out shards (folder, glob or list; local or s3://)")
    p.add_argument("--resolution", type=int, default=0, help="image size (default: the autoencoder's resolution)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--no-fd", action="store_true", help="skip the FD-EffNetLite0 metric")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--mlflow-uri", default="", help="log the metrics to MLflow")
    p.add_argument("--experiment", default="evaluate", help="MLflow experiment")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.evaluate.metrics import evaluate_autoencoder, format_eval, shard_image_batches
    from pipeline.common.models import load_autoencoder
    from pipeline.common.runtime import init_ray
    from pipeline.common.tracking import credentials_to_env
    a = parse(argv)
    a.mlflow_uri = credentials_to_env(a.mlflow_uri)
    ae = load_autoencoder(a.autoencoder, a.autoencoder_preset)
    res = a.resolution or ae.cfg.resolution
    init_ray()
    r = evaluate_autoencoder(ae.model, shard_image_batches(a.input, res, a.batch_size), fd=not a.no_fd,
                             max_images=a.max_images)
    print(format_eval(a.autoencoder, r))
    if a.json:
        from pipeline.common.storage import write_json_atomic
        write_json_atomic(a.json, {"autoencoder": a.autoencoder, "input": a.input, **r})
    if a.mlflow_uri:
        from pipeline.common.tracking import mlflow_run
        with mlflow_run(a.mlflow_uri, a.experiment, run_name=f"eval {a.autoencoder}"):
            import mlflow
            mlflow.log_params({"autoencoder": a.autoencoder, "input": a.input, "resolution": res})
            mlflow.log_metrics({k: float(v) for k, v in r.items()})
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    run(main, "eval")
