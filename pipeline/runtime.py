"""Start or join Ray: a running cluster (`ray start`, `ray job submit`) when there is one, otherwise an
embedded local Ray sized for this machine. Forwards S3/MLflow settings to the workers."""
from __future__ import annotations

import contextlib
import os

FORWARD_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "LDM_")
_STARTED_HERE = False  # True once init_ray started an embedded Ray in this process


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


def init_ray(num_cpus: int | None = None, object_store_mb: int = 512, quiet: bool = True) -> str:
    """Returns "cluster" or "local". Passing num_cpus to an existing cluster would raise, so it is only
    used for the embedded one."""
    global _STARTED_HERE
    import ray
    if ray.is_initialized():  # a second stage of the same process (jobs/demo.py): keep the first answer
        return "local" if _STARTED_HERE else "cluster"
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
        _STARTED_HERE = True
        return "local"


@contextlib.contextmanager
def quiet_data_progress():
    """Datasets created inside run without Ray Data progress bars: a training stream re-runs every epoch and its
    bars would bury the workers' own step/ETA lines (and cost the driver CPU on a small machine)."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # each Dataset copies the current context when it is created
    try:
        yield
    finally:
        ctx.enable_progress_bars = old


def worker_resources(num_workers: int, use_gpu: bool, cpus_per_worker: float = 0.0, threads: int = 0,
                     local: bool = True) -> tuple[float, int]:
    """CPUs reserved per Ray Train worker and torch threads in it. On a small CPU node the workers leave one
    CPU to Ray Data (2 workers x 1 CPU on 2 cores starve the readers and hang)."""
    import ray
    total = ray.cluster_resources().get("CPU", 1)
    cpus = cpus_per_worker or (1.0 if use_gpu else max(0.25, min(1.0, (total - 1) / num_workers)))
    threads = threads or (max(1, int(total // max(1, num_workers))) if local else max(1, int(cpus)))
    return cpus, threads


def fit(loop, config: dict, *, num_workers: int, use_gpu: bool, cpus: float, storage_path: str, name: str,
        keep_checkpoints: int, max_failures: int, datasets: dict):
    """Run a Ray Train TorchTrainer; a rerun with the same (storage_path, name) resumes from its latest
    checkpoint (Ray Train V2), and a worker failure restarts the group from there (FailureConfig)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures)),
        datasets=datasets)
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def resumable_batches(shard, state: dict, batch_size: int, shuffle_buffer: int, seed: int, rank: int):
    """Endless training batches from a Ray Train dataset shard, epoch after epoch (Ray Data re-reads the
    files in a new shuffled order each epoch). `state["epoch"]` and `state["batch_in_epoch"]` record the data
    position for checkpoints; a restored state skips the batches of its epoch that were already trained on."""
    epoch, skip = state["epoch"], state["batch_in_epoch"]
    while True:
        state["epoch"], state["batch_in_epoch"], n = epoch, 0, 0
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                                           local_shuffle_buffer_size=shuffle_buffer or None,
                                                           local_shuffle_seed=seed + epoch * 7919 + rank)):
            state["batch_in_epoch"], n = i + 1, n + 1
            if i >= skip:
                yield batch
        if n == 0:
            raise ValueError(f"the dataset gives this worker no full batch of {batch_size}: lower --batch-size or "
                             f"--num-workers, or add data")
        epoch, skip = epoch + 1, 0
