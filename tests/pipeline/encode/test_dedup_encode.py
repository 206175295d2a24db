"""jobs/encode_latents.py --dedup on real photos: duplicates planted across shards, within a shard and against the
rows a previous run already cached are dropped and counted by reason; the first copy is kept."""
import io
import json
import tarfile

import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.make_shards import photo_records
from pipeline.data.preprocess import PreprocessConfig
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.cache.reader import part_files, read_manifest


def png(im, level=6):
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def jpg(im, q=85):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def write_tar(path, recs):
    with tarfile.open(path, "w") as tar:
        for key, ext, data, caption in recs:
            for name, blob in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode()),
                               (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_planted_duplicates_dropped_and_counted(ray_local, tiny_ae_ckpt, tmp_path):
    ims = []
    for r in photo_records("train", 0, "png"):
        im = Image.open(io.BytesIO(r.image)).convert("RGB")
        im.thumbnail((96, 96))  # small: the test is about fingerprints, not pixels
        ims.append(im)
        if len(ims) == 10:
            break
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", [(f"p{i}", "png", png(ims[i]), f"photo {i}") for i in range(6)])
    write_tar(shards / "00001.tar", [
        ("e0", "png", png(ims[0], level=1), "photo 0"),                               # exact copy of a cached row
        ("e1", "png", png(ims[1], level=9), "another caption"),                      # exact, other caption
        ("n2", "jpg", jpg(ims[2]), "photo 2"),                                        # recompressed: near
        ("n3", "png", png(ims[3].resize((ims[3].width * 7 // 8, ims[3].height * 7 // 8))), "photo 3"),  # resized
        ("f6", "png", png(ims[6]), "photo 6"), ("f6b", "png", png(ims[6], level=2), "photo 6"),  # within a shard
        ("f7", "png", png(ims[7]), "photo 7")])
    write_tar(shards / "00002.tar", [("g7", "png", png(ims[7], level=3), "photo 7"),  # across shards, same run
                                     ("f8", "png", png(ims[8]), "photo 8")])
    out = tmp_path / "latents"

    lines = []
    first = run_encode(EncodeOptions(input=str(shards), output=str(out), autoencoder=tiny_ae_ckpt, max_length=16,
                                     preprocess=PreprocessConfig(resolution=16, dedup="near"), max_shards=1),
                       log=lines.append)
    assert first["kept"] == 6 and any("the index holds the 0 row(s) already in the cache" in x for x in lines)
    lines = []
    second = run_encode(EncodeOptions(input=str(shards), output=str(out), autoencoder=tiny_ae_ckpt, max_length=16,
                                      preprocess=PreprocessConfig(resolution=16, dedup="near")), log=lines.append)
    assert any("the index holds the 6 row(s) already in the cache" in x for x in lines), lines
    m = read_manifest(str(out))
    assert m["counts"]["read"] == 15 and m["counts"]["kept"] == 6 + 3  # + f6, one of f7 / g7, f8
    assert m["skipped"] == {"duplicate_image": 4, "near_duplicate": 2}, m["skipped"]  # e0 e1 f6b f7|g7; n2 n3
    assert second["encoded_this_run"] == 2
    keys = {k for f in part_files(str(out)) for k in pq.read_table(f, columns=["key"])["key"].to_pylist()}
    assert {"p0", "p1", "p2", "p3", "f6", "f8"} <= keys and len(keys & {"f7", "g7"}) == 1 and not keys & {"e0", "n2"}
    # --dedup exact keeps the near copies (a new cache, everything in one run)
    exact = run_encode(EncodeOptions(input=str(shards), output=str(tmp_path / "exact"), autoencoder=tiny_ae_ckpt,
                                     max_length=16, preprocess=PreprocessConfig(resolution=16, dedup="exact")))
    assert exact["kept"] == 11 and exact["skipped"] == {"duplicate_image": 4}, exact
