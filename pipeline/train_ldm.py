"""Driver of jobs/train_ldm.py: check the cache against the config, open the MLflow run, read the cache
with Ray Data and run the Ray Train TorchTrainer (workers: pipeline/ldm_worker.py), then register the
exported model."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ldm.config import ConfigError, config_hash, flatten, format_config, load_config, to_dict
from pipeline import storage
from pipeline.latent_cache import part_files, read_manifest
from pipeline.models import text_encoder_path
from pipeline.checkpoints import list_checkpoints
from pipeline.errors import DataError
from pipeline.tracking import open_or_continue_run, redact, register_version
from pipeline.train_config import TrainOptions, load_deepspeed_preset


class CacheConfigMismatch(ConfigError):
    pass


def check_cache(cfg, manifest: dict, cache: str) -> None:
    want = config_hash(cfg.autoencoder)
    have = manifest["autoencoder"]["config_hash"]
    if want != have:
        theirs = manifest["autoencoder"]["config"]
        diff = {k: (theirs.get(k), v) for k, v in to_dict(cfg.autoencoder).items() if theirs.get(k) != v}
        raise CacheConfigMismatch(
            f"the latent cache {cache} was encoded with autoencoder config {have} but the training config's "
            f"autoencoder is {want}; differing keys (cache, config): {diff}. Train with the preset/overrides the "
            f"cache was made with (e.g. autoencoder.KEY=VALUE) or re-encode with this autoencoder")
    c = manifest["latent_shape"][0]
    if cfg.unet.out_channels != c:
        raise CacheConfigMismatch(f"cache latents have {c} channels but unet.out_channels={cfg.unet.out_channels}")
    levels = len(cfg.unet.channel_mult) - 1
    if manifest["latent_shape"][1] % (2 ** levels):
        raise CacheConfigMismatch(f"latent size {manifest['latent_shape'][1:]} is not divisible by 2^{levels} "
                                  f"(the UNet's downsampling); change unet.channel_mult or --resolution")
    text = manifest.get("text_encoder", {})
    if cfg.conditioning.kind == "text":
        if text.get("kind") != "hf":
            raise CacheConfigMismatch(f"the config is text-conditional but the cache {cache} holds no caption tokens "
                                      f"(encoded with --text-encoder none)")
        if cfg.conditioning.text_encoder == "hf" and text.get("dim") != cfg.unet.context_dim:
            raise CacheConfigMismatch(f"cache text encoder width {text.get('dim')} != unet.context_dim "
                                      f"{cfg.unet.context_dim}; set unet.context_dim={text.get('dim')}")
        if text.get("max_length") != cfg.conditioning.max_length:
            raise CacheConfigMismatch(f"cache tokens have length {text.get('max_length')} but "
                                      f"conditioning.max_length={cfg.conditioning.max_length}; set "
                                      f"conditioning.max_length={text.get('max_length')}")
    if manifest["counts"]["kept"] == 0:
        raise CacheConfigMismatch(f"the latent cache {cache} holds no rows")


def check_launch(opts: TrainOptions, manifest: dict) -> None:
    """What the manifest already tells before any worker starts: a batch no worker can fill, a first stage for
    the sample grids that is not the one the cache was encoded with."""
    rows, world = manifest["counts"]["kept"], opts.num_workers
    if rows // world < opts.batch_size:
        raise DataError(f"--batch-size {opts.batch_size} is larger than a worker's share of the cache ({rows} rows / "
                        f"{world} worker(s) = {rows // world}); lower --batch-size or --num-workers, or add data")
    if opts.autoencoder and opts.autoencoder != manifest["autoencoder"]["source"]:
        from pipeline.models import first_stage_key, load_autoencoder
        have = load_autoencoder(opts.autoencoder, tracking_uri=opts.mlflow_uri).identity
        want = manifest["autoencoder"]
        if first_stage_key(have) != first_stage_key(want):
            raise CacheConfigMismatch(
                f"--autoencoder {opts.autoencoder} (config {have['config_hash']}, weights {have['weights_sha256']}) is "
                f"not the first stage the cache {opts.latents} was encoded with ({want['source']}: config "
                f"{want['config_hash']}, weights {want['weights_sha256']}); its samples would be decoded wrongly. "
                f"Leave --autoencoder out to use the cache's own, or re-encode with this one")


def default_prompts(files: list[str], n: int = 8) -> list[str]:
    import io

    import pyarrow.parquet as pq
    seen: list[str] = []
    for f in files:
        t = pq.read_table(io.BytesIO(storage.read_bytes(f)), columns=["caption"])
        for c in t["caption"].to_pylist():
            if c and c not in seen:
                seen.append(c)
            if len(seen) >= n:
                return seen
    return seen


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


def run_train(opts: TrainOptions, log=print) -> dict:
    import ray

    from pipeline.ldm_worker import train_loop_per_worker
    from pipeline.runtime import fit, init_ray, quiet_data_progress, worker_resources

    cfg = load_config(opts.preset, opts.config_yaml, list(opts.overrides))
    manifest = read_manifest(opts.latents)
    check_cache(cfg, manifest, opts.latents)
    scale = cfg.scale_factor or manifest["totals"]["scale_factor"]
    shift = 0.0 if cfg.scale_factor else float(sum(manifest["totals"]["latent_channel_mean"]) /
                                              len(manifest["totals"]["latent_channel_mean"]))
    files = part_files(opts.latents, manifest)
    text_id = manifest.get("text_encoder", {})
    text_path = opts.text_encoder or text_encoder_path(text_id)
    cached_emb = bool(text_id.get("embeddings")) and cfg.conditioning.text_encoder == "hf"
    prompts = list(opts.sample_prompts)
    if not prompts:
        prompts = ([str(i) for i in range(cfg.conditioning.num_classes)] if cfg.conditioning.kind == "class"
                   else default_prompts(files))
    storage_path, name, resume_from = resolve_resume(opts.resume, opts.storage_path, opts.name, opts.mlflow_uri)
    name = name or f"ldm-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = storage_path if storage.is_remote(storage_path) else str(Path(storage_path).resolve())
    run_dir = storage.join(storage_path, name)
    precision = opts.precision if opts.precision != "auto" else ("bf16" if opts.use_gpu else "fp32")
    load_deepspeed_preset(opts.zero_stage, opts.deepspeed_config or None)  # fail early on a bad file
    check_launch(opts, manifest)

    log("[train] config:\n" + format_config(cfg))
    log("[train] options: " + ", ".join(f"{k}={redact(str(v))}" for k, v in asdict(opts).items()
                                        if v not in ("", (), None)))
    log(f"[train] cache {opts.latents}: {manifest['counts']['kept']} rows in {len(files)} parts, latent "
        f"{manifest['latent_shape']}, scale {scale:.5f}, shift {shift:.5f}; conditioning "
        f"{cfg.conditioning.kind}/{cfg.conditioning.text_encoder}{' (cached embeddings)' if cached_emb else ''}")

    run_id = ""
    if opts.mlflow_uri:
        run_id = open_mlflow_run(opts, cfg, run_dir, manifest, scale, shift, log)

    mode = init_ray(opts.num_cpus or None, opts.object_store_mb, address=opts.address, log=log)
    cpus, threads = worker_resources(opts.num_workers, opts.use_gpu, opts.cpus_per_worker, opts.threads_per_worker,
                                     local=mode == "local")
    columns = ["latent_mean", "latent_std"]
    if cfg.conditioning.kind == "text":
        columns += ["input_ids", "attention_mask"] + (["text_emb"] if cached_emb else [])
    if cfg.conditioning.kind == "class":
        columns.append("label")
    with quiet_data_progress():
        ds = ray.data.read_parquet(files, shuffle=ray.data.FileShuffleConfig(seed=opts.seed)).select_columns(columns)
    worker_cfg = {
        "ldm": to_dict(cfg),
        "train": {**asdict(opts), "precision": precision, "mlflow_run_id": run_id, "resume_from": resume_from,
                  "latent_shape": manifest["latent_shape"], "scale_factor": scale, "shift_factor": shift,
                  "sample_prompts": prompts, "autoencoder": opts.autoencoder or manifest["autoencoder"]["source"],
                  "autoencoder_identity": manifest["autoencoder"], "text_encoder_identity": text_id,
                  "text_encoder": text_path, "cached_embeddings": cached_emb, "threads_per_worker": threads,
                  "known_checkpoints": list_checkpoints(run_dir)},
    }
    log(f"[train] ray {mode}: {opts.num_workers} worker(s) x {cpus:g} CPU ({threads} threads), ZeRO-{opts.zero_stage} "
        f"{precision}, run dir {run_dir}")
    t0 = time.time()
    result = fit(train_loop_per_worker, worker_cfg, num_workers=opts.num_workers, use_gpu=opts.use_gpu, cpus=cpus,
                 storage_path=storage_path, name=name, keep_checkpoints=opts.keep_checkpoints,
                 max_failures=opts.max_failures, datasets={"train": ds})
    metrics = result.metrics or {}
    summary = {"run_dir": run_dir, "name": name, "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "step": metrics.get("step"), "loss": metrics.get("loss"), "images_seen": metrics.get("images_seen"),
               "skipped_steps": metrics.get("skipped_steps"), "seconds": round(time.time() - t0, 1),
               "mlflow_run_id": run_id}
    if result.checkpoint:
        summary["export"] = storage.join(result.checkpoint.path, "export", "model.safetensors")
    if opts.mlflow_uri and run_id:
        summary["model_version"] = register(opts, cfg, run_id, log)
    log(f"[train] done: step {summary['step']}, {summary['images_seen']} images, final loss "
        f"{summary['loss']:.4f}, {summary['seconds']} s; export {summary.get('export')}")
    return summary


def open_mlflow_run(opts: TrainOptions, cfg, run_dir: str, manifest: dict, scale: float, shift: float, log) -> str:
    """A new MLflow run with the full config as params, or the run this run dir already has (resume)."""
    params = {f"ldm.{k}": v for k, v in flatten(to_dict(cfg))}
    params.update({f"train.{k}": v for k, v in asdict(opts).items()})
    params.update({"cache.autoencoder_config_hash": manifest["autoencoder"]["config_hash"],
                   "cache.autoencoder_weights": manifest["autoencoder"]["weights_sha256"],
                   "cache.rows": manifest["counts"]["kept"], "latent.scale_factor": scale, "latent.shift": shift})
    return open_or_continue_run(opts.mlflow_uri, opts.experiment, run_dir, params,
                                {"latent_cache": opts.latents, "preset": cfg.name}, log)


def register(opts: TrainOptions, cfg, run_id: str, log) -> str | None:
    return register_version(opts.mlflow_uri, run_id, opts.register_model or f"ldm-{cfg.name}", log)
