"""MLflow helpers: one place that knows how to open a run on a server URI or a local sqlite store.

With a bare `sqlite:///dir/mlflow.db` MLflow would put artifacts relative to the process' working
directory (inside a Ray worker: a temporary session dir, lost); experiments created here get an explicit
artifact location beside the database instead.
"""
from __future__ import annotations

import contextlib
from pathlib import Path


def artifact_location_for(tracking_uri: str, experiment: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None  # a tracking server decides (--artifacts-destination)


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    import mlflow
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location_for(tracking_uri, experiment))
    except Exception:  # noqa: BLE001 - created concurrently by another process
        return mlflow.get_experiment_by_name(experiment).experiment_id


@contextlib.contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
               nested: bool = False, tags: dict | None = None):
    import mlflow
    exp_id = ensure_experiment(tracking_uri, experiment)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name,
                          nested=nested, tags=tags) as run:
        yield run
