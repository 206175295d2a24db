"""The whole paper end to end on one CPU machine (jobs/demo.py), for a task (pipeline/demo/tasks/):

  1 make Fashion-MNIST shards with captions   2 train the stage-1 autoencoder (KL, f=4) + held-out PSNR
  3 encode the latent cache                    4 train the task's LDM
  5 load the Fashion-MNIST judge               6 judge the LDM's samples (the task's judge), FD / KID vs held-out

Tasks run under one --out share the shards and the stage-1 run (a second task reuses them), and keep their own cache,
LDM run, MLflow experiment, registered model, grid and summary. Everything runs on an embedded local Ray and a local
MLflow store unless URIs are given.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.demo import stages
from pipeline.demo.task import DemoOptions, DemoSize, Task
from pipeline.demo.tasks import TASKS

SIZES = {
    # a wiring check of every stage (tests); its samples are not meant to be good
    "smoke": DemoSize(train_images=400, test_images=100, ae_steps=20, ldm_steps=20, samples_per_class=1,
                      eval_samples=16, ldm_batch_size=16),
    "quick": DemoSize(train_images=3000, test_images=500, ae_steps=240, ldm_steps=200, samples_per_class=5,
                      eval_samples=50),
    # stage 1 at batch 16 x 800 steps, the LDM at batch 64 x 400 steps (docs/measurements.md, the demo's recipe)
    "default": DemoSize(train_images=12000, test_images=2000, ae_steps=800, ldm_steps=400, samples_per_class=20,
                        eval_samples=50),
}

# each stage's share of the default demo's time (shards, stage 1, encode, LDM, judge, samples): the ETA weighs the
# stages by it instead of assuming they take equally long
STAGE_SHARES = (0.006, 0.284, 0.078, 0.570, 0.005, 0.057)


class Progress:
    def __init__(self, total: int, log, shares: tuple[float, ...] = STAGE_SHARES):
        self.total, self.log, self.t0, self.i, self.shares = total, log, time.time(), 0, shares

    def stage(self, title: str) -> None:
        self.i += 1
        el = time.time() - self.t0
        done = sum(self.shares[: self.i - 1])
        eta = f", ETA ~{max(1, round(el / done * (1 - done) / 60))} min" if self.i > 2 else ""
        self.log(f"\n{'=' * 78}\n[demo {self.i}/{self.total}] {title}   (elapsed {int(el) // 60}m{int(el) % 60:02d}s"
                 f"{eta})\n{'=' * 78}")


def run_demo(opts: DemoOptions, log=print) -> dict:
    from pipeline.common.runtime import init_ray
    from pipeline.evaluate.classifier import load_judge
    size, task = SIZES[opts.size], TASKS[opts.task]
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = opts.mlflow_uri or f"sqlite:///{out}/mlflow.db"
    prog, t0 = Progress(6, log), time.time()
    init_ray(opts.num_cpus or None, 512)

    prog.stage(f"Fashion-MNIST shards with captions: {size.train_images} train / {size.test_images} test images")
    stages.make_shards(out, size, opts.seed, log, task)
    prog.stage(f"stage 1: KL autoencoder, f=4, L2 reconstruction, {size.ae_steps} steps of 16 images (paper §3.1)")
    ae = stages.train_stage1(out, size, uri, opts.seed, log)
    prog.stage("encode the latent cache with the trained autoencoder" + (" + MiniLM tokens" if task.text else ""))
    enc = stages.encode_cache(out, ae["export"], uri, log, task, threads=opts.num_cpus or os.cpu_count() or 1)
    prog.stage(f"LDM: {task.title}, {task.ldm_steps(size)} steps")
    ldm = stages.train_ldm(out, size, uri, opts, log, task)
    prog.stage("the Fashion-MNIST judge (a classifier shipped with the code, the same on every machine)")
    clf, clf_acc = load_judge(log)
    prog.stage(task.judging(size, opts))
    judged = task.judge(ldm["export"], clf, size, opts, out)

    summary = {"task": opts.task, "stage1_psnr_db": round(ae["eval"]["psnr"], 2), "sample_fd": judged["fd"],
               "sample_kid": judged["kid"], "fd_name": judged["names"]["fd"], "fd_real_images": judged["num_real"],
               "classifier_test_accuracy": round(clf_acc, 4), "grid": judged["grid"], "mlflow_uri": uri,
               "ldm_export": ldm["export"], "autoencoder": ae["export"], "cache_rows": enc["kept"],
               "encode_seconds": enc["seconds"], "cache_mb": stages.cache_mb(out, task),
               "stage1_images": ae["eval"]["images"], "seconds": round(time.time() - t0, 1), "size": asdict(size),
               "ldm_steps": task.ldm_steps(size), "ldm_precision": task.precision(),
               **{k: judged[k] for k in task.figures}}
    track_summary(uri, ldm["mlflow_run_id"], summary, task)
    (out / f"summary{task.tag}.json").write_text(json.dumps(summary, indent=2))
    log(report(summary, task, uri))
    return summary


def task_list(spec: str) -> list[str]:
    """--task: one task, a comma-separated list, or `all` (every task, in the order of TASKS)."""
    names = list(TASKS) if spec.strip() == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"--task {spec!r}: {', '.join(bad) or 'no task'} is not a task; give one or more of "
                         f"{', '.join(TASKS)} (comma-separated), or all")
    return list(dict.fromkeys(names))


def run_tasks(opts: DemoOptions, tasks: list[str], log=print) -> list[dict]:
    """Several tasks in one process under one --out: one embedded Ray, and the shards and stage 1 the first task makes
    are reused by the next; ends with one line per task, its figure next to its baseline."""
    summaries = [run_demo(replace(opts, task=t), log) for t in tasks]
    if len(summaries) > 1:
        log(headlines(summaries))
    return summaries


def headlines(summaries: list[dict]) -> str:
    rows = [(s["task"], *TASKS[s["task"]].headline(s), f"{int(s['seconds']) // 60}m{int(s['seconds']) % 60:02d}s")
            for s in summaries]
    head = ("task", "figure", "baseline", "time")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join([f"\n{'=' * 78}", f" ldm-ray demo: {len(rows)} tasks under one --out", *lines, "=" * 78])


def track_summary(uri: str, run_id: str, s: dict, task: Task) -> None:
    """The task's figures as demo/ metrics of its LDM run, and its grids as artifacts."""
    import mlflow
    client = mlflow.MlflowClient(uri)
    now = int(time.time() * 1000)
    fd = s["fd_name"]
    figures = {"classifier_test_accuracy": s["classifier_test_accuracy"], "stage1_psnr": s["stage1_psnr_db"],
               f"sample_{fd}": s["sample_fd"]}
    for key in task.metrics:  # a key naming "FD" is logged under the FD's own name (e.g. untrained_FD-EffNetLite0)
        value = s[key.replace("FD", "fd")]
        figures[key.replace("FD", fd)] = value
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"demo/{k}", v, now, 0) for k, v in figures.items()])
    for key in ("grid", "grid_4x"):
        if key in s:
            client.log_artifact(run_id, s[key], "demo")


def report(s: dict, task: Task, uri: str) -> str:
    secs = int(s["seconds"])
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"
          if uri.startswith("sqlite") else f"open {uri}")
    samples, grid = task.report(s)
    return f"""
{'=' * 78}
 ldm-ray demo ({s['task']}) finished in {secs // 60}m{secs % 60:02d}s
   stage-1 autoencoder: PSNR {s['stage1_psnr_db']:.1f} dB on {s['stage1_images']} held-out Fashion-MNIST images
   classifier: test accuracy {100 * s['classifier_test_accuracy']:.1f}% on the real 10k test split
   samples: {samples}
   {grid}
   MLflow: {ui}
{'=' * 78}"""
