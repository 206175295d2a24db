"""The cluster path end to end: infra/local/start.sh brings up a two-node Ray cluster (a head and a second node
with its own CPUs and the custom resource second_node), an `mlflow server` and an S3 server, all on 127.0.0.1;
`ray job submit` runs make_shards, encode_latents and train_ldm against them, with S3 the only shared storage
(shards, cache, checkpoints, MLflow's artifacts); encoders and train workers run on both nodes; the jobs SUCCEED
and MLflow holds the metrics, the sample grid and the model; killing the second node's raylet mid-train costs
the steps since the last checkpoint, not the run."""
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import psutil
import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def stack_processes(stack_dir: Path) -> list:
    """Every live process of the stack started in `stack_dir`: its process group (start.sh runs in a session of
    its own) or its LDM_STACK_ID."""
    stack_id = (stack_dir / "stack_id").read_text().strip() if (stack_dir / "stack_id").exists() else "?"
    pgid = int((stack_dir / "pgid").read_text()) if (stack_dir / "pgid").exists() else -1
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and (os.getpgid(p.pid) == pgid
                                                       or p.environ().get("LDM_STACK_ID") == stack_id):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    ports = {"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port(),
             "S3_PORT": free_port(), "RAY_CLIENT_PORT": free_port(), "DASHBOARD_AGENT_PORT": free_port(),
             "WORKER_AGENT_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "STACK_DIR": str(d), "RAY_NUM_CPUS": "2",
           "RAY_WORKER_CPUS": "2", "VENV": str(BIN.parent)}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # the stack makes and hands out its own token
        env.pop(k, None)
    up = subprocess.run(["bash", str(ROOT / "infra" / "local" / "start.sh")], env=env, capture_output=True, text=True,
                        timeout=300)
    pgid = (d / "pgid").read_text().strip() if (d / "pgid").exists() else ""
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        stack_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['RAY_PORT']}",
                     "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['S3_PORT']}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                     "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(d / "ray_token"),
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        written = dict(ln.removeprefix("export ").split("=", 1) for ln in (d / "env").read_text().splitlines())
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            assert written[k] == stack_env[k], (k, written[k])
        assert (d / "ray_token").stat().st_mode & 0o077 == 0  # the token is this user's only
        yield {"env": stack_env, "dir": d, "ports": ports}
    finally:
        marker = d / "pgid"
        down = subprocess.run(["bash", str(ROOT / "infra" / "local" / "stop.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        if pgid and not marker.exists():
            marker.write_text(pgid)  # stop.sh removed it on success; look again with the same group id
        left = stack_processes(d)
        for p in left:  # nothing outlives the test, whatever stop.sh did; then fail it below
            p.kill()
        assert down.returncode == 0 and not left, (down.stdout, down.stderr, [p.pid for p in left])


def test_every_port_of_the_stack_is_loopback_only(stack):
    """GCS, raylet, object manager, agents, client server, job server, MLflow and S3: nothing beyond 127.0.0.1."""
    pids = {p.pid for p in stack_processes(stack["dir"])}
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [ln for ln in listening if any(f"pid={pid}," in ln for pid in pids)]
    assert len(ours) >= 10, ours  # gcs, raylet x2 per node, agents, client server, dashboard, mlflow, s3 at least
    for ln in ours:
        local = ln.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), ln
    for name, port in stack["ports"].items():  # the client server may still be starting: not required
        assert name == "RAY_CLIENT_PORT" or any(f":{port} " in ln for ln in ours), (name, port, ours)


def test_unauthenticated_driver_and_job_submission_are_refused(stack, tmp_path):
    """Over 127.0.0.1 only: a driver with auth disabled, a driver with a wrong token, a job submission without it."""
    env = {k: v for k, v in stack["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    probe = (f"import ray; ray.init(address='127.0.0.1:{stack['ports']['RAY_PORT']}'); "
             f"print('RAN', ray.get(ray.remote(lambda: 1).remote()))")
    tries = [([str(BIN / "python"), "-c", probe], {**env, **extra}) for extra in (
        {"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})]
    tries.append(([str(BIN / "ray"), "job", "submit", "--address", stack["env"]["RAY_API_SERVER_ADDRESS"], "--",
                   "echo", "RAN"], env))
    # all three at once: each waits on its refusal (a driver retries its connection), not on the CPUs
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, e in tries]
    outs = [p.communicate(timeout=180) for p in procs]
    for (cmd, e), p, (out, err) in zip(tries, procs, outs):
        assert p.returncode != 0 and "RAN" not in out, (cmd[-1], e.get("RAY_AUTH_MODE"), out[-2000:], err[-2000:])
    assert "token" in "".join(outs[2]).lower()  # the job submission says why


def test_planted_secrets_appear_in_no_log_param_or_job_table(stack, tmp_path):
    """A plain `python jobs/encode_latents.py` joining the head (RAY_ADDRESS) with a planted AWS secret and an
    MLflow password in --mlflow-uri: neither reaches Ray's logs or job table, MLflow's params or the job's output.
    The workers use the head's own credentials."""
    env, mlf = dict(stack["env"]), stack["env"]["MLFLOW_TRACKING_URI"]
    submit(env, "jobs/make_shards.py", "--output", "s3://ldm/secret-shards", "--dataset", "fashion-mnist",
           "--limit-train", "40", "--limit-test", "8", "--shard-size", "40")
    secret, password = f"planted-aws-{uuid.uuid4().hex}", f"planted-mlflow-{uuid.uuid4().hex}"  # in no file here
    uri_with_password = mlf.replace("http://", f"http://alice:{password}@")
    r = subprocess.run([str(BIN / "python"), str(ROOT / "jobs" / "encode_latents.py"), "--input",
                        "s3://ldm/secret-shards/train", "--output", "s3://ldm/secret-latents", "--autoencoder",
                        "random:tiny", "--resolution", "16", "--max-length", "16", "--mlflow-uri", uri_with_password],
                       env={**env, "AWS_SECRET_ACCESS_KEY": secret}, capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "1/1 complete" in out and "joining 127.0.0.1" in out
    assert secret not in out and password not in out
    jobs = subprocess.run([str(BIN / "ray"), "list", "jobs", "--detail", "--address", env["RAY_API_SERVER_ADDRESS"]],
                          env=env,
                          capture_output=True, text=True, timeout=120)
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    assert "RUNNING" in jobs.stdout or "SUCCEEDED" in jobs.stdout or "FINISHED" in jobs.stdout.upper()
    assert secret not in jobs.stdout and password not in jobs.stdout
    ray_tmp = Path((stack["dir"] / "ray_temp_dir").read_text().strip())
    files = [f for f in ray_tmp.rglob("*") if f.is_file() and not f.is_symlink() and f.stat().st_size < 50 * 2 ** 20]
    leaked = [str(f) for f in files if secret.encode() in f.read_bytes() or password.encode() in f.read_bytes()]
    assert not leaked, leaked
    client = mlflow.MlflowClient(mlf)
    (run,) = client.search_runs([client.get_experiment_by_name("encode_latents").experiment_id],
                                "tags.latent_cache = 's3://ldm/secret-latents'")
    assert run.data.params["mlflow_uri"] == mlf  # logged without the password
    assert all(password not in v and secret not in v for v in run.data.params.values())


def submit(env, *job_args, timeout=900) -> str:
    sid = f"e2e-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--submission-id", sid,
           "--working-dir", str(ROOT), "--", "python", *job_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    # the job server is asked in a subprocess too: this process' Ray holds the test session's token, not the stack's
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", env["RAY_API_SERVER_ADDRESS"], sid],
                            env=env, capture_output=True, text=True, timeout=120)
    assert f"Job '{sid}' succeeded" in status.stdout, \
        f"{job_args[0]} {status.stdout[-500:]}:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_ray_job_submit_encode_then_train(stack):
    env, mlf = stack["env"], stack["env"]["MLFLOW_TRACKING_URI"]
    submit(env, "jobs/make_shards.py", "--output", "s3://ldm/shards", "--dataset", "fashion-mnist",
           "--limit-train", "240", "--limit-test", "40", "--shard-size", "80")
    log = submit(env, "jobs/encode_latents.py", "--input", "s3://ldm/shards/train", "--output", "s3://ldm/latents",
                 "--autoencoder", "random:tiny", "--resolution", "16", "--max-length", "16", "--mlflow-uri", mlf,
                 "--num-encoders", "3", "--cpus-per-encoder", "0.75", "--batch-size", "32")
    assert "3/3 complete" in log
    # three encoders of 0.75 CPU do not fit on the head's 2 CPUs: one is placed on the second node, and the summary
    # says so (which nodes encode rows depends on timing: this input is a few fast batches)
    assert "encoder pool on 2" in log, log[-3000:]
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
    m = json.loads(fs.cat("ldm/latents/manifest.json"))
    assert m["counts"] == {"read": 240, "kept": 240, "skipped_total": 0} and len(m["completed_shards"]) == 3
    log = submit(env, "jobs/train_ldm.py", "--latents", "s3://ldm/latents", "--preset", "tiny",
                 "conditioning.text_encoder=hf", "unet.context_dim=384", "--num-workers", "2", "--zero-stage", "2",
                 "--max-steps", "6", "--batch-size", "8", "--checkpoint-every", "3", "--sample-every", "3",
                 "--sample-steps", "3", "--log-every", "1", "--storage-path", "s3://ldm/runs", "--name", "e2e",
                 "--mlflow-uri", mlf, "--placement-strategy", "SPREAD", "--cpus-per-worker", "0.5")
    assert "done: step 6" in log
    assert "ranks on 2 Ray node(s)" in log, log[-3000:]
    client = mlflow.MlflowClient(mlf)
    (run,) = client.search_runs([client.get_experiment_by_name("train_ldm").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    assert {"samples/step_0000003.png", "samples/step_0000006.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    assert client.search_model_versions("name='ldm-tiny'")
    # the export read back from s3:// by the driver: the served model and the diffusers folder beside it
    assert "diffusers/model_index.json" in {a.path for a in client.list_artifacts(run.info.run_id, "diffusers")}, \
        log[-3000:]
    assert "[mlflow] WARNING" not in log
    assert fs.exists("ldm/runs/e2e")
    (enc_run,) = client.search_runs([client.get_experiment_by_name("encode_latents").experiment_id],
                                    "tags.latent_cache = 's3://ldm/latents'")
    assert enc_run.data.metrics["kept"] == 240


def second_node_raylet():
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and "second_node" in " ".join(p.info["cmdline"] or []):
            return p
    return None


def test_killing_the_second_nodes_raylet_goes_on_elastic_on_one_worker(stack):
    """An elastic run (--num-workers 1-2) with one worker per node (1.5 of each node's 2 CPUs): the second node's
    raylet is killed, and the run goes on from its last checkpoint on the one worker the head can place, which hosts
    both data streams (the same global batch). Runs last in this module: the second node is gone afterwards."""
    env = stack["env"]
    raylet = second_node_raylet()
    assert raylet is not None, "the stack's second node has no raylet"
    if not fs_of(env).exists("ldm/latents/manifest.json"):  # run alone (-k): the cache the test above encodes
        test_ray_job_submit_encode_then_train(stack)
    sid = f"e2e-kill-{uuid.uuid4().hex[:8]}"
    args = ["jobs/train_ldm.py", "--latents", "s3://ldm/latents", "--preset", "tiny", "conditioning.text_encoder=hf",
            "unet.context_dim=384", "--num-workers", "1-2", "--zero-stage", "2", "--max-steps", "40",
            "--batch-size", "8", "--checkpoint-every", "4", "--sample-every", "0", "--log-every", "1",
            "--storage-path", "s3://ldm/runs", "--name", "killed", "--placement-strategy", "SPREAD",
            "--cpus-per-worker", "1.5", "--max-failures", "2"]
    ray_bin = [str(BIN / "ray"), "job"]
    addr = ["--address", env["RAY_API_SERVER_ADDRESS"]]
    r = subprocess.run([*ray_bin, "submit", *addr, "--submission-id", sid, "--no-wait", "--working-dir", str(ROOT),
                        "--", "python", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    t0, logs, killed = time.time(), "", False
    while time.time() - t0 < 600:
        logs = subprocess.run([*ray_bin, "logs", *addr, sid], env=env, capture_output=True, text=True,
                              timeout=120).stdout
        if not killed and "step 8/40" in logs:
            assert "ranks on 2 Ray node(s)" in logs, logs[-3000:]
            raylet.kill()  # the second node's raylet: its train worker, and any Ray Data task there, go with it
            killed = True
        status = subprocess.run([*ray_bin, "status", *addr, sid], env=env, capture_output=True, text=True,
                                timeout=120).stdout
        if any(w in status for w in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    assert killed, logs[-3000:]
    assert f"Job '{sid}' succeeded" in status, status[-500:] + logs[-4000:]
    resumed = [int(ln.split("resumed at step ")[1].split()[0]) for ln in logs.splitlines() if "resumed at step " in ln]
    # the last checkpoint before the kill: the log reaches `ray job logs` late on a slow machine (a run of 24 steps
    # once finished before the kill landed), so the kill comes at step 8 of 40 and may land a few checkpoints later;
    # a checkpoint step, before the end, is what matters
    assert resumed and resumed[0] % 4 == 0 and 4 <= resumed[0] < 40, logs[-4000:]
    assert "ranks on 1 Ray node(s)" in logs and "done: step 40" in logs, logs[-3000:]
    assert "elastic: 1-2 workers share 2 data stream(s)" in logs, logs[-3000:]
    assert "written by 2 worker(s), continued on 1: the same 2 data stream(s)" in logs, logs[-3000:]
    assert "rank 0 of 1:" in logs and f"images {40 * 8 * 2} |" in logs, logs[-3000:]  # the same global batch


def fs_of(env):
    import s3fs
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
