"""Driver of jobs/train_autoencoder.py: stage-1 training (paper §3.1) on Ray Train, held-out evaluation,
MLflow tracking and registration (the `--compare-f` study of paper §4.1 that runs it per f is pipeline/compare_f.py)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict

from ldm.config import ConfigError, LDMConfig, apply_overrides, format_config, to_dict
from pipeline.presets import load_config
from pipeline.common import storage
from pipeline.train.options import AETrainOptions


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
    from pipeline.common.runtime import training_stream_context
    from pipeline.data.datasets import training_images
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.train import kit
    from pipeline.train.autoencoder_loop import AEJob, ae_train_loop

    cfg = stage1_config(opts)
    ae = cfg.autoencoder
    eval_input = opts.eval_input or default_eval_input(opts.input)
    tag = f"{ae.reg}-f{ae.downsample_factor}"
    plan = kit.plan_run(opts, f"ae-{cfg.name}-{tag}")
    log("[stage1] autoencoder config:\n" + format_config(ae) + "\n[stage1] loss config:\n" + format_config(cfg.loss))
    log(f"[stage1] latent {ae.latent_shape} for {ae.resolution}px images (f={ae.downsample_factor}, "
        f"{3 * ae.resolution ** 2 / (ae.latent_shape[0] * ae.latent_shape[1] ** 2):.1f}x fewer numbers)")
    run_id = open_mlflow_run(opts, cfg, plan.run_dir, tag, parent_run_id, log) if opts.mlflow_uri else ""
    res = kit.start_ray(opts, log)
    with training_stream_context():
        ds = training_images(opts.input, PreprocessConfig(resolution=ae.resolution)).select_columns(["image"])
        ds = kit.keep_in_memory(ds, opts.in_memory, "stage1", log)
    job = AEJob(opts, ae, cfg.loss, kit.worker_run(plan, res, run_id))
    log(f"[stage1] ray {res.mode}: {opts.num_workers} worker(s) x {res.cpus:g} CPU ({res.threads} threads), DDP; "
        f"run dir {plan.run_dir}")
    t0 = time.time()
    result = kit.fit(ae_train_loop, job, opts, plan, res, {"train": ds})
    export = storage.join(kit.checkpoint_uri(result, plan), "export", "autoencoder.safetensors")
    metrics = result.metrics or {}
    summary = {"run_dir": plan.run_dir, "name": plan.name, "export": export, "step": metrics.get("step"),
               "seconds": round(time.time() - t0, 1), "mlflow_run_id": run_id, "reg": ae.reg,
               "f": ae.downsample_factor, "latent_shape": list(ae.latent_shape),
               "samples_per_s": metrics.get("steady_samples_per_s")}
    if eval_input:
        summary["eval"] = evaluate_export(opts, export, eval_input, tag, summary["step"], run_id, log)
    if run_id:
        from pipeline.common.tracking import register_version
        summary["model_version"] = register_version(opts.mlflow_uri, run_id,
                                                    opts.register_model or f"ae-{cfg.name}-{tag}", log)
    log(f"[stage1] done: step {summary['step']} in {summary['seconds']} s; autoencoder {export}")
    return summary


def open_mlflow_run(opts: AETrainOptions, cfg: LDMConfig, run_dir: str, tag: str, parent_run_id: str, log) -> str:
    from pipeline.common.tracking import open_or_continue_run
    ae = cfg.autoencoder
    params = {f"autoencoder.{k}": v for k, v in to_dict(ae).items()}
    params.update({f"loss.{k}": v for k, v in to_dict(cfg.loss).items()})
    params.update({f"train.{k}": v for k, v in asdict(opts).items()})
    return open_or_continue_run(opts.mlflow_uri, opts.experiment, run_dir, params,
                                {"stage": "1", "reg": ae.reg, "f": str(ae.downsample_factor)}, log,
                                parent_run_id=parent_run_id)


def evaluate_export(opts: AETrainOptions, export: str, eval_input: str, tag: str, step, run_id: str, log) -> dict:
    """Held-out reconstruction quality of the exported autoencoder, logged as eval/* on the run."""
    from pipeline.common.models import load_autoencoder
    from pipeline.evaluate.metrics import evaluate_autoencoder, format_eval, shard_image_batches
    loaded = load_autoencoder(export)
    r = evaluate_autoencoder(loaded.model, shard_image_batches(eval_input, loaded.cfg.resolution), fd=opts.eval_fd,
                             max_images=opts.eval_max_images)
    log(format_eval(f"{tag} on {eval_input}", r))
    if run_id:
        import mlflow
        mlflow.MlflowClient(opts.mlflow_uri).log_batch(run_id, metrics=[
            mlflow.entities.Metric(f"eval/{k}", float(v), int(time.time() * 1000), step or 0) for k, v in r.items()])
    return r
