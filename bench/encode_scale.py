#!/usr/bin/env python
"""The encode job's own overhead at scale, without the models: what the driver and the writers cost per row, and
what a shard's commit costs as the cache grows. One `name=value` line per figure.

Rows are SD-sized encoder output (latent 4x32x32 fp16 mean + std, as at 256 px with f=8; 77 token ids and mask;
sizes, crop, meta), made by a trivial stand-in for the encoder stage inside Ray Data, then taken through the
encode job's real write path: the write stage (`latent_cache.write_parts` as Ray Data tasks, parts written where
the rows are) and the driver's `ShardLedger` (per-shard summaries, one commit record per shard). Side by side in
the same run, the design it replaced: every row sent to the driver, which groups them per shard (`np.stack`,
latent statistics) and writes each part itself (`driver_side_*`).

1. driver CPU per row: the driver process's CPU time over the drain, all its threads (`driver_us_per_row`; Ray
   Data's executor and Ray's own threads in it cost a steady fraction of a core, `driver_cores`, whatever the
   row rate), and its main thread alone, the pipeline's own per-row work (`driver_main_thread_us_per_row`),
   vs the same for the driver-side design (`driver_side_*`); rows/s for each.
2. rows/s as write tasks at once grow (`--writers 1,2,4`; more than the machine's cores only oversubscribes),
   `writer_scaling_N_vs_1`. The stand-in encoder's rows are made once, before any timing, and kept in the object
   store, so the writers do not share the cores with it.
3. commit time with 1,000 / 10,000 / 50,000 shards already in the cache: a shard's commit record vs rewriting the
   whole manifest (what every commit used to do; now done every `--compact-seconds` and at the end).

  python bench/encode_scale.py                      # 20,000 rows in 40 shards, writers 1 and 2, three sizes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched import add_tiny, figures, tiny  # noqa: E402

LATENT = 4 * 32 * 32
TOKENS = 77


def synthetic_rows(batch: dict, rows_per_shard: int) -> dict:
    """A stand-in encoder: SD-sized output rows for the row ids in `batch`, laid out as the encoder stage emits
    them (routing columns included; the last row of each shard carries its total)."""
    ids = np.asarray(batch["id"], np.int64)
    n = len(ids)
    rng = np.random.default_rng(int(ids[0]))
    shard = ids // rows_per_shard
    return {"key": np.array([f"{i:09d}" for i in ids], dtype=object),
            "caption": np.array(["a photo of a synthetic thing"] * n, dtype=object),
            "latent_mean": rng.standard_normal((n, LATENT), dtype=np.float32).astype(np.float16),
            "latent_std": np.full((n, LATENT), 0.1, np.float16),
            "input_ids": rng.integers(0, 30000, (n, TOKENS), dtype=np.int32),
            "attention_mask": np.ones((n, TOKENS), np.int8),
            "orig_w": np.full(n, 512, np.int32), "orig_h": np.full(n, 384, np.int32),
            "crop_top": np.zeros(n, np.int32), "crop_left": np.full(n, 64, np.int32),
            "meta": np.array(['{"label": 3}'] * n, dtype=object), "ext": np.array(["jpg"] * n, dtype=object),
            "skip": np.array([""] * n, dtype=object), "shard": shard,
            "shard_total": np.where(ids % rows_per_shard == rows_per_shard - 1, rows_per_shard, -1),
            "shard_error": np.array([""] * n, dtype=object)}


def encoded(rows: int, rows_per_shard: int, batch: int):
    import ray
    return ray.data.range(rows, override_num_blocks=max(1, rows // batch)).map_batches(
        synthetic_rows, fn_kwargs={"rows_per_shard": rows_per_shard}, batch_size=batch, batch_format="numpy",
        num_cpus=0.25)


def header() -> dict:
    return {"autoencoder": {"config_hash": "bench", "weights_sha256": "bench"}, "text_encoder": {"kind": "none"},
            "resolution": 256, "latent_shape": [4, 32, 32], "layout": "webdataset", "preprocess": {}}


def run_ours(out: str, src, rows: int, rows_per_shard: int, write_batch: int, writers: int) -> tuple:
    """The write stage and the driver's ledger over `src`, the encoder stage's output already in the object
    store, so that only the pipeline's own work is timed (on a small machine the stand-in encoder would share the
    writers' cores)."""
    from pipeline.encode.flow import EncodeOptions, write_encoded, write_stage
    from pipeline.encode.latent_cache import ShardLedger
    shards = rows // rows_per_shard
    ledger = ShardLedger(out, header())
    ledger.start([f"s3://bench/shards/{i:06d}.tar" for i in range(shards)])
    opts = EncodeOptions(input="", output=out, autoencoder="", write_batch_size=write_batch, num_writers=writers)
    ds = write_stage(src, opts, 4, ledger.run)
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    kept = write_encoded(ds, ledger, shards, log=lambda *_: None)
    ledger.write_manifest()
    cpu, main, wall = time.process_time() - c0, time.thread_time() - m0, time.perf_counter() - t0
    assert kept == rows and len(ledger.manifest["completed_shards"]) == shards, (kept, ledger.manifest["counts"])
    return cpu, main, wall


def run_driver_side(out: str, src, rows_per_shard: int) -> tuple:
    """The design this replaced: rows go to the driver, which groups, stacks, computes statistics and writes."""
    import io

    import pyarrow.parquet as pq

    from pipeline.common import storage
    from pipeline.encode.latent_cache import _table
    pending: dict[int, list] = {}
    c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    n_done = 0
    for b in src.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(b["key"])):
            s = int(b["shard"][i])
            pending.setdefault(s, []).append({k: b[k][i] for k in b})
            if len(pending[s]) == rows_per_shard:
                part = pending.pop(s)
                cols = {k: np.stack([r[k] for r in part]) if np.ndim(part[0][k]) else
                        np.array([r[k] for r in part], dtype=object) for k in part[0]}
                buf = io.BytesIO()
                pq.write_table(_table(cols, np.arange(len(part))), buf, compression="zstd")
                storage.write_bytes_atomic(storage.join(out, f"parts/{s:06d}.parquet"), buf.getvalue())
                mean = cols["latent_mean"].astype(np.float64).reshape(len(part), 4, -1)
                mean.sum(axis=(0, 2)), (mean ** 2).sum(axis=(0, 2))
                n_done += 1
    return time.process_time() - c0, time.thread_time() - m0, time.perf_counter() - t0


def commit_costs(tmp: Path, sizes: list[int], repeats: int) -> dict:
    """ms per shard commit (one record) and per manifest rewrite, with `n` shards already in the cache."""
    from pipeline.encode.latent_cache import ShardLedger
    out = {}
    for n in sizes:
        cache = str(tmp / f"commit{n}")
        ledger = ShardLedger(cache, header())
        entry = {"read": 10000, "kept": 9876, "skipped": {"too_small": 100, "corrupt": 24}, "error": None,
                 "files": [f"parts/abcdef12-{0:07d}-{j:08x}.parquet" for j in range(10)], "part_rows": [987] * 10,
                 "commit": "commits/x.json", "finished": time.time(),
                 "stats": {"sum": [1.0] * 4, "sumsq": [2.0] * 4, "n": 9876 * 1024}}
        ledger.manifest["shards"] = {f"s3://laion/shards/{i:06d}.tar": dict(entry) for i in range(n)}
        uris = [f"s3://laion/new/{i:06d}.tar" for i in range(repeats)]
        ledger.shard_uris = dict(enumerate(uris))
        p = {"got": 1, "total": 1, "error": None, "read": 10000, "kept": 9876, "skipped": {"too_small": 124},
             "files": entry["files"], "rows": dict.fromkeys(entry["files"], 987), "buckets": {},
             "stats": entry["stats"]}
        t0 = time.perf_counter()
        for i in range(repeats):
            ledger.commit(i, dict(p))
        out[f"commit_ms_{n}_shards"] = (time.perf_counter() - t0) / repeats * 1e3
        t0 = time.perf_counter()
        for _ in range(2):
            ledger.write_manifest()
        out[f"manifest_rewrite_ms_{n}_shards"] = (time.perf_counter() - t0) / 2 * 1e3
        out[f"manifest_mb_{n}_shards"] = os.path.getsize(os.path.join(cache, "manifest.json")) / 2 ** 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000, help="synthetic encoded rows per run")
    ap.add_argument("--rows-per-shard", type=int, default=500, help="rows of one source shard")
    ap.add_argument("--batch-size", type=int, default=512, help="rows per stand-in encoder batch (a block)")
    ap.add_argument("--write-batch-size", type=int, default=1024, help="rows per write task (--write-batch-size)")
    ap.add_argument("--writers", default="1,2", help="write tasks at once to try, comma-separated")
    ap.add_argument("--commit-sizes", default="1000,10000,50000", help="shards already committed, comma-separated")
    ap.add_argument("--commit-repeats", type=int, default=20, help="commits timed per size")
    ap.add_argument("--progress-bars", choices=["on", "off"], default="off",
                    help="Ray Data progress bars in the driver (off: only the pipeline's own work is timed)")
    ap.add_argument("--num-cpus", type=int, default=0, help="embedded Ray CPUs (0 = all)")
    add_tiny(ap)
    a = tiny(ap.parse_args(), rows=1000, rows_per_shard=100, batch_size=200, write_batch_size=200, writers="1",
             commit_sizes="1000,50000", commit_repeats=2)

    from pipeline.common.runtime import init_ray
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-scale-"))
    init_ray(a.num_cpus or None, 1024, log=lambda *_: None)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = a.progress_bars == "on"
    print(f"rows={a.rows} rows_per_shard={a.rows_per_shard} row_kb={(LATENT * 4 + TOKENS * 5) / 1024:.1f} "
          f"cpus={os.cpu_count()}", flush=True)
    # the encoder stage's output, made once and kept in the object store: both designs drain the same blocks
    src = encoded(a.rows, a.rows_per_shard, a.batch_size).materialize()
    cpu, main, wall = run_driver_side(str(tmp / "driver_side"), src, a.rows_per_shard)
    base_us, base_main = cpu / a.rows * 1e6, main / a.rows * 1e6
    print(f"driver_side_us_per_row={base_us:.1f} driver_side_main_thread_us_per_row={base_main:.1f} "
          f"driver_side_rows_per_s={a.rows / wall:.0f} driver_side_wall_s={wall:.1f} "
          f"driver_side_cores={cpu / wall:.2f}", flush=True)
    rates = {}
    for w in [int(x) for x in a.writers.split(",") if x]:
        cpu, main, wall = run_ours(str(tmp / f"ours{w}"), src, a.rows, a.rows_per_shard, a.write_batch_size, w)
        rates[w] = a.rows / wall
        us, us_main = cpu / a.rows * 1e6, main / a.rows * 1e6
        print(f"writers={w} driver_us_per_row={us:.1f} driver_main_thread_us_per_row={us_main:.1f} "
              f"rows_per_s={a.rows / wall:.0f} wall_s={wall:.1f} driver_cores={cpu / wall:.2f} "
              f"driver_cpu_ratio={base_us / us:.1f}x "
              f"driver_main_thread_ratio={base_main / us_main:.1f}x", flush=True)
    if len(rates) > 1:
        lo = min(rates)
        print(" ".join(f"writer_scaling_{w}_vs_{lo}={rates[w] / rates[lo]:.2f}x" for w in sorted(rates) if w != lo),
              flush=True)
    costs = commit_costs(tmp, [int(x) for x in a.commit_sizes.split(",") if x], a.commit_repeats)
    figures(**{k: round(v, 2) for k, v in costs.items()})
    sizes = [int(x) for x in a.commit_sizes.split(",") if x]
    if len(sizes) > 1:
        print(f"commit_growth_{sizes[-1]}_vs_{sizes[0]}="
              f"{costs[f'commit_ms_{sizes[-1]}_shards'] / costs[f'commit_ms_{sizes[0]}_shards']:.2f}x", flush=True)
    json.dump(costs, open(tmp / "commit_costs.json", "w"))


if __name__ == "__main__":
    main()
