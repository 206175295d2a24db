"""The encode pipeline, as a data flow:

  shard list ─ read (tasks) ─ decode+filter+resize (tasks) ─ encode (actor pool: frozen AE + text enc) ─┐
  driver: rows grouped by source shard → parts/<shard>.parquet + manifest.json (atomic) ←──────────────┘

Shards already complete in the manifest are skipped, so a rerun resumes; a bad shard is reported by
name in the manifest (`failed_shards`) and retried by the next run, the others go on.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace

from pipeline.cache.reader import part_files
from pipeline.common import storage
from pipeline.common.models import load_autoencoder, text_encoder_identity
from pipeline.common.precision import resolve as resolve_precision
from pipeline.common.runtime import job_actor_nodes
from pipeline.data.preprocess import PreprocessConfig
from pipeline.data.sources import discover_shards
from pipeline.encode.latent_cache import ShardLedger, write_parts


@dataclass(frozen=True)
class EncodeOptions:
    input: str
    output: str
    autoencoder: str
    autoencoder_preset: str = ""
    text_encoder: str = ""               # "" = offline MiniLM; "none" = no text; or an SD folder / single file
    tokenizers: tuple[str, ...] = ()     # a single-file SD checkpoint's tokenizer folders (it holds none)
    max_length: int = 77
    store_text_embeddings: bool = False
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    num_encoders: int = 0                # 0 = auto (encoder_pool): one per CPU on an embedded Ray without GPUs, else 1
    cpus_per_encoder: float = 0.0        # 0 = auto (encoder_pool): there, the CPUs a decode task leaves shared; else 1
    encoder_threads: int = 0             # torch threads per encoder actor; 0 = its reserved CPUs (at least 1)
    gpus_per_encoder: float = -1.0       # -1: 1 when the cluster has GPUs, else 0
    cpus_per_decoder: float = 0.5
    batch_size: int = 64
    precision: str = "auto"              # the encoders' arithmetic: auto = bf16 weights on a GPU, fp32 on a CPU
    compile: str = "auto"                # torch.compile the autoencoder: auto = on a GPU
    decode_batch_size: int = 64
    write_batch_size: int = 1024         # encoded rows per write task (a part holds one shard's rows of a batch)
    num_writers: int = 0                 # write tasks at once; 0 = as many as Ray Data schedules
    compact_seconds: float = 30.0        # how often the manifest is rewritten from the commit records
    max_shards: int = 0                  # 0 = all pending shards
    object_store_mb: int = 512
    num_cpus: int = 0                    # embedded Ray only; 0 = all
    address: str = ""                    # Ray cluster to join; "" = RAY_ADDRESS, else a private embedded Ray
    mlflow_uri: str = ""
    experiment: str = "encode_latents"


class EncodeFailed(RuntimeError):
    pass


def _fmt_eta(sec: float) -> str:
    sec = max(0, int(sec))
    return f"{sec // 3600:d}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def resolve_models(opts: EncodeOptions) -> EncodeOptions:
    """A Stable Diffusion single file given as the text encoder: the diffusers folder it converts to (once, with its
    tokenizers); given as the autoencoder too, that folder names both (in the manifest as well). An autoencoder alone
    reads its first stage from the file directly."""
    from pipeline.common.sd_import import is_sd, resolve_sd
    text = opts.text_encoder
    if text in ("", "none") or text.startswith(("mlflow-models:", "models:", "runs:")) or not is_sd(text):
        return opts
    folder = str(resolve_sd(text, opts.tokenizers))
    return replace(opts, text_encoder=folder, autoencoder=folder if opts.autoencoder == text else opts.autoencoder)


def check_preprocess(pre, res: int, f: int) -> None:
    """The preprocess settings against each other and the first stage's f, before anything is read."""
    if res % f:
        raise ValueError(f"--resolution {res} is not a multiple of the autoencoder's downsampling factor f={f}")
    k = pre.lowres_factor
    if k < 0 or (k and res % k):
        raise ValueError(f"--lowres-factor {k} must divide --resolution {res} (e.g. 4: a {res // 4}px low-res copy)")
    if pre.resize and pre.resize < res:
        raise ValueError(f"--resize {pre.resize} is smaller than --resolution {res}: the crop must fit inside the "
                         f"resized image (0 = resize to --resolution)")
    if pre.layout_boxes < 0:
        raise ValueError(f"--layout-boxes {pre.layout_boxes} must be >= 0 (boxes kept per image)")
    check_dedup(pre)
    check_buckets(pre, f)
    for r in pre.extra_resolutions:
        if r <= res or r % res:
            raise ValueError(f"--resolutions: {r} is not a multiple of the first resolution {res} (e.g. 256,512): "
                             f"each extra crop is the same region at k times the size")
    if pre.extra_resolutions and (pre.crop == "tile" or any(
            (pre.lowres_factor, pre.inpaint_variants, pre.label_maps, pre.layout_boxes))):
        raise ValueError("--resolutions with several sizes caches the latents only: not with --crop tile or a task's "
                         "condition (--lowres-factor, --inpaint-variants, --label-maps, --layout-boxes)")
    if pre.inpaint_variants < 0:
        raise ValueError(f"--inpaint-variants {pre.inpaint_variants} must be >= 0 (masks per image)")


def cache_header(opts: EncodeOptions, ae, layout: str) -> dict:
    """What the cache's manifest says of every row: the first stage's and text encoder's identities, the latent
    shape(s), the preprocess settings (and the aspect buckets)."""
    res, f, c = opts.preprocess.resolution, ae.cfg.downsample_factor, ae.cfg.embed_dim
    header = {"autoencoder": ae.identity, "text_encoder": text_encoder_identity(opts.text_encoder, opts.max_length,
                                                                               opts.store_text_embeddings),
              "resolution": res, "latent_shape": [c, res // f, res // f], "layout": layout,
              "preprocess": opts.preprocess.to_dict()}
    if opts.preprocess.extra_resolutions:  # a multi-resolution cache: latent_mean_R ... beside the first one's
        header["resolutions"] = [res, *opts.preprocess.extra_resolutions]
        header["latent_shapes"] = {str(r): [c, r // f, r // f] for r in header["resolutions"]}
    if opts.preprocess.bucket:
        from pipeline.data.buckets import buckets
        header["buckets"] = [list(b) for b in buckets(res, opts.preprocess.bucket_step, opts.preprocess.max_aspect)]
    return header


def run_encode(opts: EncodeOptions, log=print) -> dict:
    """Shards -> decode, filter, resize (CPU tasks) -> frozen encoders (an actor pool) -> cache parts + manifest.
    A rerun skips the shards already done."""
    import yaml

    from pipeline.common.tracking import redact
    log("[encode] options:\n" + yaml.safe_dump({**asdict(opts), "mlflow_uri": redact(opts.mlflow_uri)},
                                                sort_keys=False).rstrip())
    with storage.reaching(opts.input, "the input"):
        shard_set = discover_shards(opts.input)
    storage.check_writable(opts.output)
    opts = resolve_models(opts)
    ae = load_autoencoder(opts.autoencoder, opts.autoencoder_preset, opts.mlflow_uri)
    check_preprocess(opts.preprocess, opts.preprocess.resolution, ae.cfg.downsample_factor)
    header = cache_header(opts, ae, shard_set.layout)
    latent_shape = header["latent_shape"]
    ledger = ShardLedger(opts.output, header, opts.compact_seconds)
    todo = [s for s in shard_set.shards if s not in ledger.completed]
    already = len(shard_set.shards) - len(todo)
    if opts.max_shards:
        todo = todo[: opts.max_shards]
    log(f"[encode] {len(shard_set.shards)} {shard_set.layout} shards at {opts.input}: {already} already done, "
        f"{len(todo)} to encode -> {opts.output}  (latent {latent_shape}, autoencoder "
        f"{ae.identity['config_hash']}/{ae.identity['weights_sha256']})")
    swept = ledger.start(todo)
    if swept:
        log(f"[encode] removed {swept} file(s) of an interrupted run that no commit names")
    t0 = time.time()
    try:
        kept, precision = 0, ""
        if todo:
            opts, precision, records = encoded_records(opts, todo, shard_set.layout, log,
                                                       part_files(opts.output, ledger.manifest))
            kept = write_encoded(write_stage(records, opts, latent_shape[0], ledger.run), ledger, len(todo), log)
    finally:
        ledger.write_manifest()  # the commits so far, compacted, whatever happened
    ledger.sweep()  # parts of write tasks that Ray Data retried: written, but no commit names them
    summary = {**summarise_run(opts, ledger, len(shard_set.shards), len(todo), kept, time.time() - t0),
               "precision": precision}
    log(format_summary(summary))
    if opts.mlflow_uri:
        log_to_mlflow(opts, summary, ledger.manifest)
    return summary


def summarise_run(opts: EncodeOptions, ledger, shards: int, todo: int, kept: int, seconds: float) -> dict:
    """The run's summary: shards done and failed, throughput, the cache's totals, and the nodes that did the work."""
    m = ledger.manifest
    summary = {"output": opts.output, "shards_total": shards, "shards_done": len(m["completed_shards"]),
               "shards_failed": m["failed_shards"], "encoded_this_run": todo,
               "images_per_s": round(kept / max(1e-9, seconds), 2), "seconds": round(seconds, 1), **m["totals"],
               "nodes": {role: sorted(ids) for role, ids in ledger.nodes.items()}}
    if todo:
        pool = job_actor_nodes("MapWorker(MapBatches(LatentEncoder))")  # Ray Data's name for the pool's actors
        if pool:
            summary["nodes"]["encoder_pool"] = pool
    return summary


def check_dedup(pre: PreprocessConfig) -> None:
    from pipeline.data.dedup import BY, MODES
    if pre.dedup not in MODES:
        raise ValueError(f"--dedup {pre.dedup!r}: use one of {', '.join(MODES)}")
    if pre.dedup_by not in BY:
        raise ValueError(f"--dedup-by {pre.dedup_by!r}: use one of {', '.join(BY)}")
    if not 0 <= pre.dedup_distance <= 16:
        raise ValueError(f"--dedup-distance {pre.dedup_distance}: bits of the 64-bit phash two copies may differ in, "
                         f"0..16 (4 finds resized and recompressed copies)")


def check_buckets(pre: PreprocessConfig, f: int) -> None:
    if not pre.bucket:
        return
    if pre.bucket_step <= 0 or pre.bucket_step % f:
        raise ValueError(f"--bucket-step {pre.bucket_step} must be a positive multiple of the autoencoder's f={f} (and "
                         f"of f x 2^(UNet downsamplings) to train on: 64 for an f=8 autoencoder and a 4-level UNet)")
    if pre.resolution % pre.bucket_step:
        raise ValueError(f"--resolution {pre.resolution} is not a multiple of --bucket-step {pre.bucket_step}")
    spatial = [flag for flag, on in (("--lowres-factor", pre.lowres_factor), ("--inpaint-variants",
                                     pre.inpaint_variants), ("--label-maps", pre.label_maps),
                                     ("--layout-boxes", pre.layout_boxes)) if on]
    if spatial:
        raise ValueError(f"--bucket crops each image to its aspect bucket; {', '.join(spatial)} caches a square "
                         f"condition: encode without --bucket for that task")
    if pre.crop == "tile":
        raise ValueError("--bucket with --crop tile: a bucket's crop is the rounding left over (center or random)")


def start_dedup(pre: PreprocessConfig, done_files: list[str], log):
    """The run's DedupIndex actor, seeded with the fingerprints of the rows the cache already holds (a resumed run
    drops duplicates of them too)."""
    import ray
    import pyarrow.parquet as pq

    from pipeline.data.dedup import DedupIndex, caption_hash
    index = ray.remote(num_cpus=0)(DedupIndex).remote(pre.dedup, pre.dedup_distance)
    columns = ["key", "image_hash", "phash"] + (["caption"] if pre.dedup_by == "image+caption" else [])
    seeded, unknown, refs = 0, 0, []
    for f in done_files:
        fs, path = storage.fs_and_path(f)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if not set(columns) <= set(pf.schema_arrow.names):  # a part written before fingerprints were kept
                unknown += pf.metadata.num_rows
                continue
            t = pf.read(columns=columns)
        ns = [caption_hash(c) for c in t["caption"].to_pylist()] if "caption" in columns else [0] * len(t)
        refs.append(index.claim.remote(t["key"].to_pylist(), t["image_hash"].to_pylist(), t["phash"].to_pylist(), ns))
        seeded += len(t)
    ray.get(refs)
    log(f"[encode] dedup {pre.dedup} by {pre.dedup_by}" + (f" (phash within {pre.dedup_distance} bits)"
                                                           if pre.dedup == "near" else "")
        + f": the index holds the {seeded} row(s) already in the cache"
        + (f"; {unknown} row(s) of parts written before fingerprints were kept are not in it" if unknown else ""))
    return index


POOL_START_TIMEOUT_S = 600


@contextlib.contextmanager
def whole_pool_context(mode: str):
    """On a cluster (`mode`, as init_ray answered), the Dataset made inside (it keeps this context) starts its
    encoder pool whole before the first batch goes out (Ray Data's default starts the actors as they fit, and a pool
    the cluster cannot place waits forever): a pool that is not placed within POOL_START_TIMEOUT_S fails saying so.
    On the embedded Ray (one node) the actors start while the first shards decode, as by default: waiting would only
    add their start-up time."""
    if mode != "cluster":
        yield
        return
    import ray.data
    ctx = ray.data.DataContext.get_current()
    old = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s = old


def encoder_pool(opts: EncodeOptions, mode: str, cpus: float, gpus: float) -> EncodeOptions:
    """The options with the encoder pool resolved: its size, CPUs and torch threads per actor. Auto (0 for both) on the
    embedded Ray without GPUs: one single-threaded encoder per CPU, the actors sharing what one decode task leaves (on
    2 cores two one-thread actors encode faster beside the decode tasks than one actor of two threads, whose threads
    wait for each other whenever a decode task takes a core: docs/measurements.md). Elsewhere one encoder of 1 CPU:
    a cluster's pool is sized by its user (--num-encoders, --cpus-per-encoder)."""
    n, each = opts.num_encoders, opts.cpus_per_encoder
    if mode == "local" and gpus == 0 and not n and not each:
        n = max(1, int(cpus))
        each = round(max(0.1, (cpus - opts.cpus_per_decoder) / n), 3)
    n, each = n or 1, each or 1.0
    return replace(opts, num_encoders=n, cpus_per_encoder=each,
                   encoder_threads=opts.encoder_threads or max(1, int(each)))


def encoded_records(opts: EncodeOptions, shards: list[str], layout: str, log, done_files: list[str] = ()):
    """(the options with the encoder pool resolved; the encoders' precision, resolved on their device; the Ray Data
    chain: preprocessed records of `shards` (without duplicates of the cache's rows, `done_files`, or of each other,
    with --dedup), encoded by a pool of LatentEncoder actors)."""
    import ray

    from pipeline.common.runtime import init_ray
    from pipeline.data.datasets import preprocessed_records
    from pipeline.encode.encoder import LatentEncoder
    mode = init_ray(opts.num_cpus or None, opts.object_store_mb, address=opts.address, log=log)
    resources, gpus = ray.cluster_resources(), opts.gpus_per_encoder
    if gpus < 0:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    opts = encoder_pool(opts, mode, resources.get("CPU", 1), gpus)
    precision = resolve_precision(opts.precision, cuda=gpus > 0)
    log(f"[encode] ray: {mode}; {opts.num_encoders} encoder actor(s) x ({opts.cpus_per_encoder} CPU, "
        f"{gpus} GPU, {opts.encoder_threads} thread(s)), batch {opts.batch_size}, {precision}")
    dedup = start_dedup(opts.preprocess, list(done_files), log) if opts.preprocess.dedup != "off" else None
    with whole_pool_context(mode):
        ds = preprocessed_records(shards, layout, opts.preprocess, opts.cpus_per_decoder, opts.decode_batch_size,
                                  dedup)
    return opts, precision, ds.map_batches(
        LatentEncoder, batch_size=opts.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=opts.num_encoders), num_cpus=opts.cpus_per_encoder, num_gpus=gpus,
        fn_constructor_kwargs=dict(autoencoder=opts.autoencoder, autoencoder_preset=opts.autoencoder_preset,
                                   text_encoder=opts.text_encoder, max_length=opts.max_length,
                                   store_text_embeddings=opts.store_text_embeddings,
                                   resolution=opts.preprocess.resolution, threads=opts.encoder_threads,
                                   tracking_uri=opts.mlflow_uri, precision=precision, compile=opts.compile,
                                   flip=opts.preprocess.flip_latents, bucket=opts.preprocess.bucket,
                                   extra_resolutions=opts.preprocess.extra_resolutions))


def write_stage(ds, opts: EncodeOptions, channels: int, run: str):
    """The write stage: encoded rows become parquet parts on the workers; only per-shard summaries go on."""
    return ds.map_batches(write_parts, batch_size=opts.write_batch_size, batch_format="numpy", num_cpus=0.25,
                          concurrency=opts.num_writers or None,
                          fn_kwargs={"output": opts.output, "channels": channels, "run": run})


def write_encoded(summaries, ledger: ShardLedger, total: int, log) -> int:
    """Commit each shard as its summaries add up, one line per finished shard (counts by reason, img/s, ETA);
    returns the images kept."""
    t0, kept, n_done = time.time(), 0, 0
    for batch in summaries.iter_batches(batch_size=None, batch_format="numpy"):
        for uri in ledger.add(batch):
            n_done += 1
            sh = ledger.manifest["shards"][uri]
            kept += sh["kept"]
            rate = kept / max(1e-9, time.time() - t0)
            eta = (time.time() - t0) / n_done * (total - n_done)
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(sh["skipped"].items())) or "none"
            status = f"ERROR {sh['error']}" if sh.get("error") else "ok"
            log(f"[encode] shard {n_done}/{total} {uri.rsplit('/', 1)[-1]}: kept {sh['kept']}, "
                f"skipped {sum(sh['skipped'].values())} ({skipped}) {status} | {rate:.1f} img/s, ETA {_fmt_eta(eta)}")
    if ledger.pending:  # should not happen: every shard ends with its counted marker row
        raise EncodeFailed(f"rows of shards {sorted(ledger.pending)} never completed")
    return kept


def format_summary(s: dict) -> str:
    lines = ["", "=" * 64, f" latent cache: {s['output']}", "-" * 64,
             f" shards        {s['shards_done']}/{s['shards_total']} complete, {len(s['shards_failed'])} failed",
             f" records read  {s['read']}", f" kept          {s['kept']}",
             f" skipped       {s['skipped_total']}"]
    lines += [f"   {k:<20}{v}" for k, v in s["skipped"].items()]
    if "scale_factor" in s:
        lines.append(f" latent std    {s['latent_std']}  (scale_factor {s['scale_factor']})")
    if "flip_gap" in s:
        lines.append(f" flipped       latents of the mirrored images kept; mirroring a latent instead would be off by "
                     f"{s['flip_gap']:.1%} of the latent std (RMS)")
    if s.get("buckets"):
        lines.append(" buckets       " + ", ".join(f"{k}: {v}" for k, v in s["buckets"].items()))
    if s.get("resolutions"):
        lines.append(" resolutions   " + ", ".join(f"{r}px: {v} rows" for r, v in s["resolutions"].items())
                     + " (an image smaller than a resolution is left out of it)")
    if s.get("labels"):
        named = {k: v for k, v in s["labels"].items() if k != "none"}
        lines.append(f" class labels  {len(named)} distinct on {sum(named.values())} rows"
                     + (f" ({', '.join(f'{k}: {v}' for k, v in named.items())})" if len(named) <= 20 else "")
                     + (f"; {s['labels']['none']} rows without one" if "none" in s["labels"] else ""))
    lines.append(f" this run      {s['encoded_this_run']} shards, {s['images_per_s']} img/s, {s['seconds']} s")
    if s.get("nodes", {}).get("encoder"):
        enc, wri, pool = s["nodes"]["encoder"], s["nodes"]["writer"], s["nodes"].get("encoder_pool", [])
        # a small or fast input may be encoded by fewer nodes than the pool spans: Ray Data sends each batch to
        # the least busy encoder, and an idle one keeps winning
        lines.append(" ray nodes     " + (f"encoder pool on {len(pool)}, " if pool else "")
                     + f"encoders on {len(enc)}, writers on {len(wri)}: "
                     + ", ".join(sorted({n[:12] for n in enc + wri + pool})))
    for uri, err in s["shards_failed"].items():
        lines.append(f" FAILED shard  {err}")
    lines.append("=" * 64)
    return "\n".join(lines)


def log_to_mlflow(opts: EncodeOptions, summary: dict, manifest: dict) -> None:
    from pipeline.common.tracking import mlflow_run, redact
    params = {k: redact(str(v)) for k, v in asdict(opts).items() if k != "preprocess"}
    params.update({f"preprocess.{k}": v for k, v in asdict(opts.preprocess).items()})
    params["autoencoder_config_hash"] = manifest["autoencoder"]["config_hash"]
    params["precision"] = summary["precision"] or opts.precision  # resolved on the encoders' device
    metrics = {"read": summary["read"], "kept": summary["kept"], "skipped": summary["skipped_total"],
               "images_per_s": summary["images_per_s"], "shards_failed": len(summary["shards_failed"])}
    metrics.update({f"skipped.{k}": v for k, v in summary["skipped"].items()})
    for key in ("latent_std", "flip_gap"):
        if key in summary:
            metrics[key] = summary[key]
    with mlflow_run(opts.mlflow_uri, opts.experiment, run_name=f"encode {opts.output.rsplit('/', 1)[-1]}") as run:
        import mlflow
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.set_tag("latent_cache", opts.output)
        summary["mlflow_run_id"] = run.info.run_id
