"""Driver of jobs/train_autoencoder.py: stage-1 training (paper §3.1) on Ray Train, held-out evaluation,
MLflow tracking and registration, and the `--compare-f` sweep of paper §4.1 (one parent run, a child per f)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ldm.config import ConfigError, LDMConfig, apply_overrides, format_config, load_config, to_dict
from pipeline import storage
from pipeline.train_config import RunOptions


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


def ch_mult_for_f(f: int, base: tuple[int, ...]) -> tuple[int, ...]:
    """A channel multiplier list with log2(f) downsamplings, following the preset's pattern."""
    k = int(round(math.log2(f)))
    if 2 ** k != f or f < 1:
        raise ConfigError(f"--f must be a power of two (1, 2, 4, 8, 16, 32), got {f}")
    return tuple(base[: k + 1]) + (base[-1],) * max(0, k + 1 - len(base))


def stage1_config(opts: AETrainOptions) -> LDMConfig:
    cfg = load_config(opts.preset, opts.config_yaml, list(opts.overrides))
    extra = []
    if opts.reg:
        extra.append(f"autoencoder.reg={opts.reg}")
    if opts.f:
        extra.append(f"autoencoder.ch_mult={list(ch_mult_for_f(opts.f, cfg.autoencoder.ch_mult))}")
    cfg = apply_overrides(cfg, extra)
    ae = cfg.autoencoder
    if ae.resolution % ae.downsample_factor:
        raise ConfigError(f"resolution {ae.resolution} is not divisible by f={ae.downsample_factor}")
    return cfg


def default_eval_input(inp: str) -> str:
    base = inp.rstrip("/")
    if base.endswith("/train"):
        test = base[: -len("train")] + "test"
        if storage.exists(test):
            return test
    return ""


def run_train_autoencoder(opts: AETrainOptions, log=print, parent_run_id: str = "") -> dict:
    from pipeline.ae_worker import ae_train_loop
    from pipeline.checkpoints import list_checkpoints
    from pipeline.datasets import training_images
    from pipeline.preprocess import PreprocessConfig
    from pipeline.runtime import fit, init_ray, quiet_data_progress, worker_resources
    from pipeline.tracking import open_or_continue_run, register_version
    from pipeline.train_ldm import resolve_resume

    cfg = stage1_config(opts)
    ae = cfg.autoencoder
    eval_input = opts.eval_input or default_eval_input(opts.input)
    tag = f"{ae.reg}-f{ae.downsample_factor}"
    storage_path, name, resume_from = resolve_resume(opts.resume, opts.storage_path, opts.name, opts.mlflow_uri)
    name = name or f"ae-{cfg.name}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = storage_path if storage.is_remote(storage_path) else str(Path(storage_path).resolve())
    run_dir = storage.join(storage_path, name)
    log("[stage1] autoencoder config:\n" + format_config(ae) + "\n[stage1] loss config:\n" + format_config(cfg.loss))
    log(f"[stage1] latent {ae.latent_shape} for {ae.resolution}px images (f={ae.downsample_factor}, "
        f"{3 * ae.resolution ** 2 / (ae.latent_shape[0] * ae.latent_shape[1] ** 2):.1f}x fewer numbers)")
    run_id = ""
    if opts.mlflow_uri:
        params = {f"autoencoder.{k}": v for k, v in to_dict(ae).items()}
        params.update({f"loss.{k}": v for k, v in to_dict(cfg.loss).items()})
        params.update({f"train.{k}": v for k, v in asdict(opts).items()})
        run_id = open_or_continue_run(opts.mlflow_uri, opts.experiment, run_dir, params,
                                      {"stage": "1", "reg": ae.reg, "f": str(ae.downsample_factor)}, log,
                                      parent_run_id=parent_run_id)
    mode = init_ray(opts.num_cpus or None, opts.object_store_mb, address=opts.address, log=log)
    cpus, threads = worker_resources(opts.num_workers, opts.use_gpu, opts.cpus_per_worker, opts.threads_per_worker,
                                     local=mode == "local")
    with quiet_data_progress():
        ds = training_images(opts.input, PreprocessConfig(resolution=ae.resolution)).select_columns(["image"])
    worker_cfg = {"autoencoder": to_dict(ae), "loss": to_dict(cfg.loss),
                  "train": {**asdict(opts), "mlflow_run_id": run_id, "resume_from": resume_from,
                            "threads_per_worker": threads, "known_checkpoints": list_checkpoints(run_dir)}}
    log(f"[stage1] ray {mode}: {opts.num_workers} worker(s) x {cpus:g} CPU ({threads} threads), DDP; run dir {run_dir}")
    t0 = time.time()
    result = fit(ae_train_loop, worker_cfg, num_workers=opts.num_workers, use_gpu=opts.use_gpu, cpus=cpus,
                 storage_path=storage_path, name=name, keep_checkpoints=opts.keep_checkpoints,
                 max_failures=opts.max_failures, datasets={"train": ds})
    export = storage.join(result.checkpoint.path, "export", "autoencoder.safetensors")
    summary = {"run_dir": run_dir, "name": name, "export": export, "step": (result.metrics or {}).get("step"),
               "seconds": round(time.time() - t0, 1), "mlflow_run_id": run_id, "reg": ae.reg,
               "f": ae.downsample_factor, "latent_shape": list(ae.latent_shape)}
    if eval_input:
        from pipeline.evaluate import evaluate_autoencoder, format_eval, shard_image_batches
        from pipeline.models import load_autoencoder
        model = load_autoencoder(export).model
        r = evaluate_autoencoder(model, shard_image_batches(eval_input, ae.resolution), fd=opts.eval_fd,
                                 max_images=opts.eval_max_images)
        summary["eval"] = r
        log(format_eval(f"{tag} on {eval_input}", r))
        if run_id:
            import mlflow
            mlflow.MlflowClient(opts.mlflow_uri).log_batch(run_id, metrics=[
                mlflow.entities.Metric(f"eval/{k}", float(v), int(time.time() * 1000), summary["step"] or 0)
                for k, v in r.items()])
    if run_id:
        summary["model_version"] = register_version(opts.mlflow_uri, run_id,
                                                    opts.register_model or f"ae-{cfg.name}-{tag}", log)
    log(f"[stage1] done: step {summary['step']} in {summary['seconds']} s; autoencoder {export}")
    return summary


def run_compare_f(opts: AETrainOptions, factors: list[int], log=print) -> dict:
    """Paper §4.1: the same stage-1 recipe at several f; PSNR vs latent size, one MLflow parent run."""
    parent = ""
    if opts.mlflow_uri:
        import mlflow

        from pipeline.tracking import ensure_experiment
        client = mlflow.MlflowClient(opts.mlflow_uri)
        run = client.create_run(ensure_experiment(opts.mlflow_uri, opts.experiment),
                                run_name=f"compare-f {','.join(map(str, factors))}", tags={"sweep": "compare-f"})
        parent = run.info.run_id
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for f in factors:
        s = run_train_autoencoder(replace(opts, f=f, name=f"{opts.name or 'compare'}-{stamp}-f{f}",
                                          register_model=opts.register_model and f"{opts.register_model}-f{f}"),
                                  log, parent_run_id=parent)
        c, h, w = s["latent_shape"]
        row = {"f": f, "latent": f"{c}x{h}x{w}", "latent_numbers": c * h * w, "psnr": s.get("eval", {}).get("psnr"),
               "ssim": s.get("eval", {}).get("ssim"), "fd_effnet_lite0": s.get("eval", {}).get("fd_effnet_lite0"),
               "export": s["export"]}
        rows.append(row)
        if parent:
            metrics = [mlflow.entities.Metric(k, float(row[k]), int(time.time() * 1000), f)
                       for k in ("psnr", "ssim", "latent_numbers") if row[k] is not None]
            client.log_batch(parent, metrics=metrics)
    table = "| f | latent | numbers | PSNR dB | SSIM | FD-EffNetLite0 |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {r['f']} | {r['latent']} | {r['latent_numbers']} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | "
        f"{_fmt(r['fd_effnet_lite0'])} |" for r in rows)
    log("[compare-f] paper §4.1 trade-off on this data:\n" + table)
    if parent:
        client.log_text(parent, table, "compare_f.md")
        client.set_terminated(parent)
    return {"rows": rows, "parent_run_id": parent, "table": table}


def _fmt(v, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"
