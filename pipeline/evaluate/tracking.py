"""An evaluation in MLflow: a run filed under the model's training run (a child run in its experiment, so the UI
shows it beneath the run that trained the model), or in a stand-alone experiment when that run is not at this
tracking URI. Every sweep point is a metric, the first point also under the plain names; the table, the plot
and the JSON are artifacts."""
from __future__ import annotations

import json
import os
import tempfile
import time


def _training_run(client, run_id: str):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # noqa: BLE001 - another tracking server, or the run was deleted: file it stand-alone
        return None


def _filed(client, uri: str, experiment: str, model_run_id: str) -> tuple[str, str, dict]:
    """(experiment id, where in words, tags) of an evaluation run: a child of the model's training run where that run
    is at this tracking URI, else a stand-alone run in `experiment`."""
    from pipeline.common.tracking import ensure_experiment
    parent = _training_run(client, model_run_id)
    if parent is not None:
        return (parent.info.experiment_id, f"under training run {parent.info.run_id}",
                {"mlflow.parentRunId": parent.info.run_id, "ldm_ray.evaluates_run": parent.info.run_id})
    return ensure_experiment(uri, experiment), f"experiment {experiment}", {}


def point_key(name: str, row: dict) -> str:
    return f"{name}/cfg{row['cfg_scale']:g}_steps{row['steps']}"


def log_model_eval(uri: str, experiment: str, r: dict, plot_png: str) -> tuple[str, str]:
    import mlflow
    client = mlflow.MlflowClient(uri)
    exp_id, where, tags = _filed(client, uri, experiment, r.get("model_run_id", ""))
    run = client.create_run(exp_id, run_name=f"evaluate {os.path.basename(r['model'])}",
                            tags={**tags, "ldm_ray.kind": "evaluate"})
    rid = run.info.run_id
    n = r["names"]
    params = {"model": r["model"], "input": r["input"], "feature_net": r["feature_net"], "sampler": r["sampler"],
              "num_samples": r["num_samples"], "seed": r["seed"], "conditioning": r["conditioning"],
              "cfg_scales": ",".join(f"{x['cfg_scale']:g}" for x in r["rows"]),
              "steps": ",".join(str(x["steps"]) for x in r["rows"])}
    metrics = {}
    for row in r["rows"]:
        for key, name in (("fd", n["fd"]), ("kid", n["kid"]), ("is", n["is"]), ("precision", "precision"),
                          ("recall", "recall"), ("agreement", "agreement"), ("clip_score", "clip_score"),
                          ("clip_score_x100", "clip_score_x100")):
            if key in row:
                metrics[point_key(name, row)] = row[key]
                metrics.setdefault(name, row[key])  # the first point under the plain name
    for row in r.get("baselines", []):
        for key, name in (("fd", n["fd"]), ("kid", n["kid"]), ("agreement", "agreement")):
            if key in row:
                metrics[f"{name}/baseline_{row['baseline']}"] = row[key]
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                     params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "evaluate.json")
        with open(path, "w") as f:
            json.dump(r, f, indent=2)
        client.log_artifact(rid, path, "evaluate")
        client.log_table(rid, {k: [row.get(k) for row in r["rows"]]
                               for k in ("cfg_scale", "steps", "fd", "kid", "is", "precision", "recall", "agreement",
                                         "clip_score", "clip_score_x100")
                               if k in r["rows"][0]}, "evaluate/table.json")
    client.log_artifact(rid, plot_png, "evaluate")
    client.set_terminated(rid)
    return rid, where


def log_mlperf(uri: str, experiment: str, r: dict) -> tuple[str, str]:
    """The MLPerf protocol's figures as a run of their own, filed under the model's training run where it is here."""
    import mlflow
    client = mlflow.MlflowClient(uri)
    exp_id, where, tags = _filed(client, uri, experiment, r.get("model_run_id", ""))
    run = client.create_run(exp_id, run_name=f"mlperf {os.path.basename(r['model'])}",
                            tags={**tags, "ldm_ray.kind": "evaluate", "ldm_ray.protocol": "mlperf"})
    rid, ts = run.info.run_id, int(time.time() * 1000)
    params = {k: r[k] for k in ("model", "captions", "seed", "sampler", "steps", "cfg_scale", "num_samples",
                                "clip_model")}
    metrics = {k: float(r[k]) for k in ("fid", "clip_score", "clip_score_x100")}
    metrics["meets_target"] = float(r["meets_target"])
    client.log_batch(rid, metrics=[mlflow.entities.Metric(f"mlperf/{k}", v, ts, 0) for k, v in metrics.items()],
                     params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    client.log_dict(rid, r, "evaluate/mlperf.json")
    client.set_terminated(rid)
    return rid, where
