"""Post-hoc EMA after training (EDM2 §3.2): a run trained with --posthoc-ema saved snapshots of its power-function EMA
profiles at every checkpoint (into the checkpoint and the MLflow run's posthoc_ema/). Here they are found, the EMA of
each wanted sigma_rel rebuilt by least squares (ldm/posthoc_ema.py), and written as an export each (the run's final
export with its EMA weights replaced); optionally each is scored and the curve logged to the training run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ldm.posthoc_ema import combine, solve_weights
from pipeline.common import storage


@dataclass(frozen=True)
class PosthocOptions:
    run: str                                 # a Ray run dir (local or s3://), or runs:/ID or mlflow:ID
    sigma_rels: tuple[float, ...]
    out: str                                 # one export per sigma_rel under it: sigma_rel_{s}/model.safetensors
    step: int = 0                            # rebuild the EMA as of this snapshot's step (0 = the last)
    tracking_uri: str = ""
    evaluate_input: str = ""                 # held-out shards: score each export (FD/KID) and log the curve
    num_samples: int = 200
    sample_steps: int = 50
    cfg_scale: float = 4.0
    workers: int = 0


def _mlflow_run_id(run: str) -> str | None:
    for prefix in ("runs:/", "mlflow:"):
        if run.startswith(prefix):
            return run[len(prefix):].strip("/").split("/")[0]
    return None


def snapshot_files(o: PosthocOptions) -> tuple[list[str], str]:
    """(the snapshot files, local; the run's final export, local) of an MLflow run or a run dir."""
    from pipeline.common.models import local_file
    from pipeline.export.formats import export_file
    run_id = _mlflow_run_id(o.run)
    if run_id:
        import mlflow
        client = mlflow.MlflowClient(o.tracking_uri or None)
        names = [a.path for a in client.list_artifacts(run_id, "posthoc_ema") if a.path.endswith(".safetensors")]
        files = [client.download_artifacts(run_id, n) for n in names]
        return files, local_file(f"runs:/{run_id}/model", o.tracking_uri)
    from pipeline.train.checkpoints import list_checkpoints
    found = {}
    for ckpt in list_checkpoints(o.run):  # newest first: a step written twice (a resumed run) counts once, newest
        fs, path = storage.fs_and_path(ckpt)
        for name in fs.ls(path, detail=False):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("posthoc_ema_step") and base.endswith(".safetensors"):
                found.setdefault(base, storage.unstrip(fs, name, ckpt))
    return [local_file(found[k]) for k in sorted(found)], export_file(o.run, o.tracking_uri)


def snapshot_index(files: list[str]) -> list[tuple[str, int, float, int]]:
    """(file, step, sigma_rel, EMA updates) of every profile in the snapshot files, from their headers only."""
    from safetensors import safe_open
    index = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "updates" not in meta:
            raise ValueError(f"{path} is not a post-hoc EMA snapshot (no 'updates' metadata): a run writes them with "
                             f"--posthoc-ema")
        index += [(path, int(meta["step"]), float(s), int(n)) for s, n in json.loads(meta["updates"]).items()]
    return index


def rebuild(index: list[tuple[str, int, float, int]], sigma_rels: tuple[float, ...], t_out: int) -> list[dict]:
    """The EMA of each sigma_rel at update t_out: the least-squares weights from the index (ldm/posthoc_ema.py), the
    snapshots read one at a time."""
    from safetensors import safe_open

    def states():
        for path, _, sigma, _ in index:
            prefix = f"{sigma:g}/"
            with safe_open(path, framework="pt") as f:
                yield {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return combine(states(), solve_weights([n for *_, n in index], [s for _, _, s, _ in index], t_out,
                                           list(sigma_rels)))


def write_exports(o: PosthocOptions, log=print) -> list[tuple[float, str]]:
    """-> [(sigma_rel, export path)], one rebuilt EMA each."""
    from ldm.checkpoint import load_components, save_components
    files, base = snapshot_files(o)
    index = snapshot_index(files)
    if not index:
        raise FileNotFoundError(f"{o.run} holds no post-hoc EMA snapshots (posthoc_ema_step*.safetensors): train "
                                f"with --posthoc-ema to keep them")
    steps = {step: n for _, step, _, n in index}
    step = o.step or max(steps)
    if step not in steps:
        raise ValueError(f"--step {step}: the run has snapshots at steps {sorted(steps)}")
    upto = [e for e in index if e[1] <= step]
    tracked = sorted({s for _, _, s, _ in upto})
    log(f"[posthoc_ema] {len(upto)} snapshots of sigma_rel {', '.join(f'{s:g}' for s in tracked)} up to step {step}; "
        f"rebuilding {', '.join(f'{s:g}' for s in o.sigma_rels)}")
    comps, config, meta = load_components(base)
    out = []
    for sigma, ema in zip(o.sigma_rels, rebuild(upto, o.sigma_rels, steps[step])):
        new = dict(comps)
        for name in [c for c in comps if c.startswith("ema_")]:  # ema_unet, and a trained text transformer's
            prefix = name[len("ema_"):] + "."
            new[name] = {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}
        path = os.path.join(o.out, f"sigma_rel_{sigma:g}", "model.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_components(path, new, config, {**meta, "step": str(step), "posthoc_sigma_rel": f"{sigma:g}",
                                            "posthoc_tracked": json.dumps(tracked)})
        log(f"[posthoc_ema] sigma_rel {sigma:g} -> {path}")
        out.append((sigma, path))
    return out


def evaluate_curve(o: PosthocOptions, exports: list[tuple[float, str]], log=print) -> list[dict]:
    """FD / KID of each export's samples against the held-out shards; logged to the training run (MLflow) as
    `posthoc/{score}` over step = sigma_rel x 1000 and as posthoc_ema/curve.json."""
    from pipeline.evaluate.model_eval import ModelEvalOptions, evaluate_model
    rows = []
    for sigma, path in exports:
        r = evaluate_model(ModelEvalOptions(model=path, input=o.evaluate_input, num_samples=o.num_samples,
                                            cfg_scales=(o.cfg_scale,), steps=(o.sample_steps,), workers=o.workers,
                                            agreement=False, tracking_uri=o.tracking_uri), log=log)
        row = {k: v for k, v in r["rows"][0].items() if isinstance(v, (int, float))}
        rows.append({"sigma_rel": sigma, "export": path, "feature_net": r["feature_net"], **row})
        log(f"[posthoc_ema] sigma_rel {sigma:g}: FD {row['fd']:.2f}, KID {row['kid']:.4f}")
    run_id = _mlflow_run_id(o.run)
    if run_id:
        import mlflow
        client = mlflow.MlflowClient(o.tracking_uri or None)
        for r in rows:
            for k in ("fd", "kid"):
                client.log_metric(run_id, f"posthoc/{k}", r[k], step=int(round(r["sigma_rel"] * 1000)))
        client.log_dict(run_id, rows, "posthoc_ema/curve.json")
    return rows
