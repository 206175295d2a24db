#!/usr/bin/env python
"""Choose the EMA length after training (EDM2's post-hoc EMA, Karras et al. 2024 §3.2).

A run trained with --posthoc-ema kept two power-function EMA profiles and saved snapshots of them at every
checkpoint. This job rebuilds, by least squares over those snapshots, the EMA of each --sigma-rel asked for (a
relative std: 0.05 is a short average, 0.2 a long one) and writes one export per value (the run's final export with
its EMA weights replaced), usable by jobs/sample.py, jobs/evaluate.py, jobs/export.py and --init-from. With
--evaluate-input it scores each (FD / KID against held-out shards) and logs the curve to the training run.

  python jobs/posthoc_ema.py --run runs/ldm-demo-... --sigma-rel 0.03 0.05 0.08 0.12 0.2 --out posthoc/
  python jobs/posthoc_ema.py --run mlflow:RUN_ID --mlflow-uri http://127.0.0.1:5000 --sigma-rel 0.05 0.1 0.15 \\
      --out posthoc/ --evaluate-input data/shards/test --num-samples 500

Exit status: 0 written; 2 bad arguments or a run without snapshots; 5 storage or MLflow unreachable.
"""
import argparse

from _common import run, sigma_rel


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run: its Ray run dir (local or s3://; snapshots from "
                   "its kept checkpoints), or mlflow:RUN_ID / runs:/RUN_ID (snapshots from the run's posthoc_ema/ "
                   "artifacts, which checkpoint pruning does not remove)")
    p.add_argument("--sigma-rel", type=sigma_rel, nargs="+", required=True,
                   help="relative stds of the EMAs to rebuild, each in (0, 0.28), e.g. 0.05 0.1 0.15")
    p.add_argument("--out", required=True, help="folder for the exports: OUT/sigma_rel_S/model.safetensors")
    p.add_argument("--step", type=int, default=0, help="rebuild the EMA as of this snapshot's step (default: the last)")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI for mlflow:/runs:/ (default: "
                   "MLFLOW_TRACKING_URI)")
    e = p.add_argument_group("scoring each rebuilt EMA")
    e.add_argument("--evaluate-input", default="", help="held-out shards: score each export's samples (FD / KID, as "
                   "jobs/evaluate.py --model does) and, for an MLflow run, log the curve to it (posthoc/fd and "
                   "posthoc/kid over step = sigma_rel x 1000, posthoc_ema/curve.json)")
    e.add_argument("--num-samples", type=int, default=200, help="generated images per export")
    e.add_argument("--sample-steps", type=int, default=50, help="sampling steps (the model's own sampler)")
    e.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale")
    e.add_argument("--workers", type=int, default=0, help="generation workers (Ray Data actors); 0 = what Ray gives")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.common.tracking import credentials_to_env
    from pipeline.export.posthoc import PosthocOptions, evaluate_curve, write_exports
    a = parse(argv)
    o = PosthocOptions(run=a.run, sigma_rels=tuple(a.sigma_rel), out=a.out, step=a.step,
                       tracking_uri=credentials_to_env(a.mlflow_uri), evaluate_input=a.evaluate_input,
                       num_samples=a.num_samples, sample_steps=a.sample_steps, cfg_scale=a.cfg_scale,
                       workers=a.workers)
    exports = write_exports(o)
    if o.evaluate_input:
        rows = evaluate_curve(o, exports)
        best = min(rows, key=lambda r: r["fd"])
        print(f"[posthoc_ema] lowest FD at sigma_rel {best['sigma_rel']:g}: {best['export']}")
    return 0


if __name__ == "__main__":
    run(main, "posthoc_ema")
