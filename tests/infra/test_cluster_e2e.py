"""The cluster path end to end: infra/local/start.sh brings up a Ray head, an `mlflow server` and an S3
server on 127.0.0.1; `ray job submit` runs make_shards, encode_latents and train_ldm against them (shards,
cache and checkpoints on S3); the jobs SUCCEED and MLflow holds the metrics, the sample grid and the model."""
import json
import os
import subprocess
import uuid
from pathlib import Path

import mlflow
import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    ports = {"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port(),
             "S3_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "STACK_DIR": str(d), "RAY_NUM_CPUS": "2",
           "VENV": str(BIN.parent)}
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run(["bash", str(ROOT / "infra" / "local" / "start.sh")], env=env, capture_output=True, text=True,
                        timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        stack_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['S3_PORT']}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                     "RAY_AUTH_MODE": "disabled"}
        assert f"AWS_ENDPOINT_URL={stack_env['AWS_ENDPOINT_URL']}" in (d / "env").read_text()
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        # our services (job server, MLflow, S3) listen on loopback only; Ray 2.60's own GCS/agents bind wider
        # whatever --node-ip-address says (see README "Local stack"), which stays inside this machine's sandbox
        for p in (ports["DASHBOARD_PORT"], ports["MLFLOW_PORT"], ports["S3_PORT"]):
            lines = [ln for ln in listening.splitlines() if f":{p} " in ln]
            assert lines and all("127.0.0.1:" in ln for ln in lines), (p, lines)
        yield stack_env
    finally:
        subprocess.run(["bash", str(ROOT / "infra" / "local" / "stop.sh")], env=env, capture_output=True, timeout=120)


def submit(env, *job_args, timeout=900) -> str:
    sid = f"e2e-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id", sid,
           "--working-dir", str(ROOT), "--", "python", *job_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    from ray.job_submission import JobSubmissionClient
    status = JobSubmissionClient(env["RAY_ADDRESS"]).get_job_status(sid)
    assert str(status) == "SUCCEEDED" or getattr(status, "value", "") == "SUCCEEDED", \
        f"{job_args[0]} {status}:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_ray_job_submit_encode_then_train(stack):
    env, mlf = stack, stack["MLFLOW_TRACKING_URI"]
    submit(env, "jobs/make_shards.py", "--output", "s3://ldm/shards", "--dataset", "fashion-mnist",
           "--limit-train", "240", "--limit-test", "40", "--shard-size", "80")
    log = submit(env, "jobs/encode_latents.py", "--input", "s3://ldm/shards/train", "--output", "s3://ldm/latents",
                 "--autoencoder", "random:tiny", "--resolution", "16", "--max-length", "16", "--mlflow-uri", mlf)
    assert "3/3 complete" in log
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
    m = json.loads(fs.cat("ldm/latents/manifest.json"))
    assert m["counts"] == {"read": 240, "kept": 240, "skipped_total": 0} and len(m["completed_shards"]) == 3
    log = submit(env, "jobs/train_ldm.py", "--latents", "s3://ldm/latents", "--preset", "tiny",
                 "conditioning.text_encoder=hf", "unet.context_dim=384", "--num-workers", "2", "--zero-stage", "2",
                 "--max-steps", "6", "--batch-size", "8", "--checkpoint-every", "3", "--sample-every", "3",
                 "--sample-steps", "3", "--log-every", "1", "--storage-path", "s3://ldm/runs", "--name", "e2e",
                 "--mlflow-uri", mlf)
    assert "done: step 6" in log
    client = mlflow.MlflowClient(mlf)
    (run,) = client.search_runs([client.get_experiment_by_name("train_ldm").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    assert {"samples/step_0000003.png", "samples/step_0000006.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    assert client.search_model_versions("name='ldm-tiny'")
    assert fs.exists("ldm/runs/e2e")
    (enc_run,) = client.search_runs([client.get_experiment_by_name("encode_latents").experiment_id])
    assert enc_run.data.metrics["kept"] == 240
