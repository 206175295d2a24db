#!/usr/bin/env python
"""The objective study at the demo's size: the paper's eps-prediction, v-prediction and rectified flow (logit-normal
t, Esser et al. 2024), trained on the demo's class task with the same budget (its steps, batch, learning rate, EMA)
and sampled with the same budget (--sample-steps model evaluations per image: DDIM for eps and v, Euler for flow),
for each seed; FD / KID of the samples against the held-out images and the judge's agreement with the requested
class, side by side. Then the post-hoc EMA curve of one run: every run keeps EDM2's two power-function profiles
(--posthoc-ema), and that run's EMA is rebuilt at each --sigma-rels value and judged the same way.

Shards, stage 1 and the latent cache are the demo's (shared under --out, reused when there). Everything is logged
to one MLflow parent run ("objective study") with a child run per variant.

  python bench/objective_study.py                       # default size, seeds 0 and 1 (about 1 h on 2 cores)
  python bench/objective_study.py --size quick --seeds 0  # a few minutes a variant, rough samples
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from matched import add_tiny, figures, tiny  # noqa: E402

OBJECTIVES = {"eps": (), "v": ("diffusion.parameterization=v",),
              "flow": ("diffusion.objective=flow", "diffusion.timestep_sampling=logit_normal")}


def _list(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="shards, stage 1, cache, runs and the MLflow store (default study-out; "
                    "--tiny: a temporary folder, removed at the end)")
    ap.add_argument("--size", default="default", choices=["smoke", "quick", "default"], help="the demo's size")
    ap.add_argument("--seeds", type=_list(int), default=(0, 1), help="seeds of weights, data order and noise")
    ap.add_argument("--objectives", type=_list(str), default=tuple(OBJECTIVES), help="of " + ", ".join(OBJECTIVES))
    ap.add_argument("--sample-steps", type=int, default=25, help="model evaluations per sample, every objective")
    ap.add_argument("--cfg-scale", type=float, default=8.0, help="guidance of the judged samples (the demo's)")
    ap.add_argument("--posthoc-of", default="flow", help="the objective whose first seed's run gets the EMA curve")
    ap.add_argument("--sigma-rels", type=_list(float), default=(0.03, 0.05, 0.08, 0.12, 0.18),
                    help="the post-hoc EMA lengths to rebuild and judge")
    ap.add_argument("--snapshots", type=int, default=8, help="post-hoc EMA snapshots over a run")
    add_tiny(ap)
    return tiny(ap.parse_args(argv), size="smoke", seeds=(0,), objectives=("eps", "flow"), sigma_rels=(0.05, 0.15),
                snapshots=2, sample_steps=4)


def shared_data(a, out: Path, uri: str, log) -> None:
    """The demo's shards, stage 1 and class cache (each reused when already under --out)."""
    from pipeline.demo import stages
    from pipeline.demo.run import SIZES
    from pipeline.demo.tasks import TASKS
    size, task = SIZES[a.size], TASKS["class"]
    stages.make_shards(out, size, 0, log, task)
    ae = stages.train_stage1(out, size, uri, 0, log)
    stages.encode_cache(out, ae["export"], uri, log, task, threads=os.cpu_count() or 1)


def variant(a, out: Path, uri: str, objective: str, seed: int, clf, log) -> dict:
    """One objective at one seed: trained as the demo trains its class task, judged as the demo judges it."""
    from pipeline.demo import stages
    from pipeline.demo.run import SIZES
    from pipeline.demo.task import DemoOptions
    from pipeline.demo.tasks import TASKS
    size, task = SIZES[a.size], TASKS["class"]
    opts = DemoOptions(out=str(out), size=a.size, seed=seed, cfg_scale=a.cfg_scale, sample_steps=a.sample_steps,
                       task="class")
    steps = task.ldm_steps(size)
    t0 = time.time()
    run = stages.train_ldm(out, size, uri, opts, log, task, overrides=OBJECTIVES[objective],
                           name=f"study-{objective}-s{seed}", experiment="objective-study-runs", register_model="",
                           eval_every=0, sample_every=0, posthoc_ema=(0.05, 0.10),
                           checkpoint_every=max(1, steps // a.snapshots))
    judged = task.judge(run["export"], clf, size, opts, out)
    shutil.copy(judged["grid"], out / f"grid-{objective}-s{seed}.png")
    row = {"objective": objective, "seed": seed, "fd": judged["fd"], "kid": judged["kid"],
           "agreement": judged["prompt_class_agreement"], "fd_name": judged["names"]["fd"],
           "run_id": run["mlflow_run_id"], "export": run["export"], "steps": steps,
           "seconds": round(time.time() - t0, 1)}
    log(f"[study] {objective} seed {seed}: {row['fd_name']} {row['fd']:.1f}, KID {row['kid']:.4f}, agreement "
        f"{row['agreement']:.1%} ({row['seconds']:.0f} s)")
    with open(out / "study-rows.jsonl", "a") as f:  # each variant as it finishes: a long study's partial table
        f.write(json.dumps(row) + "\n")
    return row


def posthoc_curve(a, out: Path, uri: str, row: dict, clf, log) -> list[dict]:
    """The EMA of `row`'s run rebuilt at each sigma_rel (jobs/posthoc_ema.py's path), each judged like the runs."""
    from pipeline.demo.run import SIZES
    from pipeline.demo.task import DemoOptions
    from pipeline.demo.tasks import TASKS
    from pipeline.export.posthoc import PosthocOptions, write_exports
    task, size = TASKS["class"], SIZES[a.size]
    opts = DemoOptions(out=str(out), size=a.size, seed=row["seed"], cfg_scale=a.cfg_scale,
                       sample_steps=a.sample_steps, task="class")
    exports = write_exports(PosthocOptions(run=f"mlflow:{row['run_id']}", sigma_rels=a.sigma_rels,
                                           out=str(out / "posthoc"), tracking_uri=uri), log)
    curve = []
    for sigma, path in exports:
        judged = task.judge(path, clf, size, opts, out)
        shutil.copy(judged["grid"], out / f"grid-posthoc-{sigma:g}.png")
        curve.append({"sigma_rel": sigma, "fd": judged["fd"], "kid": judged["kid"],
                      "agreement": judged["prompt_class_agreement"]})
    return curve


def log_study(uri: str, rows: list[dict], curve: list[dict], a) -> str:
    """A parent run with the table and the curve, a child run per variant."""
    import mlflow

    from pipeline.common.tracking import ensure_experiment
    client = mlflow.MlflowClient(uri)
    exp = ensure_experiment(uri, "objective-study")
    parent = client.create_run(exp, run_name="objective study", tags={"ldm_ray.kind": "study"}).info.run_id
    for k, v in {"size": a.size, "seeds": a.seeds, "objectives": a.objectives, "sample_steps": a.sample_steps,
                 "cfg_scale": a.cfg_scale}.items():
        client.log_param(parent, k, str(v))
    for r in rows:
        child = client.create_run(exp, run_name=f"{r['objective']} seed {r['seed']}",
                                  tags={"mlflow.parentRunId": parent, "ldm_ray.training_run": r["run_id"]}).info.run_id
        client.log_param(child, "objective", r["objective"])
        client.log_param(child, "seed", r["seed"])
        for k in ("fd", "kid", "agreement"):
            client.log_metric(child, k, r[k])
        client.set_terminated(child)
    for c in curve:
        for k in ("fd", "kid", "agreement"):
            client.log_metric(parent, f"posthoc/{k}", c[k], step=int(round(c["sigma_rel"] * 1000)))
    client.log_dict(parent, {"rows": rows, "posthoc": curve}, "study.json")
    client.set_terminated(parent)
    return parent


def main(argv=None) -> int:
    from pipeline.common.runtime import init_ray
    from pipeline.evaluate.classifier import load_judge
    a = parse(argv)
    scratch = a.tiny and not a.out  # CI's size leaves nothing behind (a run's checkpoints are hundreds of MB)
    out = Path(tempfile.mkdtemp(prefix="objective-study-") if scratch else a.out or "study-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    log = print
    init_ray(None, 512)
    shared_data(a, out, uri, log)
    clf, _ = load_judge(log)
    rows = [variant(a, out, uri, o, s, clf, log) for o in a.objectives for s in a.seeds]
    first = next((r for r in rows if r["objective"] == a.posthoc_of), rows[0])
    curve = posthoc_curve(a, out, uri, first, clf, log) if a.sigma_rels else []
    parent = log_study(uri, rows, curve, a)
    name = rows[0]["fd_name"]
    print(f"\n| objective | seed | {name} | KID | agreement | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['seed']} | {r['fd']:.1f} | {r['kid']:.4f} | {r['agreement']:.1%} | "
              f"{r['seconds']:.0f} |")
    if curve:
        print(f"\npost-hoc EMA of {first['objective']} seed {first['seed']}:\n| sigma_rel | {name} | agreement |\n"
              "|---|---|---|")
        for c in curve:
            print(f"| {c['sigma_rel']:g} | {c['fd']:.1f} | {c['agreement']:.1%} |")
    (out / "study.json").write_text(json.dumps({"rows": rows, "posthoc": curve, "mlflow_parent": parent}, indent=2))
    if scratch:
        shutil.rmtree(out, ignore_errors=True)
    mean = {o: {k: statistics.mean(r[k] for r in rows if r["objective"] == o) for k in ("fd", "agreement")}
            for o in a.objectives}
    figures(**{f"fd_{o}": m["fd"] for o, m in mean.items()}, **{f"agreement_{o}": m["agreement"]
                                                                 for o, m in mean.items()},
            **({"posthoc_best_sigma_rel": min(curve, key=lambda c: c["fd"])["sigma_rel"]} if curve else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
