"""The Ray Train kit both trainers share, so each training loop reads as set-up, restore, step, periodic work.

Driver side: `plan_run` (resume target, run name, run dir), `start_ray` (Ray, and CPUs/threads per worker),
`fit` (the TorchTrainer, user errors not retried). Worker side: `Worker` (rank, device, threads, rank-0 log and
MLflow), `restore_checkpoint`, `save_checkpoint` (a temporary dir the loop fills, sealed and reported to Ray
Train), `batches` (the resumable data stream) and `Progress` (samples/s, ETA, the step line).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common import storage
from pipeline.common.errors import DataError
from pipeline.train.checkpoints import list_checkpoints, refuse_if_corrupt, restore, restore_plan, seal
from pipeline.train.options import RunOptions


# ---------------------------------------------------------------- driver side
@dataclass(frozen=True)
class RunPlan:
    """Where a run lives and what it starts from."""
    storage_path: str
    name: str
    run_dir: str
    resume_from: str = ""                # an explicit checkpoint dir ("" = the run dir's newest intact one)
    phase_start: bool = False            # resume_from is another run's (--resume-from): a new phase starts there

    @property
    def known_checkpoints(self) -> tuple[str, ...]:
        return tuple(list_checkpoints(self.run_dir))


@dataclass(frozen=True)
class WorkerRun:
    """What the driver works out for every worker, beside the job's options and model config."""
    mlflow_run_id: str
    resume_from: str
    known_checkpoints: tuple[str, ...]
    threads: int
    phase_start: bool = False            # resume_from starts a new phase: the data position restarts


def resolve_resume(resume: str, storage_path: str, name: str, mlflow_uri: str = "") -> tuple[str, str, str]:
    """-> (storage_path, name, resume_from checkpoint path or ""). `resume` is a run dir, a Ray Train
    checkpoint dir, or `mlflow:RUN_ID` (the run's `ray_run_dir` tag names its run dir)."""
    if not resume:
        return storage_path, name, ""
    if resume.startswith(("mlflow:", "runs:/")):
        import mlflow
        run_id = resume.split(":", 1)[1].lstrip("/").split("/")[0]
        run = mlflow.MlflowClient(mlflow_uri or None).get_run(run_id)
        run_dir = run.data.tags.get("ray_run_dir")
        if not run_dir:
            raise FileNotFoundError(f"MLflow run {run_id} has no ray_run_dir tag: pass the run directory instead")
        resume = run_dir
    p = resume.rstrip("/")
    if storage.exists(storage.join(p, "train_state.json")):  # a Ray Train checkpoint directory
        return storage_path, name, p
    if not storage.exists(p):
        raise FileNotFoundError(f"--resume {resume}: no such run directory or checkpoint")
    parent, base = p.rsplit("/", 1) if "/" in p else (".", p)
    return parent, base, ""


def plan_run(opts: RunOptions, default_name: str) -> RunPlan:
    storage_path, name, resume_from = resolve_resume(opts.resume, opts.storage_path, opts.name, opts.mlflow_uri)
    refuse_if_corrupt(resume_from)
    name = name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = storage_path if storage.is_remote(storage_path) else str(Path(storage_path).resolve())
    return RunPlan(storage_path, name, storage.join(storage_path, name), resume_from)


@dataclass(frozen=True)
class Resources:
    mode: str                            # "local" (a private embedded Ray) | "cluster"
    cpus: float                          # reserved per worker
    threads: int                         # torch threads per worker


def worker_resources(num_workers: int, use_gpu: bool, cpus_per_worker: float = 0.0, threads: int = 0,
                     local: bool = True) -> tuple[float, int]:
    """CPUs reserved per Ray Train worker and torch threads in it. On a small CPU node the workers leave one
    CPU to Ray Data (2 workers x 1 CPU on 2 cores starve the readers and hang)."""
    import ray
    total = ray.cluster_resources().get("CPU", 1)
    cpus = cpus_per_worker or (1.0 if use_gpu else max(0.25, min(1.0, (total - 1) / num_workers)))
    threads = threads or (max(1, int(total // max(1, num_workers))) if local else max(1, int(cpus)))
    return cpus, threads


def start_ray(opts: RunOptions, log) -> Resources:
    from pipeline.common.runtime import init_ray
    mode = init_ray(opts.num_cpus or None, opts.object_store_mb, address=opts.address, log=log)
    cpus, threads = worker_resources(opts.num_workers, opts.use_gpu, opts.cpus_per_worker, opts.threads_per_worker,
                                     local=mode == "local")
    return Resources(mode, cpus, threads)


def keep_in_memory(ds, mode: str, tag: str, log):
    """With --in-memory yes, the training dataset read once into Ray's object store (Ray Data's materialize, as
    Ray Train's docs advise for data that fits), so later epochs skip the reads and decoding that otherwise compete
    with the step for CPUs. The stage-1 job's images have no size known before reading, so auto streams."""
    if mode != "yes":
        return ds
    t0 = time.time()
    ds = ds.materialize()
    log(f"[{tag}] training data kept in Ray's object store after one read: {ds.count()} rows, "
        f"{ds.size_bytes() / 2 ** 20:.0f} MiB, {time.time() - t0:.1f} s (--in-memory no streams it every epoch)")
    return ds


def worker_run(plan: RunPlan, res: Resources, mlflow_run_id: str) -> WorkerRun:
    return WorkerRun(mlflow_run_id, plan.resume_from, plan.known_checkpoints, res.threads, plan.phase_start)


def fit(loop, job, opts: RunOptions, plan: RunPlan, res: Resources, datasets: dict):
    """Run a Ray Train TorchTrainer with `{"job": job}` (a frozen dataclass) as each worker's config; a rerun
    with the same run dir resumes from its latest checkpoint (Ray Train V2), and a worker failure restarts the
    group from there (FailureConfig). An error that would repeat (pipeline.common.errors) is not retried: it is
    raised here as itself, not as a WorkerGroupError."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.common.errors import repeating_error
    from pipeline.train import ray_hooks
    ray_hooks.install(embedded=res.mode == "local")
    trainer = TorchTrainer(
        loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=(opts.min_workers, opts.num_workers) if opts.min_workers
                                     else opts.num_workers, use_gpu=opts.use_gpu,
                                     placement_strategy=opts.placement_strategy,
                                     resources_per_worker={"CPU": res.cpus, **({"GPU": 1} if opts.use_gpu else {})}),
        run_config=RunConfig(name=plan.name, storage_path=plan.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=opts.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             # Ray Train's own INFO lines (worker group, process group, every checkpoint and report)
                             # would bury the workers' step/ETA lines; its warnings and errors still show
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets)
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised as the worker's own error when it will repeat
        user = repeating_error(e)
        if user is not None:
            raise user from None
        raise
    if result.error:
        raise repeating_error(result.error) or result.error
    return result


def checkpoint_uri(result, plan: RunPlan) -> str | None:
    """The result's last checkpoint as a URI that storage/fsspec reads: Ray Train gives a remote one's path
    without its protocol ('bucket/runs/...'), so it gets the run dir's back."""
    if not result.checkpoint:
        return None
    path = result.checkpoint.path
    return path if "://" in path else storage.unstrip(None, path, plan.run_dir)


# ---------------------------------------------------------------- worker side
def _quiet(*_) -> None:
    pass


@dataclass
class Worker:
    """This Ray Train worker: its rank, device, and (rank 0 only) the log and the MLflow tracker."""
    rank: int
    world: int
    device: torch.device
    log: object
    tracker: object
    tag: str

    @classmethod
    def start(cls, opts: RunOptions, run: WorkerRun, tag: str) -> "Worker":
        import ray.train
        import ray.train.torch

        from pipeline.common.tracking import Tracker, say
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        use_gpu = opts.use_gpu and torch.cuda.is_available()
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        if use_gpu:  # every step has one shape: cuDNN times its convolution algorithms once and keeps the best
            torch.backends.cudnn.benchmark = True
        torch.set_num_threads(max(1, run.threads))
        _quiet_train_reports()
        tracker = Tracker(opts.mlflow_uri, run.mlflow_run_id) if rank == 0 else Tracker("", "")
        return cls(rank, world, device, say if rank == 0 else _quiet, tracker, tag)

    def say(self, msg: str) -> None:
        self.log(f"[{self.tag}] {msg}")

    def nodes(self) -> list[str]:
        """The Ray node of every rank (a collective: every rank calls it once the process group is up)."""
        import torch.distributed as dist

        from pipeline.common.runtime import node_id
        mine = node_id()
        if not (dist.is_available() and dist.is_initialized()) or self.world == 1:
            return [mine]
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        return every


def _quiet_train_reports() -> None:
    """Ray Train V2 logs every report and every checkpoint at INFO under loggers named by file path, which its
    LoggingConfig does not reach; the step lines already say it. Its warnings still show."""
    import logging
    try:
        from ray.train.v2._internal.execution import context, storage as train_storage
    except ImportError:  # another Ray Train layout: leave its logging as it is
        return
    for module in (context, train_storage):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


def restore_checkpoint(run: WorkerRun, load, w: Worker) -> bool:
    """Load this run's latest checkpoint (a worker restart), else --resume, else the run dir's newest intact one,
    with `load(local_dir)`; False for a new run."""
    return restore(restore_plan(run.resume_from, list(run.known_checkpoints)), load, w.log)


@contextlib.contextmanager
def save_checkpoint(w: Worker, metrics: dict, every_rank_writes: bool):
    """`with save_checkpoint(w, metrics, ...) as d:` the loop writes its files into `d` (None on ranks that write
    nothing: DDP keeps one copy on rank 0); then the rank's files are sealed (written last, so a reader can tell a
    whole checkpoint from a cut one) and reported to Ray Train with `metrics`."""
    import ray.train
    from ray.train import Checkpoint
    writes = every_rank_writes or w.rank == 0
    d = tempfile.mkdtemp(prefix=f"{w.tag}-ckpt-") if writes else None
    try:
        yield d
        if d is None:
            ray.train.report(metrics)
            return
        if every_rank_writes:
            seal(d, w.rank, w.world)
        else:
            seal(d, 0, 1)  # one writer: its seal covers the whole checkpoint
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    finally:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)


def batches(shard, state: dict, batch_size: int, shuffle_buffer: int, seed: int, rank: int):
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
            raise DataError(f"the dataset gives this worker no full batch of {batch_size}: lower --batch-size or "
                             f"--num-workers, or add data")
        epoch, skip = epoch + 1, 0


class Progress:
    """Samples/s and ETA since this worker started (or resumed); `steady` leaves out the first `settle` steps
    (compilation, the first blocks of the stream), which is what a throughput comparison should use."""

    def __init__(self, state: dict, max_steps: int, settle: int = 5):
        self.state, self.max_steps, self.settle = state, max_steps, settle
        self.t0, self.seen0, self.step0 = time.time(), state["images_seen"], state["step"]
        self.t_settled = self.seen_settled = None

    def tick(self) -> None:
        if self.t_settled is None and self.state["step"] - self.step0 >= self.settle:
            self.t_settled, self.seen_settled = time.time(), self.state["images_seen"]

    def rate(self) -> float:
        return (self.state["images_seen"] - self.seen0) / max(1e-9, time.time() - self.t0)

    def steady(self) -> float:
        if self.t_settled is None:
            return self.rate()
        return (self.state["images_seen"] - self.seen_settled) / max(1e-9, time.time() - self.t_settled)

    def eta(self) -> str:
        done = self.state["step"] - self.step0
        s = int((self.max_steps - self.state["step"]) * (time.time() - self.t0) / max(1, done))
        return f"{s // 60}m{s % 60:02d}s"

    def due(self, every: int) -> bool:
        step = self.state["step"]
        return bool(every) and (step % every == 0 or step == self.max_steps)

    def line(self, fields: str) -> str:
        return f"step {self.state['step']}/{self.max_steps} | {fields} | {self.rate():.1f} samples/s | ETA {self.eta()}"

