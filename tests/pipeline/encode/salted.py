"""Shards salted with every kind of bad record a LAION crawl contains, beside good records of every
image mode. Returns what a correct pipeline must keep and skip."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _img_bytes(mode: str, size=(40, 32), fmt="PNG", **kw) -> bytes:
    rng = np.random.default_rng(len(mode) + size[0])
    if mode == "I;16":
        im = Image.fromarray((rng.random(size[::-1]) * 65535).astype(np.uint16))
    elif mode == "CMYK":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("CMYK")
        fmt = "JPEG"
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("P")
        im.info["transparency"] = 0
    else:
        chans = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        arr = rng.integers(0, 255, (*size[::-1], chans), dtype=np.uint8)
        im = Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"transparency": 0} if mode == "P" else {}))
    return buf.getvalue()


GOOD_META = {"punsafe": 0.01, "pwatermark": 0.1, "aesthetic": 5.5, "similarity": 0.33}


def records():
    """-> list of (key, files{ext: bytes}, expected_skip_reason or None)."""
    jpg = _img_bytes("RGB", fmt="JPEG")
    out = []

    def rec(key, ext, img, caption="a photo of a thing", meta=GOOD_META, expect=None, raw_json=None):
        files = {}
        if img is not None:
            files[ext] = img
        if caption is not None:
            files["txt"] = caption.encode()
        files["json"] = raw_json if raw_json is not None else json.dumps({"key": key, **meta}).encode()
        out.append((key, files, expect))

    # good records in every mode a crawl delivers
    for i, mode in enumerate(["RGB", "L", "LA", "P", "RGBA", "I;16", "CMYK"]):
        rec(f"good{i}", "jpg" if mode == "CMYK" else "png", _img_bytes(mode))
    rec("goodjpg", "jpg", jpg)
    # bad records, at least ten kinds
    rec("trunc", "jpg", jpg[: len(jpg) // 2], expect="corrupt_image")
    rec("notimg", "jpg", b"<html>404 not found</html>", expect="not_an_image")
    rec("nocap", "png", _img_bytes("RGB"), caption=None, expect="missing_caption")
    rec("blankcap", "png", _img_bytes("RGB"), caption="   ", expect="missing_caption")
    rec("longcap", "png", _img_bytes("RGB"), caption="x" * 2000, expect="caption_too_long")
    rec("tiny", "png", _img_bytes("RGB", size=(4, 4)), expect="too_small")
    rec("wide", "png", _img_bytes("RGB", size=(400, 40)), expect="bad_aspect")
    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, format="PNG")
    rec("huge", "png", big.getvalue(), expect="too_large")
    rec("nanmeta", "png", _img_bytes("RGB"), raw_json=b'{"punsafe": NaN, "pwatermark": 0.1}', expect="bad_metadata")
    rec("badjson", "png", _img_bytes("RGB"), raw_json=b'{"punsafe": 0.1, ', expect="bad_metadata")
    rec("unsafe", "png", _img_bytes("RGB"), meta={**GOOD_META, "punsafe": 0.93}, expect="unsafe")
    rec("wmark", "png", _img_bytes("RGB"), meta={**GOOD_META, "pwatermark": 0.97}, expect="watermark")
    rec("ugly", "png", _img_bytes("RGB"), meta={**GOOD_META, "aesthetic": 2.0}, expect="low_aesthetic")
    rec("noimg", "png", None, expect="missing_image")
    return out


def write_tar(path, recs):
    with tarfile.open(path, "w") as tar:
        for key, files, _ in recs:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_salted_webdataset(folder) -> dict:
    """00000.tar: all records; 00001.tar: a good shard truncated mid-record; 00002.tar: clean good shard."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = records()
    write_tar(folder / "00000.tar", recs)
    good = [r for r in recs if r[2] is None]
    renamed = [(f"t{k}", f, e) for k, f, e in good]
    write_tar(folder / "00001.tar", renamed)
    data = (folder / "00001.tar").read_bytes()
    # cut inside the 6th record: records 0..4 are whole
    offsets = []
    with tarfile.open(folder / "00001.tar") as t:
        for m in t.getmembers():
            offsets.append((m.name, m.offset_data))
    cut = next(off for name, off in offsets if name.startswith(renamed[5][0] + ".")) + 10
    (folder / "00001.tar").write_bytes(data[:cut])
    write_tar(folder / "00002.tar", [(f"c{k}", f, e) for k, f, e in good])
    expected_skips = {}
    for _, _, e in recs:
        if e:
            expected_skips[e] = expected_skips.get(e, 0) + 1
    return {"kept": len(good) + 5 + len(good), "skipped": expected_skips, "failed": ["00001.tar"],
            "good_keys": ({k for k, _, e in recs if e is None} | {r[0] for r in renamed[:5]}
                          | {f"c{k}" for k, _, _ in good})}


def write_bad_parquet_set(folder, good_parquet_shard: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.parquet").write_bytes(good_parquet_shard)
    (folder / "00001.parquet").write_bytes(b"PAR1 this is not a parquet file")
    rows = [{"key": "x1", "caption": "a thing", "punsafe": 0.1}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "00002.parquet")  # no image column
