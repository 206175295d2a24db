"""Shard sources: find img2dataset shards (glob, folder or list file; local or s3://) and read one shard
into records. One bad shard never stops the others: its error is carried as data, named by its path.
"""
from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.common import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "txt")
LABEL_MAP_EXTS = ("seg.png", "seg")  # a record's per-pixel class map (tar member KEY.seg.png, parquet column seg)


@dataclass(frozen=True)
class ShardSet:
    layout: str            # "webdataset" | "parquet"
    shards: tuple[str, ...]  # full URIs, sorted


def discover_shards(uri: str) -> ShardSet:
    """`uri` is a folder (tars if any, else parquet files), a glob (`s3://b/laion/{00000..00009}.tar`
    style braces are not expanded; use `*`), or a `.txt` list file with one shard URI per line."""
    fs, path = storage.fs_and_path(uri)
    if uri.endswith((".txt", ".lst")):
        if not fs.exists(path):
            raise FileNotFoundError(f"shard list file {uri!r} does not exist")
        lines = [ln.strip() for ln in storage.read_bytes(uri).decode().splitlines()]
        shards = [ln for ln in lines if ln and not ln.startswith("#")]
    elif any(c in path for c in "*?["):
        shards = [storage.unstrip(fs, p, uri) for p in fs.glob(path)]
    else:
        if not fs.exists(path):
            raise FileNotFoundError(f"input {uri!r} does not exist; give a folder of img2dataset shards, a glob or "
                                    f"a .txt list of shard paths")
        if not fs.isdir(path):
            shards = [uri]
        else:
            files = [storage.unstrip(fs, p, uri) for p in fs.ls(path, detail=False)]
            tars = [f for f in files if f.endswith(".tar")]
            shards = tars or [f for f in files if f.endswith(".parquet")]
    shards = sorted(set(shards))
    if not shards:
        raise FileNotFoundError(f"no .tar or .parquet shards found at {uri!r}")
    tars = [s for s in shards if s.endswith(".tar")]
    if tars and len(tars) != len(shards):
        raise ValueError(f"{uri!r} mixes webdataset tars and parquet files; list one layout")
    return ShardSet("webdataset" if tars else "parquet", tuple(shards))


def _row(shard: int, key: str, image: bytes | None, ext: str, caption, meta: dict | None, skip: str = "",
         label_map: bytes | None = None):
    """One record. No nulls (Ray Data turns null strings into NaN in numpy batches): "" means absent."""
    return {"shard": shard, "key": key, "image": image or b"", "ext": ext, "label_map": label_map or b"",
            "caption": "" if caption is None else str(caption),
            "meta": "" if meta is None else json.dumps(meta, default=_json_default), "skip": skip or "",
            "shard_total": -1, "shard_error": ""}


def _json_default(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, bytes):
        return None
    return str(v)


def _webdataset_records(uri: str, shard: int):
    """Group consecutive tar members by key (basename up to the first dot), as webdataset does."""
    fs, path = storage.fs_and_path(uri)
    current, files = None, {}

    def emit():
        img_ext = next((e for e in IMAGE_EXTS if e in files), None)
        caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else None
        meta, skip = None, ""
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (ValueError, UnicodeDecodeError):
                skip = "bad_metadata"
        if img_ext is None:
            skip = skip or "missing_image"
        label_map = next((files[e] for e in LABEL_MAP_EXTS if e in files), None)
        return _row(shard, current, files.get(img_ext) if img_ext else None, img_ext or "", caption, meta, skip,
                    label_map)

    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            key, ext = name.split(".", 1)
            if key != current and current is not None:
                yield emit()  # before reading on: a truncation below must not cost the previous record
                files = {}
            current = key
            files[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield emit()


def _parquet_records(uri: str, shard: int):
    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        img_cols = [c for c in ("jpg", "png", "webp", "jpeg", "image") if c in names]
        if not img_cols:
            raise ValueError(f"parquet shard has no image column (jpg/png/webp/image); columns: {names}. "
                             f"Is this img2dataset's metadata parquet beside a tar? Point --input at the tars.")
        cap_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        for i, batch in enumerate(pf.iter_batches(batch_size=256)):
            for j, rec in enumerate(batch.to_pylist()):
                images = {c: rec.pop(c) for c in img_cols}
                label_map = rec.pop("seg", None)
                ext, img = next(((c, v) for c, v in images.items() if v), ("", None))  # formats may mix per row
                key = str(rec.get("key") or f"{shard:05d}{i * 256 + j:06d}")
                caption = rec.get(cap_col) if cap_col else None
                yield _row(shard, key, img, ext, caption, rec, "" if img else "missing_image", label_map)


def read_shard(row: dict, layout: str):
    """Ray Data flat_map: one shard -> its records, the last one carrying `shard_total` (how many rows this
    shard produced) and `shard_error` (why the shard could not be read to the end, naming the file)."""
    uri, shard = row["uri"], int(row["shard"])
    pending, n, error = None, 0, None
    try:
        reader = _webdataset_records if layout == "webdataset" else _parquet_records
        for rec in reader(uri, shard):
            if pending is not None:
                yield pending
                n += 1
            pending = rec
    except Exception as e:  # noqa: BLE001 - a corrupt shard is data, reported by name
        error = f"{uri}: {type(e).__name__}: {e}"
    if pending is None:
        pending = _row(shard, "", None, "", None, None, "shard_error" if error else "empty_shard")  # key "": marker
    pending["shard_total"] = n + 1
    pending["shard_error"] = error or ""
    yield pending
