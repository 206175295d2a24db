"""Driver of jobs/train_ldm.py: check the cache against the config, open the MLflow run, read the cache
with Ray Data and run the Ray Train TorchTrainer (workers: pipeline/train/ldm_loop.py), then register the
exported model."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import ray

from ldm.config import ConfigError, config_hash, flatten, format_config, to_dict
from ldm.kinds import CacheMismatch, kind_of
from ldm.latent_scale import LatentScale
from pipeline.cache.reader import (decoded_bytes, first_rows, part_buckets, part_files, part_rows, part_units,
                                   read_manifest)
from pipeline.common import storage
from pipeline.common.errors import DataError
from pipeline.common.models import text_encoder_path
from pipeline.common.precision import resolve as resolve_precision
from pipeline.common.tracking import open_or_continue_run, redact, register_version
from pipeline.presets import load_config
from pipeline.train.memory_plan import check_fits
from pipeline.train.options import TrainOptions, load_deepspeed_preset


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
    f, m = cfg.autoencoder.downsample_factor, cfg.autoencoder.downsample_factor * 2 ** levels
    odd = [b for b in manifest.get("totals", {}).get("buckets", {}) if any(int(v) % m for v in b.split("x"))]
    if odd:
        raise CacheConfigMismatch(f"aspect buckets {', '.join(odd)} of the cache {cache} are not multiples of {m} "
                                  f"pixels (f={f} x the UNet's 2^{levels} downsampling): re-encode with --bucket-step "
                                  f"{m}, or change unet.channel_mult")
    if manifest["counts"]["kept"] == 0:
        raise CacheConfigMismatch(f"the latent cache {cache} holds no rows")
    try:
        kind_of(cfg.conditioning.kind).check_cache(cfg, manifest, cache)
    except CacheMismatch as e:
        raise CacheConfigMismatch(str(e)) from None


def at_resolution(manifest: dict, resolution: int, cache: str) -> dict:
    """The manifest as training at `resolution` sees it: that resolution's latent shape (a multi-resolution cache,
    encoded with --resolutions), with `base_resolution` the first one, whose crops, buckets and statistics the
    others scale."""
    base = manifest["resolution"]
    if not resolution or resolution == base:
        return {**manifest, "base_resolution": base}
    shapes = manifest.get("latent_shapes", {})
    if str(resolution) not in shapes:
        have = ", ".join(str(r) for r in manifest.get("resolutions", [base]))
        raise CacheConfigMismatch(f"--resolution {resolution}: the cache {cache} holds latents at {have} px; encode "
                                  f"with --resolutions {base},{resolution} (one pass writes both)")
    k = resolution // base
    out = {**manifest, "resolution": resolution, "base_resolution": base, "latent_shape": shapes[str(resolution)]}
    if manifest["totals"].get("buckets"):
        buckets = {"x".join(str(int(v) * k) for v in b.split("x")): n for b, n in manifest["totals"]["buckets"].items()}
        out["totals"] = {**manifest["totals"], "buckets": buckets}
    return out


def check_launch(opts: TrainOptions, manifest: dict, rows: int | None = None) -> None:
    """What the manifest already tells before any worker starts: a batch no worker can fill (of the cache's rows,
    or of the `rows` that --filter keeps), a first stage for the sample grids that is not the one the cache was
    encoded with."""
    filtered = rows is not None
    rows, world = manifest["counts"]["kept"] if rows is None else rows, opts.data_streams or opts.num_workers
    if manifest["totals"].get("buckets") and not filtered:  # a batch is drawn from one aspect bucket
        rows = max(manifest["totals"]["buckets"].values())
        if rows // world < opts.batch_size:
            raise DataError(f"--batch-size {opts.batch_size}: a batch comes from one aspect bucket, and none holds a "
                            f"batch for each of {world} data stream(s) (rows per bucket: "
                            f"{manifest['totals']['buckets']}); lower --batch-size or --num-workers, or add data")
    if rows // world < opts.batch_size:
        what = (f"the rows --filter '{opts.filter}' keeps" if opts.filter else
                f"the rows with a latent at {manifest['resolution']}px" if filtered else "the cache")
        raise DataError(f"--batch-size {opts.batch_size} is larger than a worker's share of {what} ({rows} rows / "
                        f"{world} data stream(s) = {rows // world}); lower --batch-size or --num-workers, or add data"
                        + (" or loosen the filter" if opts.filter else ""))
    if opts.eval_every:
        if not opts.eval_input:
            raise DataError("--eval-every needs --eval-input: held-out shards whose images and conditioning the "
                            "samples are scored against")
        from pipeline.data.sources import discover_shards
        discover_shards(opts.eval_input)  # names a missing or empty folder now, not inside a worker
    if opts.autoencoder and opts.autoencoder != manifest["autoencoder"]["source"]:
        from pipeline.common.models import first_stage_key, load_autoencoder
        have = load_autoencoder(opts.autoencoder, tracking_uri=opts.mlflow_uri).identity
        want = manifest["autoencoder"]
        if first_stage_key(have) != first_stage_key(want):
            raise CacheConfigMismatch(
                f"--autoencoder {opts.autoencoder} (config {have['config_hash']}, weights {have['weights_sha256']}) is "
                f"not the first stage the cache {opts.latents} was encoded with ({want['source']}: config "
                f"{want['config_hash']}, weights {want['weights_sha256']}); its samples would be decoded wrongly. "
                f"Leave --autoencoder out to use the cache's own, or re-encode with this one")


def sample_prompts(opts: TrainOptions, cfg, files: list[str], side: int) -> tuple:
    """The sample grids' conditions: --sample-prompts, else the kind's defaults from the cache's first rows."""
    if opts.sample_prompts:
        return tuple(opts.sample_prompts)
    kind = kind_of(cfg.conditioning.kind)
    rows = first_rows(files, list(kind.sample_columns), 512) if kind.sample_columns else []
    return tuple(kind.sample_prompts(cfg, rows, side))


@dataclass(frozen=True)
class Prepared:
    """What the driver works out from the options, the config and the cache before Ray starts."""
    opts: TrainOptions
    cfg: object
    manifest: dict
    scale: LatentScale
    prompts: tuple
    plan: object
    data: object
    cached_emb: bool
    init_sha256: str = ""                # --init-from's weights, recorded with the run


def prepare(opts: TrainOptions, log) -> Prepared:
    """Everything that can be checked before Ray starts: the config against the cache, the precision (resolved once:
    the run logs and exports the resolved value), the data plan, the resume target."""
    from pipeline.train import kit
    init = None
    if opts.init_from:  # the starting weights, and with them the config unless --preset names one
        from pipeline.train.init_weights import check_fits, load_init
        init = load_init(opts.init_from, opts.mlflow_uri)
    cfg = load_config(opts.preset or ("" if init else "demo"), opts.config_yaml, list(opts.overrides),
                      base=init.config if init else None)
    if init:
        check_fits(init, cfg)
        log(f"[train] initial weights from {opts.init_from} (sha256 {init.sha256[:16]}): {len(init.weights)} tensors")
    manifest = at_resolution(read_manifest(opts.latents), opts.resolution, opts.latents)
    check_cache(cfg, manifest, opts.latents)
    totals = manifest["totals"]
    scale = LatentScale.choose(cfg.scale_factor, totals["latent_channel_mean"], totals["scale_factor"],
                               totals.get("latent_channel_std"), per_channel=cfg.latent_norm == "channel",
                               published=manifest["autoencoder"].get("scaling_factor", 0.0))
    files = part_files(opts.latents, manifest)
    cached_emb = bool(manifest.get("text_encoder", {}).get("embeddings")) and cfg.conditioning.text_encoder == "hf"
    prompts = sample_prompts(opts, cfg, files, manifest["resolution"])
    plan = kit.plan_run(opts, f"ldm-{cfg.name}")
    load_deepspeed_preset(opts.zero_stage, opts.deepspeed_config or None)  # fail early on a bad file
    opts = replace(opts, precision=resolve_precision(opts.precision, cuda=opts.use_gpu),
                   flip_prob=flip_prob(opts, cfg, manifest, log))
    plan = resume_from(opts, plan, log)
    opts = replace(opts, data_streams=data_streams(opts, plan, log))
    data = train_data(opts, cfg, manifest, files, cached_emb, log)
    check_launch(opts, manifest, sum(data.filtered_rows) if data.filter else None)
    return Prepared(opts, cfg, manifest, scale, prompts, plan, data, cached_emb, init.sha256 if init else "")


def workers_text(opts) -> str:
    return f"{opts.min_workers}-{opts.num_workers}" if opts.min_workers else str(opts.num_workers)


def data_streams(opts: TrainOptions, plan, log) -> int:
    """The run's number of data streams (pipeline/train/epoch_plan.py Streams), fixed for the run so that it reads
    the same global batches on any number of workers: the checkpoint's when it continues one, else --data-streams,
    else --num-workers (elastic MIN-MAX: the least common multiple of MIN..MAX). Every worker hosts an equal share."""
    ckpt = plan.resume_from or (plan.known_checkpoints[0] if plan.known_checkpoints else "")
    saved = storage.read_json(storage.join(ckpt, "train_state.json"), {}) if ckpt and not plan.phase_start else {}
    sizes = range(opts.min_workers or opts.num_workers, opts.num_workers + 1)  # elastic: any of these
    streams = saved.get("data_streams") or saved.get("world") or opts.data_streams or math.lcm(*sizes)
    if opts.data_streams and opts.data_streams != streams:
        raise ValueError(f"--data-streams {opts.data_streams}: the run this continues reads {streams} data stream(s) "
                         f"(its data order); leave --data-streams out or pass {streams}")
    if any(streams % n for n in sizes):
        fit = [n for n in range(1, streams + 1) if streams % n == 0]
        raise DataError(f"--num-workers {workers_text(opts)} cannot share the run's {streams} data stream(s) equally: "
                        f"use {' or '.join(map(str, fit))} worker(s)" + ("" if saved else
                        " (or set --data-streams to a number that each of them divides)"))
    if opts.min_workers:
        log(f"[train] elastic: {workers_text(opts)} workers share {streams} data stream(s); a worker-group restart "
            f"takes as many workers as Ray can place then, and the global batch stays {streams} x "
            f"{opts.batch_size} x {opts.grad_accum}")
    elif saved.get("world", opts.num_workers) != opts.num_workers:
        log(f"[train] continuing a run of {saved['world']} worker(s) on {opts.num_workers}: its {streams} data "
            f"stream(s), {streams // opts.num_workers} per worker, keep the global batches and their order")
    return streams


def describe(p: Prepared, log) -> None:
    """The run's config, options and cache, printed in full at start."""
    opts, cfg, m = p.opts, p.cfg, p.manifest
    log("[train] config:\n" + format_config(cfg))
    log("[train] options: " + ", ".join(f"{k}={redact(str(v))}" for k, v in asdict(opts).items()
                                        if v not in ("", (), None)))
    log(f"[train] cache {opts.latents}: {m['counts']['kept']} rows in {len(p.data.files)} parts, latent "
        f"{m['latent_shape']}, {p.scale.describe()}; conditioning "
        f"{cfg.conditioning.kind}/{cfg.conditioning.text_encoder}{' (cached embeddings)' if p.cached_emb else ''}"
        + (f"; each sample mirrored with probability {opts.flip_prob:g} (cached flipped latents)"
           if opts.flip_prob > 0 else "")
        + (f"; aspect buckets (rows): {m['totals']['buckets']}, a batch from one bucket" if p.data.buckets else ""))


def run_train(opts: TrainOptions, log=print) -> dict:
    from pipeline.train import kit
    from pipeline.train.ldm_loop import LDMJob, train_loop_per_worker
    p = prepare(opts, log)
    opts, cfg, manifest, plan = p.opts, p.cfg, p.manifest, p.plan
    describe(p, log)
    run_id = open_mlflow_run(opts, cfg, plan, manifest, p.scale, log, p.init_sha256) if opts.mlflow_uri else ""
    res = kit.start_ray(opts, log)
    side = tuple(manifest["latent_shape"][1:])
    check_fits(cfg, opts, side, log)
    data = replace(p.data, keep=keep_parts(opts, p.data.files, list(p.data.columns),
                                           sum(p.data.filtered_rows or p.data.rows), log),
                   read_cpus=0.0 if opts.min_workers else 1.0)
    text_id = manifest.get("text_encoder", {})
    job = LDMJob(opts, cfg, kit.worker_run(plan, res, run_id), opts.precision, tuple(manifest["latent_shape"]),
                 p.scale, p.prompts, opts.autoencoder or manifest["autoencoder"]["source"], manifest["autoencoder"],
                 opts.text_encoder or text_encoder_path(text_id), text_id, data, plan.name)
    log(f"[train] ray {res.mode}: {workers_text(opts)} worker(s) x {res.cpus:g} CPU ({res.threads} threads), "
        f"ZeRO-{opts.zero_stage} {opts.precision}, run dir {plan.run_dir}")
    t0 = time.time()
    result = kit.fit(train_loop_per_worker, job, opts, plan, res, {})
    summary = summarize(result, plan, run_id, time.time() - t0)
    if opts.mlflow_uri and run_id:
        summary["model_version"] = register_version(opts.mlflow_uri, run_id, opts.register_model or f"ldm-{cfg.name}",
                                                    log, artifact=pyfunc_artifact(opts, run_id, summary, job, log))
        log_diffusers(opts, run_id, summary, log)
    log(f"[train] done: step {summary['step']}, {summary['images_seen']} images, final loss "
        f"{summary['loss']:.4f}, {summary['seconds']} s; export {summary.get('export')}")
    return summary


def flip_prob(opts: TrainOptions, cfg, manifest: dict, log) -> float:
    """--flip-prob resolved against the cache: auto (-1) is 0.5 where the cache has flipped latents and the condition
    is not spatial, else 0; an explicit probability the cache or the condition cannot honour is refused."""
    have = bool(manifest.get("preprocess", {}).get("flip_latents"))
    kind, p = cfg.conditioning.kind, opts.flip_prob
    spatial = kind_of(kind).spatial  # a condition laid out on the image: a flip would move it
    if p < 0:
        p = 0.5 if have and not spatial else 0.0
        if have and spatial:
            log(f"[train] the cache has flipped latents, but conditioning.kind={kind} is laid out on the image: "
                f"no flips (--flip-prob auto)")
        return p
    if p > 1:
        raise ValueError(f"--flip-prob {p} is a probability: 0..1 (or -1 for auto)")
    if p > 0 and not have:
        raise CacheConfigMismatch(f"--flip-prob {p} needs the latents of the mirrored images, but the cache "
                                  f"{opts.latents} was encoded without them: re-encode into a new --output with "
                                  f"--flip-latents (or --flip-prob 0)")
    if p > 0 and spatial:
        raise CacheConfigMismatch(f"--flip-prob {p}: conditioning.kind={kind} is laid out on the image and its "
                                  f"condition is not mirrored with it; use --flip-prob 0")
    return p


def units_of(labels: list[str]) -> tuple[tuple[int, ...], ...]:
    """The indices of the parts of each unit (a shard, or a shard's aspect bucket), in part order."""
    out: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return tuple(tuple(v) for v in out.values())


def train_data(opts: TrainOptions, cfg, manifest: dict, files: list[str], cached_emb: bool, log):
    """What the workers read: the parts, their rows, which parts make one unit (a shard's rows, read whole and in key
    order, whatever parts the encode job cut them into), the columns a step needs; with --filter, the rows of each
    part it keeps, counted here (parts it empties are left out) and logged clause by clause."""
    from pipeline.train.ldm_loop import TrainData
    from pipeline.train.row_filter import RowFilter, count_kept
    rows = part_rows(opts.latents, manifest)
    labels = part_units(manifest)
    k = manifest["resolution"] // manifest["base_resolution"]
    sizes = tuple((h * k, w * k) for h, w in part_buckets(manifest) or ())
    columns = tuple(stream_columns(cfg, cached_emb)) + (("latent_flip_mean", "latent_flip_std") if opts.flip_prob > 0
                                                        else ())
    flt = RowFilter.parse(opts.filter)
    rename = {}
    if k > 1:  # another resolution of a multi-resolution cache: its latents, read by the names a step knows
        r = manifest["resolution"]
        rename = {f"{c}_{r}": c for c in columns if c.startswith("latent_")}
        columns = tuple(f"{c}_{r}" if c.startswith("latent_") else c for c in columns)
        flt = flt.requiring(r)
    if not flt:
        return TrainData(tuple(files), tuple(rows), columns, False, buckets=sizes, units=units_of(labels))
    kept, removed = count_kept(flt, files, log)
    total = sum(rows)
    log(f"[train] rows that pass {flt}: {sum(kept)} of {total} ({sum(kept) / max(1, total):.1%}); removed by each "
        f"clause (a null fails): " + ", ".join(f"{c}: {n}" for c, n in removed.items()))
    if not sum(kept):
        raise DataError(f"--filter {flt} keeps no row of the cache {opts.latents}: loosen it")
    on = [i for i, n in enumerate(kept) if n]
    return TrainData(tuple(files[i] for i in on), tuple(rows[i] for i in on), columns, False, str(flt),
                     tuple(kept[i] for i in on), tuple(sizes[i] for i in on) if sizes else (), tuple(rename.items()),
                     k, units_of([labels[i] for i in on]))


def resume_from(opts: TrainOptions, plan, log):
    """--resume-from: a new phase (e.g. 256 -> 512 px) that starts from another run's latest checkpoint, its weights,
    optimizer, EMA and step carried over and the data position restarted; a rerun of the phase, whose run dir has
    checkpoints of its own by then, continues from those instead."""
    if not opts.resume_from:
        return plan
    from pipeline.train import kit
    from pipeline.train.checkpoints import list_checkpoints
    if opts.resume:
        raise ValueError("--resume continues a run, --resume-from starts a new phase from another run: give one")
    if plan.known_checkpoints:
        log(f"[train] --resume-from {opts.resume_from}: this run dir has checkpoints of its own; continuing it")
        return plan
    parent, name, ckpt = kit.resolve_resume(opts.resume_from, opts.storage_path, "", opts.mlflow_uri)
    if not ckpt:  # a run dir: its newest checkpoint
        found = list_checkpoints(storage.join(parent, name))
        if not found:
            raise FileNotFoundError(f"--resume-from {opts.resume_from}: that run has no checkpoint yet")
        ckpt = found[0]
    log(f"[train] a new phase from {ckpt}: its weights, optimizer, EMA and step carried over, the data position "
        f"restarted")
    return replace(plan, resume_from=ckpt, phase_start=True)


def keep_parts(opts: TrainOptions, files: list[str], columns: list[str], rows: int, log) -> bool:
    """--in-memory: whether each worker keeps the parts it has read (later epochs read no file); auto: when the
    decoded cache times the workers fills at most a quarter of the cluster's memory."""
    if opts.in_memory != "auto":
        return opts.in_memory == "yes"
    est = decoded_bytes(files, columns, rows)
    memory = ray.cluster_resources().get("memory", 0)
    keep = est * opts.num_workers <= memory / 4
    log(f"[train] the cache's columns decode to about {est / 2 ** 20:.0f} MiB: "
        + ("each worker keeps the parts it reads (--in-memory no streams them every epoch)" if keep else
           f"streamed every epoch (x{opts.num_workers} workers is more than a quarter of the cluster's "
           f"{memory / 2 ** 30:.1f} GiB)"))
    return keep


def pyfunc_artifact(opts: TrainOptions, run_id: str, summary: dict, job, log) -> str:
    """The run's artifact folder to register: the export as an MLflow pyfunc model (`pyfunc/`), or, should that
    fail to be written, the plain export (`model/`) with a warning."""
    if not summary.get("export"):
        return "model"
    from pipeline.export.pyfunc import log_pyfunc
    try:
        log_pyfunc(opts.mlflow_uri, run_id, summary["export"], job.autoencoder)
        return "pyfunc"
    except Exception as e:  # noqa: BLE001 - the trained model is safe in the checkpoint and in model/
        log(f"[mlflow] WARNING: the pyfunc model could not be written ({type(e).__name__}: {e}); registering the "
            f"plain export (model/) instead")
        return "model"


def log_diffusers(opts: TrainOptions, run_id: str, summary: dict, log) -> None:
    """The export as a diffusers folder beside it in MLflow (`diffusers/`), where the model has a pipeline (a text
    kind with a frozen text encoder); otherwise the reason, once."""
    if not summary.get("export"):
        return
    import tempfile

    import mlflow

    from pipeline.export.formats import export_model
    try:
        with tempfile.TemporaryDirectory() as d:
            export_model(summary["export"], "diffusers", f"{d}/diffusers", tracking_uri=opts.mlflow_uri, log=log)
            mlflow.MlflowClient(opts.mlflow_uri).log_artifacts(run_id, f"{d}/diffusers", "diffusers")
    except ValueError as e:  # a kind without a diffusers pipeline: its export is the model
        log(f"[mlflow] no diffusers folder: {e}")
    except Exception as e:  # noqa: BLE001 - the trained model is safe in the checkpoint and registered already
        log(f"[mlflow] WARNING: the diffusers folder could not be written ({type(e).__name__}: {e}); "
            f"`jobs/export.py --model {summary['export']} --format diffusers` writes it later")


def stream_columns(cfg, cached_emb: bool) -> list[str]:
    """The cache columns a training step reads: the posterior, and what the conditioning kind needs."""
    columns = ["latent_mean", "latent_std", *kind_of(cfg.conditioning.kind).columns(cfg, cached_emb)]
    if cfg.unet.micro_cond:  # SDXL micro-conditioning: each row's original size and crop offsets
        columns += ["orig_h", "orig_w", "crop_top", "crop_left"]
    return columns


def summarize(result, plan, run_id: str, seconds: float) -> dict:
    from pipeline.train import kit
    metrics = result.metrics or {}
    summary = {"run_dir": plan.run_dir, "name": plan.name, "mlflow_run_id": run_id, "seconds": round(seconds, 1),
               "checkpoint": kit.checkpoint_uri(result, plan),
               "samples_per_s": metrics.get("steady_samples_per_s"),
               # rank 0's reads: part files read from storage, epochs begun or resumed by this run's workers
               "parts_read": metrics.get("parts_read"), "epochs_begun": metrics.get("epochs_begun")}
    summary.update({k: metrics.get(k) for k in ("step", "loss", "images_seen", "skipped_steps")})
    if result.checkpoint:
        summary["export"] = storage.join(summary["checkpoint"], "export", "model.safetensors")
    return summary


def open_mlflow_run(opts: TrainOptions, cfg, plan, manifest: dict, scale: LatentScale, log,
                    init_sha256: str = "") -> str:
    """A new MLflow run with the full config as params, or the run this run dir already has (resume); a new phase
    (--resume-from) is filed under the run it continues (mlflow.parentRunId), so the curriculum is one lineage."""
    run_dir, parent, tags = plan.run_dir, "", {}
    if plan.phase_start:
        src = plan.resume_from.rstrip("/").rsplit("/", 1)[0]  # the checkpoint's run dir
        marker = storage.join(src, "mlflow_run_id")
        parent = storage.read_bytes(marker).decode().strip() if storage.exists(marker) else ""
        tags = {"phase_of": src, "phase_start_checkpoint": plan.resume_from}
    params = {f"ldm.{k}": v for k, v in flatten(to_dict(cfg))}
    params.update({f"train.{k}": v for k, v in asdict(opts).items()})
    params.update({"cache.autoencoder_config_hash": manifest["autoencoder"]["config_hash"],
                   "cache.autoencoder_weights": manifest["autoencoder"]["weights_sha256"],
                   "cache.rows": manifest["counts"]["kept"], "latent.scale_factor": str(scale.scale),
                   "latent.shift": str(scale.shift), "resolution": manifest["resolution"]})
    return open_or_continue_run(opts.mlflow_uri, opts.experiment, run_dir, params,
                                {"latent_cache": opts.latents, "preset": cfg.name, **tags,
                                 **({"init_from": opts.init_from, "init_from_sha256": init_sha256} if init_sha256
                                    else {})}, log, parent_run_id=parent)
