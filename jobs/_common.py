"""Shared bits of the job entry points: the repo importable when run as `python jobs/x.py`; exit statuses."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# no "Loading weights" bar each time a Ray worker loads the frozen text encoder (read at huggingface_hub's import;
# workers inherit it, or get it forwarded as an HF_ setting on a cluster)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Ray Data's console at WARNING (its INFO progress log would bury the jobs' own lines; it still reaches the session's
# ray-data.log). Set before anything imports ray; embedded Ray workers inherit it. A user's own config wins.
os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(ROOT / "pipeline" / "common" / "ray_data_logging.yaml"))


def sigma_rel(text: str) -> float:
    """An argparse type: one post-hoc EMA length, a relative std in (0, 0.28) (a power-function profile's is below
    0.2887, EDM2 eq. 3)."""
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a relative std, e.g. 0.05)") from None
    if not 0 < v < 0.28:
        raise argparse.ArgumentTypeError(f"sigma_rel {v:g} must be in (0, 0.28)")
    return v


def run(main, tag: str) -> None:
    """Exit with a clear status and one line that names the problem (the last line, for `ray job logs`): 0 done
    (or main's own code, e.g. 3 when encode shards failed); 2 bad arguments, config, input or checkpoint (a retry
    would repeat it); 4 the work itself failed; 5 a storage, tracking or Ray endpoint could not be reached
    (nothing was changed: rerun when it is back); 130 interrupted (rerun to resume)."""
    from ldm.config import ConfigError
    from pipeline.common.storage import is_unreachable
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as e:
        _stop_ray()
        print(f"[{tag}] error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        _stop_ray()
        if not is_unreachable(e):
            print(f"[{tag}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(4)
        print(f"[{tag}] unreachable: {e}", file=sys.stderr)
        sys.exit(5)
    except KeyboardInterrupt:
        _stop_ray()
        print(f"[{tag}] interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _stop_ray() -> None:
    """Disconnect from Ray before the last line: its log thread forwards workers' lines asynchronously, so a late
    one could otherwise follow the error line (shutdown joins that thread; an attached cluster keeps running)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - already failing; the error line matters more
            pass


def add_run_args(p, cls, what: str) -> dict:
    """The flags every Ray Train job shares (pipeline.train.options.RunOptions), defaults taken from `cls` so the
    dataclass stays the one source of truth. Returns the argument groups for the job to add its own flags to.
    `what` names a batch element in help texts ("images", "latents")."""
    d = cls.__dataclass_fields__
    dv = {k: f.default for k, f in d.items()}
    t = p.add_argument_group("optimisation")
    t.add_argument("--max-steps", type=int, default=dv["max_steps"],
                   help="optimizer steps to train to (total, across resumes)")
    t.add_argument("--batch-size", type=int, default=dv["batch_size"],
                   help=f"{what} per {'data stream' if 'data_streams' in d else 'worker'} per micro-step")
    t.add_argument("--lr", type=float, default=dv["lr"], help="peak learning rate")
    t.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default=dv["lr_schedule"],
                   help="LR after the warm-up")
    t.add_argument("--warmup-steps", type=int, default=dv["warmup_steps"], help="linear LR warm-up steps")
    t.add_argument("--min-lr-ratio", type=float, default=dv["min_lr_ratio"],
                   help="final LR / peak LR for cosine and linear")
    t.add_argument("--ema-decay", type=float, default=dv["ema_decay"],
                   help="EMA decay of the weights, with warm-up (0 = off)")
    if what == "latents":  # the LDM job's planned epochs (pipeline/train/epoch_plan.py)
        t.add_argument("--shuffle-buffer", type=int, default=dv["shuffle_buffer"],
                       help="rows shuffled together: each worker reads its share of the cache's parts in windows "
                       "of whole parts holding at least this many rows, each window in a seeded random order (a "
                       "resume re-reads at most one window)")
        t.add_argument("--in-memory", choices=["auto", "yes", "no"], default=dv["in_memory"],
                       help="each worker keeps the cache parts it has read in its memory, so later epochs read no "
                       "file again; auto: when the decoded cache times the workers fills at most a quarter of the "
                       "cluster's memory")
    else:
        t.add_argument("--shuffle-buffer", type=int, default=dv["shuffle_buffer"],
                       help=f"local shuffle buffer ({what}) per worker")
        t.add_argument("--in-memory", choices=["auto", "yes", "no"], default=dv["in_memory"],
                       help="keep the training data in Ray's object store after the first epoch instead of "
                       "re-reading and decoding it every epoch (Ray Data materialize); only with yes, as the "
                       "decoded size of the images is unknown before reading")
    t.add_argument("--seed", type=int, default=dv["seed"], help="seed of weights, noise and data order")
    s = p.add_argument_group("distribution (Ray Train)")
    elastic = "min_workers" in d and cls.__name__ == "TrainOptions"
    s.add_argument("--num-workers", type=workers if elastic else int, default=dv["num_workers"],
                   help="Ray Train workers (one per GPU on a GPU cluster)" + (
                       "; MIN-MAX (e.g. 1-4): elastic, it starts on as many as the cluster can place (at least "
                       "MIN) and a worker-group restart (a lost node) takes as many as it can then, the run's data "
                       "streams shared among them (a number of them that every size in the range divides), so the "
                       "global batches stay the same" if elastic else ""))
    s.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   default=dv["placement_strategy"], help="how the workers are placed over the cluster's nodes: "
                   "PACK fills a node first, SPREAD puts them on different nodes where it can")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    s.add_argument("--cpus-per-worker", type=float, default=dv["cpus_per_worker"],
                   help="CPUs reserved per worker (0 = auto; leaves some for Ray Data)")
    s.add_argument("--threads-per-worker", type=int, default=dv["threads_per_worker"],
                   help="torch threads per worker (0 = auto)")
    s.add_argument("--max-failures", type=int, default=dv["max_failures"],
                   help="worker-group restarts from the last checkpoint")
    s.add_argument("--address", default=dv["address"],
                   help="Ray cluster to join (default: RAY_ADDRESS, set by `ray job "
                   "submit`; unset: a private embedded Ray on 127.0.0.1)")
    s.add_argument("--num-cpus", type=int, default=dv["num_cpus"], help="CPUs of the embedded local Ray (0 = all)")
    s.add_argument("--object-store-mb", type=int, default=dv["object_store_mb"],
                   help="object store of the embedded local Ray")
    c = p.add_argument_group("checkpoints, samples, tracking")
    c.add_argument("--storage-path", default=dv["storage_path"],
                   help="where Ray Train keeps run dirs and checkpoints (local or s3://)")
    c.add_argument("--name", default=dv["name"],
                   help="run name (default: from the preset and the start time); reuse it to resume")
    c.add_argument("--resume", default=dv["resume"],
                   help="a run dir, a Ray checkpoint dir, or mlflow:RUN_ID to continue from")
    c.add_argument("--checkpoint-every", type=int, default=dv["checkpoint_every"],
                   help="checkpoint + Ray report every N steps")
    c.add_argument("--keep-checkpoints", type=int, default=dv["keep_checkpoints"], help="checkpoints kept")
    c.add_argument("--sample-every", type=int, default=dv["sample_every"], help="sample grid every M steps (0 = off)")
    c.add_argument("--log-every", type=int, default=dv["log_every"], help="status line every N steps")
    c.add_argument("--mlflow-uri", default=dv["mlflow_uri"],
                   help="MLflow tracking URI: http://host:port or sqlite:///path/mlflow.db")
    c.add_argument("--experiment", default=dv["experiment"], help="MLflow experiment")
    return {"optimisation": t, "distribution": s, "tracking": c}


def workers(text: str) -> int | tuple[int, int]:
    """--num-workers N, or MIN-MAX for an elastic run."""
    import argparse
    lo, sep, hi = text.partition("-")
    try:
        n = (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of workers, or MIN-MAX (e.g. 1-4)") from None
    if isinstance(n, tuple) and not 1 <= n[0] <= n[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN-MAX with 1 <= MIN <= MAX")
    return n


def options_from(cls, args, **explicit):
    """`cls(...)` from parsed arguments whose names match its fields; `explicit` for the ones that differ. A
    password in --mlflow-uri moves to MLFLOW_TRACKING_PASSWORD (never logged)."""
    from pipeline.common.tracking import credentials_to_env
    names = set(cls.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in names}
    if isinstance(kw.get("num_workers"), tuple):  # MIN-MAX: elastic
        kw["min_workers"], kw["num_workers"] = kw["num_workers"]
    kw.update(explicit)
    if kw.get("mlflow_uri"):
        kw["mlflow_uri"] = credentials_to_env(kw["mlflow_uri"])
    return cls(**kw)
