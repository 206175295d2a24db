"""Checkpoints of the Ray Train loops that are safe to load and that prove they are whole.

- Nothing in a checkpoint can run code: every torch file is read with `weights_only=True` (DeepSpeed's own
  loader included, which would otherwise unpickle anything), allowing only DeepSpeed's few plain-data types.
- Each rank seals what it wrote with a `seal-rank{r}.json` (size and sha256 of every file), written last. A
  checkpoint whose seals are missing or do not match is skipped with a warning that names the bad file, and the
  newest intact one is used instead; an explicit `--resume` checkpoint is used or refused, never replaced.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from pipeline.common import storage
from pipeline.common.errors import CheckpointError

SEAL = "seal-rank"


def _deepspeed_safe_types() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer states (ZeRO 1-3, fp32/bf16/fp16)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None):
    """torch.load that never executes code from the file; a file that needs more than weights is refused."""
    import pickle
    allowed = _deepspeed_safe_types()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        known = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
        wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in known]
        raise CheckpointError(f"{path} is not a plain weights file (it asks to run or build "
                              f"{', '.join(wanted) or 'objects'}); refusing to load it: only use checkpoints from a "
                              f"source you trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def harden_deepspeed(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with safe_load (its TorchCheckpointEngine uses
    weights_only=False, so a crafted model-states file would run code on resume)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)


def _files(d: str) -> list[str]:
    out = []
    for root, _, names in os.walk(d):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), d)
            if not os.path.basename(rel).startswith(SEAL):
                out.append(rel)
    return sorted(out)


def seal(d: str, rank: int, world: int, own: list[str] | None = None) -> None:
    """Written last by each rank into its checkpoint dir: what it wrote, so a reader can tell a whole checkpoint
    from a truncated, emptied or half-uploaded one."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(d, rel)), "sha256": storage.sha256_files(os.path.join(d, rel))}
             for rel in (own if own is not None else _files(d))}
    with open(os.path.join(d, f"{SEAL}{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "files": files}, f)


def verify(d: str, hashes: bool = True) -> list[str] | None:
    """Problems of the checkpoint in local dir `d` ([] = intact), or None when it has no seals (written before
    seals existed: it cannot be verified). `hashes=False` checks presence and sizes only."""
    seals = sorted(n for n in os.listdir(d) if n.startswith(SEAL) and n.endswith(".json"))
    if not seals:
        return None
    problems, world = [], None
    for name in seals:
        try:
            s = json.loads(open(os.path.join(d, name)).read())
            world = s["world"]
        except (ValueError, KeyError, OSError) as e:
            problems.append(f"{name} is unreadable ({type(e).__name__})")
            continue
        for rel, want in s["files"].items():
            p = os.path.join(d, rel)
            if not os.path.exists(p):
                problems.append(f"{rel} is missing")
            elif os.path.getsize(p) != want["bytes"]:
                problems.append(f"{rel} has {os.path.getsize(p)} bytes, {want['bytes']} were written")
            elif hashes and storage.sha256_files(p) != want["sha256"]:
                problems.append(f"{rel} does not match its sha256")
    if world is not None and len(seals) != world:
        problems.append(f"{len(seals)} of {world} ranks' seals present")
    return problems


def list_checkpoints(run_dir: str) -> list[str]:
    """A Ray Train run dir's checkpoints (local paths or s3:// URIs), newest first."""
    fs, path = storage.fs_and_path(run_dir)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    dirs = [e["name"] for e in entries if e.get("type") == "directory"
            and e["name"].rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")]
    return [storage.unstrip(fs, p, run_dir) for p in sorted(dirs, reverse=True)]


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Restore:
    """Where a worker group starts: the checkpoints (ray.train.Checkpoint) to try in order, and whether the user
    named the one to use."""
    candidates: tuple
    explicit: bool = False


def restore_plan(resume_from: str, known: list[str]) -> Restore:
    """Inside a worker: Ray Train's latest checkpoint when this very run saved it (a worker-group restart),
    then the explicit --resume checkpoint, else the run dir's checkpoints that existed at launch, newest first."""
    import ray.train
    from ray.train import Checkpoint
    latest = ray.train.get_checkpoint()
    fresh = [latest] if latest is not None and _name(latest.path) not in {_name(k) for k in known} else []
    if resume_from:
        return Restore(tuple(fresh + [Checkpoint(resume_from)]), explicit=True)
    return Restore(tuple(fresh + [Checkpoint(k) for k in known]))


@contextlib.contextmanager
def local_copy(ckpt):
    """A checkpoint as a local directory this process alone reads: the directory itself when it is local, else a
    private download removed afterwards. (Ray's `as_directory` shares one download per node between processes and
    deletes it when the last reader leaves; a rank that arrives as another leaves can read a file while it is
    deleted or downloaded again: a restart once read an empty train_state.json that way.)"""
    import pyarrow.fs
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    d = tempfile.mkdtemp(prefix="ldm-restore-")
    try:
        yield ckpt.to_directory(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def refuse_if_corrupt(resume_from: str) -> None:
    """In the driver: an explicit local --resume checkpoint with a missing or truncated file (a crash mid-write, a
    full disk) is refused before Ray starts, with the message a worker would give. Sizes only: the workers still
    hash every file as they load it, so a large checkpoint is not hashed twice; a remote one is checked by them."""
    if resume_from and not storage.is_remote(resume_from) and os.path.isdir(resume_from):
        problems = verify(resume_from, hashes=False)
        if problems:
            raise CheckpointError(corrupt(resume_from, problems) + "; pass another --resume checkpoint")


def corrupt(path: str, problems: list[str]) -> str:
    return f"checkpoint {path} is corrupt: {'; '.join(problems[:5])}"


def restore(plan: Restore, load, log) -> bool:
    """Load the first intact checkpoint of the plan with `load(local_dir)`; False when the plan is empty (a new
    run). Every rank checks the same seals, so all ranks choose the same checkpoint."""
    for i, ckpt in enumerate(plan.candidates):
        last = i == len(plan.candidates) - 1
        with local_copy(ckpt) as d:
            problems = verify(d)
            if problems:
                msg = corrupt(ckpt.path, problems)
                if plan.explicit and last:
                    raise CheckpointError(msg + "; pass another --resume checkpoint")
                log(f"[train] WARNING: {msg}; trying the next older checkpoint")
                continue
            if problems is None:
                log(f"[train] WARNING: checkpoint {ckpt.path} has no seals (written by an older version): "
                    f"not verified")
            load(d)
            return True
    if plan.candidates:
        raise CheckpointError(f"none of the {len(plan.candidates)} checkpoint(s) of this run is intact (see the "
                              f"warnings above); resume from another with --resume, or start over with a new --name")
    return False


def read_state(d: str, name: str = "train_state.json") -> dict:
    try:
        return json.loads(open(os.path.join(d, name)).read())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{os.path.join(d, name)} is unreadable ({type(e).__name__}: {e})") from None


def saved_world(d: str) -> int | None:
    """How many ranks wrote checkpoint `d` (its seals say; None when it has none)."""
    for name in sorted(os.listdir(d)):
        if name.startswith(SEAL) and name.endswith(".json"):
            return int(json.loads(open(os.path.join(d, name)).read())["world"])
    return None


def load_deepspeed(engine, d: str, world: int, log) -> str:
    """The engine's weights, optimizer state and LR schedule from checkpoint `d` (DeepSpeed tag 'ds'): directly when
    `world` ranks wrote it, else re-partitioned for this world size through DeepSpeed's universal checkpoint (ZeRO
    1-3; a ZeRO-0 optimizer is not partitioned and loads as it is)."""
    saved = saved_world(d) or world
    partitioned = bool(glob.glob(os.path.join(d, "ds", "*optim_states.pt")))
    if saved == world or not partitioned:
        path, _ = engine.load_checkpoint(d, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    else:
        log(f"[train] the checkpoint's DeepSpeed state was partitioned for {saved} rank(s): converting it to a "
            f"universal checkpoint to load it on {world}")
        with universal_copy(d) as u:
            engine._config.load_universal_checkpoint = True  # DeepSpeed's `checkpoint.load_universal`, for this load
            try:
                path, _ = engine.load_checkpoint(u, tag="ds", load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            finally:
                engine._config.load_universal_checkpoint = False
    if path is None:
        raise CheckpointError(f"{d} holds no DeepSpeed checkpoint 'ds'")
    return path


@contextlib.contextmanager
def universal_copy(d: str):
    """A private universal copy of checkpoint `d`'s DeepSpeed state (deepspeed.checkpoint.ds_to_universal), as a
    directory holding the tag 'ds'. The converter unpickles freely, so every file is first read with safe_load:
    one that would run code is refused before the converter sees it."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal
    for f in glob.glob(os.path.join(d, "ds", "*.pt")):
        safe_load(f, map_location="cpu")
    out = tempfile.mkdtemp(prefix="ldm-universal-")
    args = argparse.Namespace(input_folder=os.path.join(d, "ds"), output_folder=os.path.join(out, "ds"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # no tensor parallelism: the default info
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints a page per conversion
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - named for the user, with the way out
        raise CheckpointError(f"{d}: its DeepSpeed state cannot be re-partitioned for another world size "
                              f"({type(e).__name__}: {str(e)[:300]}); resume it with the number of workers that "
                              f"wrote it") from e
    try:
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
