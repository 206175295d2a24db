"""Start or join Ray: a running cluster (`ray start`, `ray job submit`) when there is one, otherwise an
embedded local Ray sized for this machine. Forwards S3/MLflow settings to the workers."""
from __future__ import annotations

import os

FORWARD_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "LDM_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


def init_ray(num_cpus: int | None = None, object_store_mb: int = 512, quiet: bool = True) -> str:
    """Returns "cluster" or "local". Passing num_cpus to an existing cluster would raise, so it is only
    used for the embedded one."""
    import ray
    if ray.is_initialized():
        return "cluster" if ray.get_runtime_context().gcs_address else "local"
    env = forwarded_env()
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address="auto", runtime_env=None if in_job else {"env_vars": env}, log_to_driver=True,
                 logging_level="WARNING" if quiet else "INFO")
        return "cluster"
    except ConnectionError:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_mb * 2 ** 20,
                 include_dashboard=False, runtime_env={"env_vars": env},
                 logging_level="WARNING" if quiet else "INFO")
        return "local"
