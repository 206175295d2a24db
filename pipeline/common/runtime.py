"""Start a private embedded Ray, or join a cluster when the user says so (`RAY_ADDRESS`, which `ray job submit`
sets, or a job's `--address`). The Ray Train kit (pipeline/train/kit.py) runs the trainers on it.

An embedded Ray is a single-machine cluster: every Ray port listens on 127.0.0.1 and token authentication is on.
Credentials are never put into a runtime_env (Ray logs it in clear text): embedded workers inherit the driver's
environment, and a cluster's nodes carry their own (env at `ray start`, an IAM role, a Kubernetes secret)."""
from __future__ import annotations

import contextlib
import os
import re
import sys

FORWARD_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "LDM_")
SECRET = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY|SESSION", re.I)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every port on 127.0.0.1
_STARTED_HERE = False  # True once init_ray started an embedded Ray in this process


def forwarded_env() -> dict[str, str]:
    """Settings a joined cluster's workers need from the driver (S3 endpoint/region, MLflow URI, offline flags),
    never a secret: those names are left out whatever their prefix."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) and not SECRET.search(k)}


def cluster_address(address: str = "") -> str:
    """The cluster to join: an explicit address, else RAY_ADDRESS (set by `ray job submit` and the local stack's
    env file); "" means start a private embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS", "")


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def use_loopback() -> None:
    """Ray's single-machine mode: every port of a head started here on 127.0.0.1, and a driver that reaches a
    loopback head over 127.0.0.1 (not over the machine's own address, which such a head does not listen on).
    ray_constants reads the variable at import, so the module's copy is set too."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as rc
    rc.ENABLE_RAY_CLUSTER = False


def prepare_embedded_env() -> None:
    """Before Ray starts an embedded head: loopback only, and token authentication on (Ray's own default for a
    local cluster, which an inherited RAY_AUTH_MODE=disabled would turn off)."""
    use_loopback()
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        del os.environ["RAY_AUTH_MODE"]  # ray.init then enables token auth and creates a token if none exists


def init_ray(num_cpus: int | None = None, object_store_mb: int = 512, quiet: bool = True, address: str = "",
             log=print) -> str:
    """Returns "cluster" or "local". Never joins a Ray it was not told about: two plain `python jobs/...` runs on
    one machine each get their own private Ray (the old `address="auto"` made them join, and deadlock, each
    other). Passing num_cpus to an existing cluster would raise, so it is only used for the embedded one."""
    global _STARTED_HERE
    import ray
    if ray.is_initialized():  # a second stage of the same process (jobs/demo.py): keep the first answer
        return "local" if _STARTED_HERE else "cluster"
    level = "WARNING" if quiet else "INFO"
    target = cluster_address(address)
    if target or os.environ.get("RAY_JOB_ID"):
        in_job = bool(os.environ.get("RAY_JOB_ID"))  # `ray job submit`: the job already has the cluster's env
        env = forwarded_env()
        held = sorted(k for k in os.environ if k.startswith(FORWARD_PREFIXES) and SECRET.search(k))
        if held and not in_job:
            log(f"[ray] joining {target}: {', '.join(held)} stay on this machine (never sent in a runtime_env); "
                f"the cluster's nodes need their own credentials")
        if _is_loopback(target):
            use_loopback()
        ray.init(address=target or "auto", runtime_env=None if in_job else {"env_vars": env}, log_to_driver=True,
                 logging_level=level)
        return "cluster"
    prepare_embedded_env()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_mb * 2 ** 20,
             include_dashboard=False, logging_level=level)
    _STARTED_HERE = True
    return "local"


@contextlib.contextmanager
def training_stream_context(preserve_order: bool = False):
    """Datasets created inside stream training data, re-run every epoch:
    - without Ray Data progress bars: they would bury the workers' own step/ETA lines (and cost the driver CPU);
    - through Ray Data's V1 parquet reader. The V2 reader starts its FooterReader actors (fresh Python processes)
      on every execution, i.e. every epoch, which takes CPUs from a small node's training worker
      (docs/measurements.md, the training feed);
    - with `preserve_order`, blocks in the order of the files given (the LDM job's planned epochs).
    The context is restored on exit; a Dataset keeps the copy it was made with."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars, ctx.use_datasource_v2, ctx.execution_options.preserve_order
    ctx.enable_progress_bars, ctx.use_datasource_v2 = False, False
    ctx.execution_options.preserve_order = preserve_order or old[2]
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.use_datasource_v2, ctx.execution_options.preserve_order = old


def job_actor_nodes(class_name: str) -> list[str] | None:
    """The nodes this job's actors of `class_name` were placed on (alive or done), from Ray's state API; None on
    the embedded Ray (one node, and no dashboard to ask) or where the API does not answer."""
    import ray
    if _STARTED_HERE or not ray.is_initialized():
        return None
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException
    try:
        actors = list_actors(filters=[("job_id", "=", ray.get_runtime_context().get_job_id()),
                                      ("class_name", "=", class_name)], limit=10_000, timeout=10,
                             raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError):
        return None
    return sorted({a.node_id for a in actors if a.node_id})  # an actor never placed has none


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): for summaries of where the work ran. A process that Ray
    runs has imported it; elsewhere (a benchmark on a machine without Ray) there is no node to name."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
