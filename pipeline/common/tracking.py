"""MLflow helpers: one place that knows how to open a run on a server URI or a local sqlite store.

With a bare `sqlite:///dir/mlflow.db` MLflow would put artifacts relative to the process' working
directory (inside a Ray worker: a temporary session dir, lost); experiments created here get an explicit
artifact location beside the database instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit


def redact(uri: str) -> str:
    """A URI fit for logs and params: `http://user:secret@host` -> `http://***@host`."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def credentials_to_env(uri: str) -> str:
    """Move `user:password@` out of a tracking URI into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (how
    MLflow reads them; embedded Ray workers inherit the environment) and return the URI without them, so no
    log line, MLflow param or Ray job table ever holds the password."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
        _scrub_command_line(userinfo + "@")
        print("[mlflow] note: a password in --mlflow-uri shows in the process list until the job starts; prefer "
              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD", file=sys.stderr)
    return urlunsplit(parts._replace(netloc=host))


def _scrub_command_line(secret: str) -> None:
    """Take `secret` out of this process' command line: sys.argv, and the OS process title that `ps` shows and
    that Ray records as a driver job's entrypoint (`ray list jobs`)."""
    import subprocess
    sys.argv[:] = [a.replace(secret, "***@") for a in sys.argv]
    try:
        from ray._raylet import setproctitle
        setproctitle(subprocess.list2cmdline([sys.executable, *sys.argv]))
    except Exception:  # noqa: BLE001 - Ray's helper moved: the MLflow params and logs are still clean
        pass


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


def say(*parts) -> None:
    """Rank-0 status lines, written once (Ray Train V2 also tees print() into its logger)."""
    sys.__stdout__.write(" ".join(str(p) for p in parts) + "\n")
    sys.__stdout__.flush()


class Tracker:
    """Rank-0 MLflow writer: metrics buffered and sent in batches; failures are warnings."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self.buf, self.warned = uri, run_id, [], False
        self.client = None
        if uri and run_id:
            import mlflow
            self.client = mlflow.MlflowClient(uri)

    def metric(self, name: str, value: float, step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric
            self.buf.append(Metric(name, float(value), int(time.time() * 1000), step))

    def _guard(self, fn, what: str):
        if self.client is None:
            return
        try:
            fn()
            self.warned = False
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            if not self.warned:
                say(f"[train] WARNING: MLflow {what} failed ({type(e).__name__}: {str(e)[:200]}); "
                      f"training continues and will retry")
            self.warned = True

    def flush(self) -> None:
        if self.buf:
            def send():
                for i in range(0, len(self.buf), 900):
                    self.client.log_batch(self.run_id, metrics=self.buf[i:i + 900])
                self.buf = []
            self._guard(send, "metric logging")

    def artifact(self, path: str, artifact_path: str) -> None:
        self._guard(lambda: self.client.log_artifact(self.run_id, path, artifact_path), "artifact upload")


def open_or_continue_run(uri: str, experiment: str, run_dir: str, params: dict, tags: dict, log,
                         parent_run_id: str = "") -> str:
    """Driver side: the MLflow run of a Ray Train run dir. A new run logs `params` (the full config); a
    resumed run dir (its `mlflow_run_id` marker exists) continues its run, so curves stay in one place."""
    import mlflow
    from mlflow.entities import Param

    from pipeline.common import storage
    marker = storage.join(run_dir, "mlflow_run_id")
    exp_id = ensure_experiment(uri, experiment)
    client = mlflow.MlflowClient(uri)
    if storage.exists(marker):
        run_id = storage.read_bytes(marker).decode().strip()
        log(f"[mlflow] continuing run {run_id}")
        client.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        return run_id
    all_tags = {"ray_run_dir": run_dir, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_dir.rstrip("/").rsplit("/", 1)[-1], tags=all_tags)
    items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run.info.run_id, params=items[i:i + 90])
    storage.write_bytes_atomic(marker, run.info.run_id.encode())
    log(f"[mlflow] run {run.info.run_id} in experiment {experiment!r} at {uri}")
    return run.info.run_id


def register_version(uri: str, run_id: str, name: str, log, artifact: str = "model") -> str | None:
    """Register the run's `model/` artifact folder (a safetensors export) as a new model version."""
    import mlflow
    try:
        client = mlflow.MlflowClient(uri)
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:
            pass  # exists already: add a version
        source = f"{client.get_run(run_id).info.artifact_uri}/{artifact}"
        mv = client.create_model_version(name, source=source, run_id=run_id)
        log(f"[mlflow] registered model {name} version {mv.version} (mlflow-models:/{name}/{mv.version})")
        return str(mv.version)
    except Exception as e:  # noqa: BLE001
        log(f"[mlflow] WARNING: model registration failed: {type(e).__name__}: {e}")
        return None
