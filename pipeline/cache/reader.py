"""The latent cache's format and its reader: parquet parts written by Ray workers, one commit record per finished
shard, a manifest. Written by pipeline/encode/ (the write stage and the driver's ledger), read by pipeline/train/
and the evaluation.

A row: key, caption, latent_mean / latent_std (fp16, the posterior, flattened C*h*w), input_ids /
attention_mask, optionally latent_flip_mean / latent_flip_std (the posterior of the image mirrored left-right,
--flip-latents), text_emb (fp16, L*d), lowres (uint8, (r/k)*(r/k)*3) and inpaint_latent / inpaint_mask (K
masked images' latent means, fp16 K*C*h*w, and their holes at the latent's size, uint8 K*h*w), label_map (uint8 r*r
class ids), layout (int16 B*5: boxes [class, top, left, h, w] in pixels of the crop, -1 padded), original size, crop
offsets, the decoded image's fingerprints (image_hash, phash: int64, pipeline/data/dedup.py), label, the LAION
scores (punsafe, pwatermark, aesthetic, similarity: float32, null where a record has
none; what `--filter` reads at train time), meta (JSON).

Who writes what (format version 2):
- `parts/<run>-<shard>-<id>.parquet`: a write task's rows of one source shard (a shard spans several parts).
  Written by the Ray Data write stage where the rows are (`write_parts`); the driver never holds a latent.
- `commits/<shard>-<hash>-<id>.json`: written by the driver when a shard's rows have all been written: its
  counts by skip reason, latent statistics, error and part files. One small file per shard: O(1) per commit.
- `manifest.json`: the identities (autoencoder, text encoder: config hash + weights hash), latent shape and the
  compacted commit records, rewritten every `compact_seconds` and at the end. Readers and resume take the
  manifest plus the commit records it does not hold yet (`read_manifest`).
Every file is written atomically under a fresh name, so a killed run leaves only whole files; parts that no
commit names (a killed run's, a retried task's) are swept by the next run, and a redone shard's commit replaces
the old one, so rows are never duplicated.
"""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from pipeline.common import storage

MANIFEST = "manifest.json"
VERSION = 2

def list_names(uri: str) -> list[str]:
    """Names in a cache folder ([] when it does not exist yet)."""
    fs, path = storage.fs_and_path(uri)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def pending_commits(cache_uri: str, manifest: dict) -> list[dict]:
    """Commit records the manifest does not hold yet (a run killed between compactions), oldest first."""
    known = {sh.get("commit") for sh in manifest.get("shards", {}).values()}
    names = [n for n in list_names(storage.join(cache_uri, "commits")) if n.endswith(".json") and
             f"commits/{n}" not in known]
    recs = [storage.read_json(storage.join(cache_uri, "commits", n)) for n in names]
    return sorted((r for r in recs if r), key=lambda r: r["entry"]["finished"])


def read_manifest(cache_uri: str) -> dict:
    """The manifest with the commit records it does not hold yet folded in (what readers and resume see)."""
    m = storage.read_json(storage.join(cache_uri, MANIFEST))
    if m is None:
        raise FileNotFoundError(f"no {MANIFEST} at {cache_uri!r}: is it a latent cache written by "
                                f"jobs/encode_latents.py?")
    pending = pending_commits(cache_uri, m)
    if pending:
        for rec in pending:
            m["shards"][rec["uri"]] = rec["entry"]
        summarise(m)
    return m


def shard_files(entry: dict) -> list[str]:
    return entry.get("files") or ([entry["file"]] if entry.get("file") else [])  # version 1: one part per shard


def part_files(cache_uri: str, manifest: dict | None = None) -> list[str]:
    m = manifest or read_manifest(cache_uri)
    return [storage.join(cache_uri, f) for _, s in sorted(m["shards"].items()) for f in shard_files(s)]


def part_rows(cache_uri: str, manifest: dict | None = None) -> list[int]:
    """Rows of each part, in part_files order: from the commit records, or (a cache written before they kept
    them) from the parts' parquet footers."""
    m = manifest or read_manifest(cache_uri)
    out = []
    for _, s in sorted(m["shards"].items()):
        files = shard_files(s)
        rows = s.get("part_rows")
        if rows is None or len(rows) != len(files):
            rows = [footer_rows(storage.join(cache_uri, f)) for f in files]
        out += rows
    return out


def part_buckets(manifest: dict) -> list[tuple[int, int]] | None:
    """Each part's aspect bucket (height, width), in part_files order; None for a cache without buckets."""
    if not manifest.get("preprocess", {}).get("bucket"):
        return None
    out = []
    for _, s in sorted(manifest["shards"].items()):
        out += [tuple(int(v) for v in b.split("x")) for b in s.get("part_buckets", [])]
    return out


def part_units(manifest: dict) -> list[str]:
    """Each part's unit, in part_files order: its source shard (and aspect bucket, in a bucketed cache). How the
    encode job cut a shard's rows into parts depends on how Ray Data batched them; a unit's rows do not."""
    out = []
    for uri, s in sorted(manifest["shards"].items()):
        files, buckets = shard_files(s), s.get("part_buckets") or []
        out += [f"{uri} {buckets[i]}" if i < len(buckets) else uri for i in range(len(files))]
    return out


def footer_rows(uri: str) -> int:
    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def decoded_bytes(files: list[str], columns: list[str], rows: int) -> int:
    """Arrow bytes of `columns` over `rows` rows, from the first part's footer (uncompressed column sizes), so a
    trainer can tell whether the cache fits in memory without reading it."""
    fs, path = storage.fs_and_path(files[0])
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)]
    wanted = sum(ch.total_uncompressed_size for ch in chunks if ch.path_in_schema.split(".")[0] in columns)
    return int(wanted / max(1, meta.num_rows) * rows)

def bucket_aspect(name: str) -> float:
    h, w = name.split("x")
    return int(w) / int(h)


def totals(manifest: dict) -> dict:
    """Counts and per-channel latent statistics summed over all shards (across resumed runs)."""
    read = kept = 0
    skipped: Counter = Counter()
    s = q = None
    n = 0
    flip_sq = None
    buckets: Counter = Counter()
    resolutions: Counter = Counter()
    labels: Counter | None = Counter()
    for sh in manifest["shards"].values():
        read += sh["read"]
        kept += sh["kept"]
        skipped.update(sh["skipped"])
        if sh["kept"]:
            ss, qq = np.array(sh["stats"]["sum"]), np.array(sh["stats"]["sumsq"])
            s, q = (ss, qq) if s is None else (s + ss, q + qq)
            n += sh["stats"]["n"]
            if "flip_sq" in sh["stats"]:
                flip_sq = (flip_sq or 0.0) + sh["stats"]["flip_sq"]
            if "buckets" in sh["stats"]:
                buckets.update(sh["stats"]["buckets"])
            if "resolutions" in sh["stats"]:
                resolutions.update(sh["stats"]["resolutions"])
            if labels is not None and "labels" in sh["stats"]:
                labels.update(sh["stats"]["labels"])
            else:  # a shard encoded before label counts were kept: the cache's labels are unknown
                labels = None
    out = {"read": read, "kept": kept, "skipped": dict(sorted(skipped.items())),
           "skipped_total": sum(skipped.values())}
    if manifest.get("resolutions"):  # rows with a latent at each resolution
        out["resolutions"] = {str(manifest["resolutions"][0]): kept, **{r: resolutions.get(r, 0) for r in
                                                                        map(str, manifest["resolutions"][1:])}}
    if buckets:  # rows per aspect bucket "HxW", tall to wide
        out["buckets"] = dict(sorted(buckets.items(), key=lambda kv: bucket_aspect(kv[0])))
    if labels is not None:
        out["labels"] = dict(sorted(labels.items(), key=lambda kv: (kv[0] == "none", len(kv[0]), kv[0])))
    if n:
        mean = s / n
        var = np.maximum(q / n - mean ** 2, 1e-12)
        overall_std = float(np.sqrt(q.sum() / n / len(s) - (s.sum() / n / len(s)) ** 2))
        out.update(latent_channel_mean=mean.round(6).tolist(), latent_channel_std=np.sqrt(var).round(6).tolist(),
                   latent_std=round(overall_std, 6), scale_factor=round(1.0 / overall_std, 6))
        if flip_sq is not None:  # RMS of flip(z(x)) - z(flip(x)) over the latent's elements, in latent stds
            out["flip_gap"] = round(float(np.sqrt(flip_sq / (n * len(s)))) / overall_std, 6)
    return out

def summarise(m: dict) -> None:
    """The manifest's derived fields (done and failed shards, totals, counts), from its shard entries."""
    m["completed_shards"] = sorted(u for u, s in m["shards"].items() if not s.get("error"))
    m["failed_shards"] = {u: s["error"] for u, s in sorted(m["shards"].items()) if s.get("error")}
    m["totals"] = totals(m)
    m["counts"] = {k: m["totals"][k] for k in ("read", "kept", "skipped_total")}
    m["skipped"] = m["totals"]["skipped"]


def first_rows(files: list[str], columns: list[str], n: int) -> list[dict]:
    """The first `n` rows of the cache's parts (in the order given), with only `columns` read."""
    out: list = []
    for f in files:
        table = pq.read_table(io.BytesIO(storage.read_bytes(f)), columns=list(columns))
        out += table.slice(0, n - len(out)).to_pylist()
        if len(out) >= n:
            break
    return out


def _read_part(uri: str, columns: list[str]):
    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return [pq.read_table(f, columns=columns)]


def parts_datasource(files: list[str], rows: list[int], columns: list[str]):
    """The cache's parts `files` (with their manifest row counts) as a Ray Data datasource: one read task per part,
    in the order given. Unlike read_parquet it starts no sampling tasks: the manifest already knows the rows, and
    read_parquet's 1-CPU sampling tasks never start where the training workers leave less than a CPU (an elastic
    run's nodes), which hung the first read."""
    from functools import partial

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CacheParts(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(partial(_read_part, f, list(columns)),
                             BlockMetadata(num_rows=n, size_bytes=None, exec_stats=None, input_files=(f,)))
                    for f, n in zip(files, rows)]

    return CacheParts()
