#!/usr/bin/env python
"""Evaluate a trained model on held-out shards.

--model EXPORT: sample quality of an LDM (paper §4). Generates --num-samples images with fixed seeds from the
  held-out records' own conditioning (captions, class labels, or none) and scores them against those records'
  real images: Fréchet distance, KID, Inception Score, precision/recall on the features of the offline ImageNet
  EfficientNet-Lite0 (named FD-EffNetLite0, ...: comparable between runs, not with papers' FID), or real FID/KID/IS
  with --inception-weights. On Fashion-MNIST it also reports the in-project classifier's agreement with the
  prompted class. --cfg-scales and --steps sweep guidance and sampling steps: a table, a plot, MLflow metrics
  (a run filed under the model's training run) and --json.
--autoencoder EXPORT: the first stage's reconstructions: PSNR, SSIM, FD-EffNetLite0 and, for VQ, codebook usage.

  python jobs/evaluate.py --model runs/ldm/.../export/model.safetensors --input data/shards/test \\
      --num-samples 500 --cfg-scales 1,2,4,8 --steps 10,25,50 --json eval.json --mlflow-uri http://127.0.0.1:5000
  python jobs/evaluate.py --autoencoder mlflow-models:/ae-demo-kl-f4/1 --input s3://b/shards/test
"""
import argparse
import json
import os

from _common import run

from ldm.sampling import SAMPLERS


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="LDM export to score: model.safetensors, s3://..., mlflow-models:/NAME/VERSION")
    what.add_argument("--autoencoder", help="first stage to score: ldm-ray safetensors, mlflow-models:/NAME/VERSION, "
                      "s3://, a diffusers vae/ folder, or random:PRESET (a baseline)")
    p.add_argument("--input", default="", help="held-out shards (folder, glob or list; local or s3://); required but "
                   "with --protocol mlperf")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass / prompts per sampling batch")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--mlflow-uri", default="", help="log the figures to MLflow")
    p.add_argument("--experiment", default="evaluate",
                   help="MLflow experiment (--model: used only when the model's training run is not found there)")
    m = p.add_argument_group("--model: samples")
    m.add_argument("--num-samples", type=int, default=None, help="generated images per point (the first N held-out "
                   "records give their conditioning and their real images; default 500, --protocol mlperf 30000)")
    m.add_argument("--cfg-scales", type=_floats, default=None, help="guidance scales to sweep, e.g. 1,2,4,8 (default "
                   "4; --protocol mlperf: one scale, default 8)")
    m.add_argument("--steps", type=_ints, default=(50,), help="sampling steps to sweep, e.g. 10,25,50")
    m.add_argument("--sampler", choices=["auto", *sorted(SAMPLERS)], default="auto",
                   help="sampler (ldm.sampling.SAMPLERS); auto: the model's own, ddim for the ddpm objective, euler "
                        "for flow (heun: flow's second-order sampler)")
    m.add_argument("--seed", type=int, default=None, help="image i starts from the noise of seed + i (default 0); "
                   "--protocol mlperf: the caption subset's seed (default 2023, MLPerf's), image i from noise seed i")
    m.add_argument("--workers", type=int, default=0, help="generation workers (Ray Data actors); 0 = as many as "
                   "Ray's CPUs / --cpus-per-worker, 1 = in this process")
    m.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker")
    m.add_argument("--inception-weights", default="", help="TorchScript Inception-v3 of StyleGAN3/clean-fid "
                   "(inception-2015-12-05.pt) for real FID/KID/IS; nothing is downloaded")
    m.add_argument("--clip-model", default="", help="a local CLIP model: a folder in transformers' format (CLIPModel + "
                   "CLIPProcessor files) or an OpenCLIP checkpoint file (open_clip_pytorch_model.bin or .safetensors, "
                   "its tokenizer files and optional open_clip_config.json beside it); nothing is downloaded. Adds "
                   "the CLIP score of each image against its held-out caption, raw cosine (clip_score, MLPerf's "
                   "figure) and max(100 x cosine, 0) "
                   "(clip_score_x100, torchmetrics' and most papers')")
    m.add_argument("--text-encoder", default="", help="frozen text encoder folder (default: the export's own)")
    m.add_argument("--first-stage", default="", help="first stage to decode with (default: the export's own)")
    m.add_argument("--no-agreement", action="store_true", help="skip the Fashion-MNIST classifier agreement")
    m.add_argument("--baselines", action="store_true", help="also score uniform noise images and the untrained model "
                   "(the export's config, fresh weights) at the first sweep point: what the model must beat")
    m.add_argument("--plot", default="", help="trade-off plot PNG (default: beside --json, else evaluate.png)")
    ml = p.add_argument_group("--model --protocol mlperf: the MLPerf Training text-to-image evaluation")
    ml.add_argument("--protocol", choices=["mlperf"], default="",
                    help="mlperf: the caption subset chosen with --seed (default 2023) from --captions, DDIM 50 steps "
                    "(--steps), guidance 8 (--cfg-scales), FID against --fid-stats with --inception-weights and the "
                    "raw CLIP score with --clip-model; target FID <= 90 and CLIP >= 0.15. --num-samples (default "
                    "30000) runs it smaller; each missing file is named with where it comes from")
    ml.add_argument("--captions", default="", help="COCO-2014 annotations/captions_val2014.json (one caption per "
                    "image, a seeded subset) or MLPerf's val2014_30k.tsv (its first --num-samples rows)")
    ml.add_argument("--fid-stats", default="", help="the reference statistics: an .npz with mu and sigma of the "
                    "real images' Inception pool features (MLPerf's val2014_30k_stats.npz)")
    a = p.add_argument_group("--autoencoder: reconstructions")
    a.add_argument("--autoencoder-preset", default="", help="config preset for a CompVis .ckpt")
    a.add_argument("--resolution", type=int, default=0, help="image size (default: the autoencoder's resolution)")
    a.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0 = all)")
    a.add_argument("--no-fd", action="store_true", help="skip the FD-EffNetLite0 metric")
    args = p.parse_args(argv)
    if not args.input and not (args.model and args.protocol):
        p.error("--input is required (held-out shards), except for --model with --protocol mlperf")
    mlperf = bool(args.protocol)  # the protocol's own defaults where a flag was not given
    for name, ours, theirs in (("num_samples", 500, 30000), ("cfg_scales", (4.0,), (8.0,)), ("seed", 0, 2023)):
        if getattr(args, name) is None:
            setattr(args, name, theirs if mlperf else ours)
    if mlperf and (len(args.cfg_scales) > 1 or len(args.steps) > 1):
        p.error("--protocol mlperf evaluates one point: give one --cfg-scales and one --steps value")
    return args


def main(argv=None) -> int:
    from pipeline.common.runtime import init_ray
    from pipeline.common.tracking import credentials_to_env
    a = parse(argv)
    a.mlflow_uri = credentials_to_env(a.mlflow_uri)
    init_ray()
    if a.protocol:
        return evaluate_mlperf(a)
    return evaluate_model(a) if a.model else evaluate_autoencoder(a)


def evaluate_mlperf(a) -> int:
    from pipeline.common.storage import write_json_atomic
    from pipeline.evaluate.mlperf import MLPerfOptions, evaluate_mlperf
    from pipeline.evaluate.tracking import log_mlperf
    o = MLPerfOptions(model=a.model, captions=a.captions, inception_weights=a.inception_weights,
                      clip_model=a.clip_model, fid_stats=a.fid_stats, num_samples=a.num_samples, seed=a.seed,
                      steps=a.steps[0], cfg_scale=a.cfg_scales[0], sampler=a.sampler,
                      batch_size=a.batch_size, workers=a.workers, cpus_per_worker=a.cpus_per_worker,
                      tracking_uri=a.mlflow_uri)
    r = evaluate_mlperf(o)
    verdict = "meets" if r["meets_target"] else "misses"
    print(f"[evaluate] MLPerf: FID {r['fid']:.2f}, CLIP score {r['clip_score']:.4f} (x100: "
          f"{r['clip_score_x100']:.2f}) on {r['num_samples']} samples: {verdict} the target (FID <= 90, CLIP >= 0.15)")
    if a.json:
        write_json_atomic(a.json, r)
        print(f"[evaluate] figures: {a.json}")
    if a.mlflow_uri:
        run_id, where = log_mlperf(a.mlflow_uri, a.experiment, r)
        print(f"[evaluate] MLflow run {run_id} ({where})")
    return 0


def evaluate_model(a) -> int:
    from pipeline.common.storage import write_json_atomic
    from pipeline.evaluate.model_eval import ModelEvalOptions, evaluate_model, format_table, plot
    from pipeline.evaluate.tracking import log_model_eval
    o = ModelEvalOptions(model=a.model, input=a.input, num_samples=a.num_samples, cfg_scales=a.cfg_scales,
                         steps=a.steps, sampler=a.sampler, seed=a.seed, batch_size=a.batch_size, workers=a.workers,
                         cpus_per_worker=a.cpus_per_worker, inception_weights=a.inception_weights,
                         autoencoder=a.first_stage, text_encoder=a.text_encoder, agreement=not a.no_agreement,
                         baselines=a.baselines, clip_model=a.clip_model, tracking_uri=a.mlflow_uri)
    r = evaluate_model(o)
    print(format_table(r))
    png = plot(r, a.plot or (os.path.splitext(a.json)[0] + ".png" if a.json else "evaluate.png"))
    print(f"[evaluate] plot: {png}")
    if a.json:
        write_json_atomic(a.json, r)
        print(f"[evaluate] figures: {a.json}")
    if a.mlflow_uri:
        run_id, where = log_model_eval(a.mlflow_uri, a.experiment, r, png)
        print(f"[evaluate] MLflow run {run_id} ({where})")
    return 0


def evaluate_autoencoder(a) -> int:
    from pipeline.common.models import load_autoencoder
    from pipeline.evaluate.metrics import evaluate_autoencoder, format_eval, shard_image_batches
    ae = load_autoencoder(a.autoencoder, a.autoencoder_preset)
    res = a.resolution or ae.cfg.resolution
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
