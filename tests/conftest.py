import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every Ray the tests start (embedded in this process, in job subprocesses, the local stack's head) has token
# authentication on and listens on 127.0.0.1 only; this session's token is its own, never ~/.ray/auth_token.
# Set before anything imports ray (Ray reads both at import).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", __import__("secrets").token_hex(32))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)  # never join a Ray the tests did not start
torch.set_num_threads(2)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


# ------------------------------------------------------------------------------------------------
# real services for pipeline tests: an S3-compatible server on 127.0.0.1 and an embedded Ray

import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from helpers import free_port, wait_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1; sets the AWS_* env that s3fs, pyarrow and Ray workers read."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(VENV_BIN)) or shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded Ray for the session (2 CPUs, small object store), started by the product's own init_ray."""
    import ray

    from pipeline.common.runtime import init_ray
    assert init_ray(num_cpus=2, object_store_mb=256) == "local"  # its workers inherit the S3 env set above
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 (sqlite backend, local artifact store)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    exe = shutil.which("mlflow", path=str(VENV_BIN)) or shutil.which("mlflow")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, timeout=120, proc=proc)
    import urllib.request
    t0 = time.time()
    while time.time() - t0 < 60:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
