"""The latent cache: one parquet part per source shard + `manifest.json`.

A row: key, caption, latent_mean / latent_std (fp16, the posterior, flattened C*h*w), input_ids /
attention_mask, optionally text_emb (fp16, L*d), original size, crop offsets, label, meta (JSON).
The manifest names the autoencoder and text encoder (config hash + weights hash), the latent shape,
per-channel latent statistics, counts read / kept / skipped by reason, and which source shards are done.
Parts and manifest are written atomically; a part is named after its source shard, so a rerun that redoes
a shard replaces its part and rows are never duplicated.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common import storage

MANIFEST = "manifest.json"
VERSION = 1


class CacheMismatch(ValueError):
    """The output already holds a cache made with another autoencoder / text encoder / shape."""


def part_name(shard_uri: str) -> str:
    base = shard_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"parts/{base}-{hashlib.sha1(shard_uri.encode()).hexdigest()[:8]}.parquet"


def read_manifest(cache_uri: str) -> dict:
    m = storage.read_json(storage.join(cache_uri, MANIFEST))
    if m is None:
        raise FileNotFoundError(f"no {MANIFEST} at {cache_uri!r}: is it a latent cache written by "
                                f"jobs/encode_latents.py?")
    return m


def part_files(cache_uri: str, manifest: dict | None = None) -> list[str]:
    m = manifest or read_manifest(cache_uri)
    return [storage.join(cache_uri, s["file"]) for _, s in sorted(m["shards"].items()) if s.get("file")]


def decoded_bytes(files: list[str], columns: list[str], rows: int) -> int:
    """Arrow bytes of `columns` over `rows` rows, from the first part's footer (uncompressed column sizes), so a
    trainer can tell whether the cache fits in memory without reading it."""
    fs, path = storage.fs_and_path(files[0])
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)]
    wanted = sum(ch.total_uncompressed_size for ch in chunks if ch.path_in_schema.split(".")[0] in columns)
    return int(wanted / max(1, meta.num_rows) * rows)


def _fsl(arr: np.ndarray, typ) -> pa.FixedSizeListArray:
    arr = np.ascontiguousarray(arr)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=typ), arr.shape[1])


def totals(manifest: dict) -> dict:
    """Counts and per-channel latent statistics summed over all shards (across resumed runs)."""
    read = kept = 0
    skipped: Counter = Counter()
    s = q = None
    n = 0
    for sh in manifest["shards"].values():
        read += sh["read"]
        kept += sh["kept"]
        skipped.update(sh["skipped"])
        if sh["kept"]:
            ss, qq = np.array(sh["stats"]["sum"]), np.array(sh["stats"]["sumsq"])
            s, q = (ss, qq) if s is None else (s + ss, q + qq)
            n += sh["stats"]["n"]
    out = {"read": read, "kept": kept, "skipped": dict(sorted(skipped.items())),
           "skipped_total": sum(skipped.values())}
    if n:
        mean = s / n
        var = np.maximum(q / n - mean ** 2, 1e-12)
        overall_std = float(np.sqrt(q.sum() / n / len(s) - (s.sum() / n / len(s)) ** 2))
        out.update(latent_channel_mean=mean.round(6).tolist(), latent_channel_std=np.sqrt(var).round(6).tolist(),
                   latent_std=round(overall_std, 6), scale_factor=round(1.0 / overall_std, 6))
    return out


class CacheWriter:
    """Collects encoded rows per source shard; writes a shard's part when all its rows have arrived."""

    def __init__(self, output: str, header: dict):
        self.output = output
        self.manifest = storage.read_json(storage.join(output, MANIFEST))
        if self.manifest is None:
            self.manifest = {"version": VERSION, **header, "shards": {}, "created": time.time()}
        else:
            for key in ("autoencoder", "text_encoder", "latent_shape", "resolution"):
                old, new = self.manifest.get(key), header.get(key)
                if key == "autoencoder":
                    from pipeline.common.models import first_stage_key
                    old, new = first_stage_key(old), first_stage_key(new)
                if old != new:
                    raise CacheMismatch(
                        f"{output} already holds a latent cache with {key}={old} but this run has {key}={new}; "
                        f"write to a new --output (latents of different encoders must not be mixed)")
            self.manifest.update({k: v for k, v in header.items() if k not in self.manifest})
        self.shard_uris: dict[int, str] = {}
        self.pending: dict[int, dict] = {}

    @property
    def completed(self) -> set[str]:
        return {u for u, s in self.manifest["shards"].items() if not s.get("error")}

    def start(self, shard_uris: list[str]) -> None:
        self.shard_uris = dict(enumerate(shard_uris))
        parts = storage.join(self.output, "parts")
        if not storage.is_remote(parts) and os.path.isdir(parts):  # temp files of a killed run
            for name in os.listdir(parts):
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(os.path.join(parts, name))
        self.manifest["sources"] = sorted(set(self.manifest.get("sources", [])) | set(shard_uris))

    def _pending(self, shard: int) -> dict:
        return self.pending.setdefault(shard, {"rows": [], "got": 0, "total": None, "error": None,
                                               "skipped": Counter(), "read": 0})

    def add_batch(self, batch: dict) -> list[str]:
        """Route a batch of encoder output; returns the shard URIs completed by it."""
        n = len(batch["shard"])
        touched = set()
        for i in range(n):
            p = self._pending(int(batch["shard"][i]))
            p["got"] += 1
            touched.add(int(batch["shard"][i]))
            if batch["shard_total"][i] >= 0:
                p["total"] = int(batch["shard_total"][i])
                p["error"] = str(batch["shard_error"][i]) or None
            if not batch["key"][i]:  # the marker row of a shard that yielded no record
                continue
            p["read"] += 1
            if batch["skip"][i]:
                p["skipped"][batch["skip"][i]] += 1
            else:
                p["rows"].append({k: batch[k][i] for k in batch if k not in ("skip", "shard_total", "shard_error",
                                                                            "shard", "ext")})
        done = []
        for s in touched:
            p = self.pending[s]
            if p["total"] is not None and p["got"] == p["total"]:
                done.append(self._finish(s, self.pending.pop(s)))
        return done

    def _finish(self, shard: int, p: dict) -> str:
        uri = self.shard_uris[shard]
        rows = sorted(p["rows"], key=lambda r: str(r["key"]))
        entry = {"read": p["read"], "kept": len(rows), "skipped": dict(p["skipped"]), "error": p["error"],
                 "finished": time.time()}
        if rows:
            table = self._table(rows)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            entry["file"] = part_name(uri)
            storage.write_bytes_atomic(storage.join(self.output, entry["file"]), buf.getvalue())
            c = self.manifest["latent_shape"][0]
            mean = np.stack([r["latent_mean"] for r in rows]).astype(np.float64).reshape(len(rows), c, -1)
            std = np.stack([r["latent_std"] for r in rows]).astype(np.float64).reshape(len(rows), c, -1)
            entry["stats"] = {"sum": mean.sum(axis=(0, 2)).tolist(),
                              "sumsq": (mean ** 2 + std ** 2).sum(axis=(0, 2)).tolist(),  # E[z^2], z ~ q(z|x)
                              "n": int(mean.shape[0] * mean.shape[2])}
        self.manifest["shards"][uri] = entry
        self.write_manifest()
        return uri

    def _table(self, rows: list[dict]) -> pa.Table:
        cols = {"key": pa.array([str(r["key"]) for r in rows]),
                "caption": pa.array([str(r["caption"]) for r in rows]),
                "latent_mean": _fsl(np.stack([r["latent_mean"] for r in rows]), pa.float16()),
                "latent_std": _fsl(np.stack([r["latent_std"] for r in rows]), pa.float16())}
        if "input_ids" in rows[0]:
            cols["input_ids"] = _fsl(np.stack([r["input_ids"] for r in rows]), pa.int32())
            cols["attention_mask"] = _fsl(np.stack([r["attention_mask"] for r in rows]), pa.int8())
        if "text_emb" in rows[0]:
            cols["text_emb"] = _fsl(np.stack([r["text_emb"] for r in rows]), pa.float16())
        for c in ("orig_w", "orig_h", "crop_top", "crop_left"):
            cols[c] = pa.array([int(r[c]) for r in rows], pa.int32())
        labels = []
        for r in rows:
            meta = r.get("meta")
            lab = None
            if meta:
                lab = json.loads(meta).get("label")
            labels.append(int(lab) if isinstance(lab, (int, float)) and lab == lab else None)
        cols["label"] = pa.array(labels, pa.int32())
        cols["meta"] = pa.array([str(r.get("meta") or "") for r in rows])
        return pa.table(cols)

    def write_manifest(self) -> None:
        m = self.manifest
        m["updated"] = time.time()
        m["completed_shards"] = sorted(u for u, s in m["shards"].items() if not s.get("error"))
        m["failed_shards"] = {u: s["error"] for u, s in sorted(m["shards"].items()) if s.get("error")}
        m["totals"] = totals(m)
        m["counts"] = {k: m["totals"][k] for k in ("read", "kept", "skipped_total")}
        m["skipped"] = m["totals"]["skipped"]
        storage.write_json_atomic(storage.join(self.output, MANIFEST), m)
