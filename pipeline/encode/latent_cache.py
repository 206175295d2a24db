"""The latent cache's writers: the Ray Data write stage (`write_parts`) and the driver's ledger (`ShardLedger`:
commit records and the manifest). The format and the reader: pipeline/cache/reader.py."""
from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common import storage
from pipeline.cache.reader import MANIFEST, VERSION, list_names, read_manifest, shard_files, summarise
from pipeline.common.runtime import node_id

# the encoder's bookkeeping columns: routed by the driver's ledger, never stored in a part
ROUTING = ("skip", "shard_total", "shard_error", "shard", "ext", "encoder_node", "flip_sq")


# preprocess settings that add columns to every part (super-resolution's low-res copies, inpainting's variants)
CONDITION_COLUMNS = ("lowres_factor", "inpaint_variants", "label_maps", "layout_boxes", "flip_latents", "bucket",
                     "extra_resolutions")


class CacheMismatch(ValueError):
    """The output already holds a cache made with another autoencoder / text encoder / shape."""


def _shard_base(shard_uri: str) -> str:
    base = shard_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{base}-{hashlib.sha1(shard_uri.encode()).hexdigest()[:8]}"


def commit_name(shard_uri: str) -> str:
    return f"commits/{_shard_base(shard_uri)}-{uuid.uuid4().hex[:8]}.json"


def _fsl(arr: np.ndarray, typ) -> pa.Array:
    """Rows of equal length as a fixed-size list column; rows of one bucket's latents (an object array of flat
    arrays, all of one length in a part) as a list column, so parts of different buckets share one schema."""
    if arr.dtype == object:
        rows = [np.asarray(r) for r in arr]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        values = np.concatenate(rows) if rows else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))
    arr = np.ascontiguousarray(arr)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=typ), arr.shape[1])


SUMMARY = ("shard", "got", "total", "error", "read", "kept", "skipped", "file", "bucket", "stats", "nodes")


def parsed_meta(metas) -> list[dict]:
    """Each record's metadata JSON as a dict ({} where it has none or it is not an object)."""
    out = [json.loads(m) if m else {} for m in metas]
    return [m if isinstance(m, dict) else {} for m in out]


def labels_of(metas: list[dict]) -> list[int | None]:
    """The class label each record's parsed metadata carries (img2dataset-style "label"), None where it has none."""
    labels = []
    for meta in metas:
        lab = meta.get("label")
        labels.append(int(lab) if isinstance(lab, (int, float)) and lab == lab else None)
    return labels


def scores_of(metas: list[dict]) -> dict[str, pa.Array]:
    """The LAION scores of each record's parsed metadata as float32 columns (null where a record has none), so a
    trainer can filter on them without re-encoding (`--filter`)."""
    from pipeline.data.preprocess import SCORE_COLUMNS, laion_score
    out = {}
    for name in SCORE_COLUMNS:
        vals = [laion_score(m, name) for m in metas]
        out[name] = pa.array([None if v is None or v != v else v for v in vals], pa.float32())
    return out


def _table(batch: dict, rows: np.ndarray) -> pa.Table:
    """The parquet table of `rows` of an encoder output batch, column by column (no per-row dicts)."""
    col = {k: v[rows] for k, v in batch.items() if k not in ROUTING}
    cols = {"key": pa.array([str(k) for k in col["key"]]), "caption": pa.array([str(c) for c in col["caption"]]),
            "latent_mean": _fsl(col["latent_mean"], pa.float16()), "latent_std": _fsl(col["latent_std"], pa.float16())}
    if "input_ids" in col:
        cols["input_ids"] = _fsl(col["input_ids"], pa.int32())
        cols["attention_mask"] = _fsl(col["attention_mask"], pa.int8())
    for name in sorted(col):  # a multi-resolution cache: latent_mean_R ... (empty where the image is smaller)
        if name.split("_")[-1].isdigit() and name.startswith(("latent_mean_", "latent_std_", "latent_flip_")):
            cols[name] = _fsl(col[name], pa.float16())
            if name.startswith("latent_mean_"):  # whether the row has it: what training at R filters on, cheaply
                cols[f"has_{name.split('_')[-1]}"] = pa.array([len(v) > 0 for v in col[name]], pa.bool_())
    if "latent_flip_mean" in col:  # the posterior of the image mirrored left-right (--flip-latents)
        cols["latent_flip_mean"] = _fsl(col["latent_flip_mean"], pa.float16())
        cols["latent_flip_std"] = _fsl(col["latent_flip_std"], pa.float16())
    for c in ("text_emb", "text_pooled"):  # cached text embeddings (L*d), and SDXL's pooled embedding
        if c in col:
            cols[c] = _fsl(col[c], pa.float16())
    if "lowres" in col and len(col["lowres"]):  # the super-resolution condition: uint8 (r/k)x(r/k)x3 per row
        cols["lowres"] = _fsl(np.stack([np.frombuffer(b, np.uint8) for b in col["lowres"]]), pa.uint8())
    if "label_map" in col and len(col["label_map"]):  # semantic synthesis' condition: uint8 r*r class ids per row
        cols["label_map"] = _fsl(np.stack([np.frombuffer(b, np.uint8) for b in col["label_map"]]), pa.uint8())
    if "layout" in col and len(col["layout"]):  # layout-to-image's condition: int16 max_boxes*5 per row, -1 padded
        cols["layout"] = _fsl(np.stack([np.frombuffer(b, np.int16) for b in col["layout"]]), pa.int16())
    if "inpaint_latent" in col:  # inpainting's K variants per row: masked images' latents, holes at latent size
        cols["inpaint_latent"] = _fsl(col["inpaint_latent"], pa.float16())
        cols["inpaint_mask"] = _fsl(col["inpaint_mask"], pa.uint8())
    for c in ("orig_w", "orig_h", "crop_top", "crop_left"):
        cols[c] = pa.array(np.asarray(col[c], np.int32), pa.int32())
    if np.asarray(col["latent_mean"]).dtype == object:  # aspect buckets: the crop's (= the bucket's) size
        for c in ("bucket_h", "bucket_w"):
            cols[c] = pa.array(np.asarray(col[c], np.int32), pa.int32())
    for c in ("image_hash", "phash"):  # the decoded image's fingerprints: a later --dedup run is seeded from them
        if c in col:
            cols[c] = pa.array(np.asarray(col[c], np.int64), pa.int64())
    metas = parsed_meta(col["meta"])  # each record's JSON parsed once, for its label and its scores
    cols["label"] = pa.array(labels_of(metas), pa.int32())
    cols.update(scores_of(metas))
    cols["meta"] = pa.array([str(m or "") for m in col["meta"]])
    return pa.table(cols)


def write_parts(batch: dict, output: str, channels: int, run: str) -> dict:
    """Ray Data map_batches (numpy), on the workers: an encoder output batch's good rows written as one parquet
    part per source shard (atomic, rows by key), returned as one small summary row per shard (counts by skip
    reason, latent sums, the part's name): what the driver commits."""
    writer = node_id()
    shard = np.asarray(batch["shard"], np.int64)
    keys = np.array([str(k) for k in batch["key"]], dtype=object)
    skip = np.array([str(k) for k in batch["skip"]], dtype=object)
    out = {k: [] for k in SUMMARY}
    bucketed = np.asarray(batch["latent_mean"]).dtype == object
    for s in np.unique(shard):
        idx = np.flatnonzero(shard == s)
        real = idx[keys[idx] != ""]  # the marker row of an empty or unreadable shard is no record
        good = real[skip[real] == ""]
        marker = idx[np.asarray(batch["shard_total"])[idx] >= 0]  # the row that carries the shard's total
        # one part per aspect bucket (a bucketed cache), else one; the shard's counts go with the last, so the
        # ledger, which commits a shard when its counts add up, has every part of it by then
        groups = [good]
        if bucketed and len(good):
            size = np.asarray(batch["bucket_h"], np.int64)[good] * 100_000 + np.asarray(batch["bucket_w"])[good]
            groups = [good[size == v] for v in np.unique(size)]
        for g, rows in enumerate(groups, start=1 - len(groups)):  # ..., -1, 0: the counts go with g == 0
            file, bucket, stats = "", "", {}
            if len(rows):
                file, stats = _write_part(batch, rows, keys, output, run, int(s), channels)
                if bucketed:
                    bucket = f"{int(batch['bucket_h'][rows[0]])}x{int(batch['bucket_w'][rows[0]])}"
                    stats["buckets"] = {bucket: len(rows)}
            out["shard"].append(int(s))
            out["got"].append(len(idx) if g == 0 else 0)
            out["total"].append(int(batch["shard_total"][marker[0]]) if len(marker) and g == 0 else -1)
            out["error"].append(str(batch["shard_error"][marker[0]]) if len(marker) and g == 0 else "")
            out["read"].append(len(real) if g == 0 else 0)
            out["kept"].append(len(rows))
            out["skipped"].append(json.dumps(Counter(skip[real][skip[real] != ""].tolist()) if g == 0 else {}))
            out["file"].append(file)
            out["bucket"].append(bucket)
            out["stats"].append(json.dumps(stats))
            encoders = sorted(set(str(x) for x in batch["encoder_node"][idx])) if "encoder_node" in batch else []
            out["nodes"].append(json.dumps({"encoder": encoders, "writer": [writer] if writer else []}))
    text = ("error", "skipped", "file", "bucket", "stats", "nodes")
    return {k: np.array(v, dtype=object if k in text else np.int64) for k, v in out.items()}


def _write_part(batch: dict, rows: np.ndarray, keys: np.ndarray, output: str, run: str, shard: int,
                channels: int) -> tuple[str, dict]:
    """One part (rows by key, atomic) and its statistics: per-channel latent sums, class labels, flip gap."""
    rows = rows[np.argsort(keys[rows], kind="stable")]
    buf = io.BytesIO()
    table = _table(batch, rows)
    pq.write_table(table, buf, compression="zstd")
    file = f"parts/{run}-{shard:07d}-{uuid.uuid4().hex[:8]}.parquet"
    storage.write_bytes_atomic(storage.join(output, file), buf.getvalue())
    mean = np.stack(list(np.asarray(batch["latent_mean"])[rows])).astype(np.float64).reshape(len(rows), channels, -1)
    std = np.stack(list(np.asarray(batch["latent_std"])[rows])).astype(np.float64).reshape(len(rows), channels, -1)
    stats = {"sum": mean.sum(axis=(0, 2)).tolist(),
             "sumsq": (mean ** 2 + std ** 2).sum(axis=(0, 2)).tolist(),  # E[z^2], z ~ q(z|x)
             "n": int(mean.shape[0] * mean.shape[2]),
             # rows per class label ("none": no label), so a class-conditional run is checked up front
             "labels": dict(Counter("none" if x is None else str(x) for x in table["label"].to_pylist()))}
    if "flip_sq" in batch:  # how far mirroring a latent is from the mirrored image's latent
        stats["flip_sq"] = float(np.asarray(batch["flip_sq"], np.float64)[rows].sum())
    extra = [c for c in batch if c.startswith("latent_mean_") and c.split("_")[-1].isdigit()]
    if extra:  # rows that have a latent at each extra resolution
        stats["resolutions"] = {c.split("_")[-1]: int(sum(len(v) > 0 for v in np.asarray(batch[c])[rows]))
                                for c in extra}
    return file, stats


def _add_stats(a: dict, b: dict) -> dict:
    if not a:
        return b
    if not b:
        return a
    out = {"sum": (np.array(a["sum"]) + b["sum"]).tolist(), "sumsq": (np.array(a["sumsq"]) + b["sumsq"]).tolist(),
           "n": a["n"] + b["n"]}
    if "labels" in a or "labels" in b:
        out["labels"] = dict(Counter(a.get("labels", {})) + Counter(b.get("labels", {})))
    if "flip_sq" in a or "flip_sq" in b:
        out["flip_sq"] = a.get("flip_sq", 0.0) + b.get("flip_sq", 0.0)
    for key in ("buckets", "resolutions"):
        if key in a or key in b:
            out[key] = dict(Counter(a.get(key, {})) + Counter(b.get(key, {})))
    return out


def _setting(v):
    """A preprocess setting as JSON gives it back (a tuple is a list; off, absent and empty are 0)."""
    return list(v) if isinstance(v, (list, tuple)) and v else (v or 0)


class ShardLedger:
    """The driver's side of the cache: checks the header, adds up the write stage's per-shard summaries, commits
    each shard when all its rows are counted (one small record), and compacts the manifest now and then."""

    def __init__(self, output: str, header: dict, compact_seconds: float = 30.0):
        self.output = output
        self.compact_seconds = compact_seconds
        try:
            self.manifest = read_manifest(output)
        except FileNotFoundError:  # a new cache
            self.manifest = {"version": VERSION, **header, "shards": {}, "created": time.time()}
        else:
            for key in ("autoencoder", "text_encoder", "latent_shape", "resolution", *CONDITION_COLUMNS):
                old, new = self.manifest.get(key), header.get(key)
                if key == "autoencoder":
                    from pipeline.common.models import first_stage_key
                    old, new = first_stage_key(old), first_stage_key(new)
                if key in CONDITION_COLUMNS:  # the columns a part holds: every part of a cache has the same
                    old = self.manifest.get("preprocess", {}).get(key, 0)
                    new = header.get("preprocess", {}).get(key, 0)
                if _setting(old) != _setting(new):
                    raise CacheMismatch(
                        f"{output} already holds a latent cache with {key}={old} but this run has {key}={new}; "
                        f"write to a new --output (latents of different encoders, or rows with and without a task's "
                        f"condition columns, must not be mixed)")
            self.manifest.update({k: v for k, v in header.items() if k not in self.manifest})
            self.manifest["version"] = VERSION
        self.run = uuid.uuid4().hex[:8]  # names this run's parts: never the same as a killed run's
        self.shard_uris: dict[int, str] = {}
        self.pending: dict[int, dict] = {}
        self.last_compact = time.time()
        self.nodes: dict[str, set] = {"encoder": set(), "writer": set()}  # the Ray nodes that did this run's work

    @property
    def completed(self) -> set[str]:
        return {u for u, s in self.manifest["shards"].items() if not s.get("error")}

    def start(self, shard_uris: list[str]) -> int:
        """Take the shards to encode; sweep temp files and parts no commit names (a killed run's). Returns how many
        files were swept."""
        self.shard_uris = dict(enumerate(shard_uris))
        self.manifest["sources"] = sorted(set(self.manifest.get("sources", [])) | set(shard_uris))
        self.write_manifest()
        return self.sweep()

    def sweep(self) -> int:
        entries = self.manifest["shards"].values()
        named = {f for s in entries for f in shard_files(s)} | {s.get("commit") for s in entries}
        stale = [f"{d}/{n}" for d in ("parts", "commits") for n in list_names(storage.join(self.output, d))
                 if f"{d}/{n}" not in named]
        for name in stale:
            storage.remove(storage.join(self.output, name))
        return len(stale)

    def add(self, summary: dict) -> list[str]:
        """Fold a batch of write-stage summaries in; returns the shard URIs that it completed (now committed)."""
        done = []
        for i in range(len(summary["shard"])):
            s = int(summary["shard"][i])
            p = self.pending.setdefault(s, {"got": 0, "total": None, "error": None, "read": 0, "kept": 0,
                                            "skipped": Counter(), "files": [], "rows": {}, "buckets": {},
                                            "stats": {}})
            p["got"] += int(summary["got"][i])
            if summary["total"][i] >= 0:
                p["total"], p["error"] = int(summary["total"][i]), str(summary["error"][i]) or None
            p["read"] += int(summary["read"][i])
            p["kept"] += int(summary["kept"][i])
            p["skipped"].update(json.loads(summary["skipped"][i]))
            if summary["file"][i]:
                p["files"].append(str(summary["file"][i]))
                p["rows"][str(summary["file"][i])] = int(summary["kept"][i])
                if "bucket" in summary and summary["bucket"][i]:
                    p["buckets"][str(summary["file"][i])] = str(summary["bucket"][i])
            p["stats"] = _add_stats(p["stats"], json.loads(summary["stats"][i]))
            for role, ids in json.loads(summary["nodes"][i]).items():
                self.nodes[role].update(n for n in ids if n)
            if p["total"] is not None and p["got"] == p["total"]:
                done.append(self.commit(s, self.pending.pop(s)))
        if done and time.time() - self.last_compact > self.compact_seconds:
            self.write_manifest()
        return done

    def commit(self, shard: int, p: dict) -> str:
        uri = self.shard_uris[shard]
        entry = {"read": p["read"], "kept": p["kept"], "skipped": dict(sorted(p["skipped"].items())),
                 "error": p["error"], "files": sorted(p["files"]),
                 "part_rows": [p["rows"][f] for f in sorted(p["files"])], "commit": commit_name(uri),
                 "finished": time.time()}
        if p["buckets"]:  # a bucketed cache: each part's aspect bucket "HxW"
            entry["part_buckets"] = [p["buckets"][f] for f in sorted(p["files"])]
        if p["stats"]:
            entry["stats"] = p["stats"]
        storage.write_json_atomic(storage.join(self.output, entry["commit"]), {"uri": uri, "entry": entry})
        old = self.manifest["shards"].get(uri)
        self.manifest["shards"][uri] = entry
        if old:  # a redone shard (it failed before): its old parts and commit record go, after the new commit
            for f in [*shard_files(old), old.get("commit")]:
                if f and f not in entry["files"]:
                    storage.remove(storage.join(self.output, f))
        return uri

    def write_manifest(self) -> None:
        self.manifest["updated"] = time.time()
        summarise(self.manifest)
        storage.write_json_atomic(storage.join(self.output, MANIFEST), self.manifest)
        self.last_compact = time.time()
