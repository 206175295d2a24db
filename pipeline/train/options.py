"""Training options of jobs/train_ldm.py (a frozen dataclass, printed and logged in full) and the DeepSpeed
JSON presets in infra/deepspeed/."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_deepspeed_preset(stage: int, override_path: str | None = None) -> dict:
    """infra/deepspeed/zero{stage}.json, deep-merged with a user JSON file; `_comment` keys dropped."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {stage}")
    cfg = json.loads((DEEPSPEED_DIR / f"zero{stage}.json").read_text())
    if override_path:
        p = Path(override_path)
        if not p.exists():
            raise FileNotFoundError(f"--deepspeed-config {override_path} does not exist")
        try:
            cfg = _merge(cfg, json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed-config {override_path} is not valid JSON: {e}") from e
        cfg["zero_optimization"]["stage"] = stage
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0 - (1.0 - min_ratio) * p  # linear
    return fn


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every Ray Train job here shares: model preset, schedule, checkpoints, Ray resources, MLflow."""
    preset: str = "demo"
    config_yaml: str = ""
    overrides: tuple[str, ...] = ()
    num_workers: int = 1                 # with min_workers: the most (Ray Train elastic)
    min_workers: int = 0                 # > 0: elastic, between min_workers and num_workers (LDM job only)
    placement_strategy: str = "PACK"     # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray Train workers over nodes)
    max_steps: int = 1000
    batch_size: int = 32                 # LDM: per data stream, per micro-step; stage 1: per worker
    lr: float = 1e-4
    lr_schedule: str = "constant"        # constant | cosine | linear (after warm-up)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.9999
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10
    shuffle_buffer: int = 1000           # LDM: rows per shuffled window of the epoch plan; stage 1: Ray Data's buffer
    in_memory: str = "auto"              # auto | yes | no: LDM: workers keep the parts read; stage 1: object store
    seed: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 0.0         # 0 = auto
    threads_per_worker: int = 0          # 0 = auto
    max_failures: int = 3
    storage_path: str = "runs"
    name: str = ""
    resume: str = ""
    mlflow_uri: str = ""
    experiment: str = ""
    register_model: str = ""
    address: str = ""                    # Ray cluster to join; "" = RAY_ADDRESS, else a private embedded Ray
    num_cpus: int = 0                    # embedded Ray only
    object_store_mb: int = 512


@dataclass(frozen=True, kw_only=True)
class TrainOptions(RunOptions):
    latents: str
    preset: str = ""                     # "" = demo, or with init_from the imported model's own config
    init_from: str = ""                  # initial weights: an SD diffusers folder / single file, or an export
    zero_stage: int = 2
    precision: str = "auto"              # auto: bf16 on GPU, fp32 on CPU; fp32 | bf16 | autocast
    offload: bool = False
    compile: bool = False                # torch.compile the UNet (pays on a GPU: docs/benchmarks.md, bench/mfu.py)
    deepspeed_config: str = ""
    grad_accum: int = 1
    data_streams: int = 0                # the data order's streams, fixed for a run: 0 = the checkpoint's, else workers
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_every: int = 1
    posthoc_ema: tuple[float, ...] = ()  # EDM2 power-function EMA profiles (sigma_rel) snapshotted at checkpoints
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 50
    cfg_scale: float = 5.0
    sample_seed: int = 0
    eval_every: int = 0                  # FD/KID of samples every N steps (0 = off); needs eval_input
    eval_samples: int = 200
    eval_input: str = ""                 # held-out shards for eval_every
    autoencoder: str = ""                # for sample grids; default: the cache's autoencoder source
    text_encoder: str = ""               # frozen encoder folder; default: the cache's
    nan_tolerance: int = 5
    filter: str = ""                     # train-time row filter on the cache's LAION columns (row_filter.py)
    flip_prob: float = -1.0              # per-sample left-right flip from the cached flipped latents; -1 = auto
    resolution: int = 0                  # train on this resolution of a multi-resolution cache; 0 = its first
    resume_from: str = ""                # start a new phase from another run's latest checkpoint (curriculum)
    experiment: str = "train_ldm"
    register_model: str = ""             # registered model name ("" = ldm-<preset>)


@dataclass(frozen=True, kw_only=True)
class AETrainOptions(RunOptions):
    input: str
    eval_input: str = ""                 # held-out shards; default: the sibling test/ of a .../train input
    reg: str = ""                        # "" = the preset's; kl | vq
    f: int = 0                           # 0 = the preset's downsampling factor
    max_steps: int = 2000
    lr: float = 4.5e-6 * 32              # the paper's base lr x batch (App. G scaling)
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.0
    log_every: int = 50
    shuffle_buffer: int = 2000
    experiment: str = "train_autoencoder"
    eval_max_images: int = 2000
    eval_fd: bool = True
