"""The latent cache's write path without Ray: write tasks' parts and summaries, the driver's ledger (one commit
record per shard, manifest compaction), readers folding in commits, a redone shard, and the sweep."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache.reader import part_files, read_manifest, shard_files
from pipeline.encode.latent_cache import CacheMismatch, ShardLedger, write_parts

HEADER = {"autoencoder": {"config_hash": "a", "weights_sha256": "b"}, "text_encoder": {"kind": "none"},
          "resolution": 16, "latent_shape": [4, 2, 2], "layout": "webdataset", "preprocess": {}}


def encoded(rows: list[tuple[int, str, str]], totals: dict[int, int], errors: dict[int, str] | None = None) -> dict:
    """An encoder output batch: (shard, key, skip) per row; the row named in `totals` carries its shard's total."""
    n = len(rows)
    rng = np.random.default_rng(n)
    tot = np.full(n, -1)
    err = np.array([""] * n, dtype=object)
    for s, i in totals.items():
        tot[i] = s
        err[i] = (errors or {}).get(rows[i][0], "")
    return {"shard": np.array([r[0] for r in rows]), "key": np.array([r[1] for r in rows], dtype=object),
            "skip": np.array([r[2] for r in rows], dtype=object), "caption": np.array(["c"] * n, dtype=object),
            "latent_mean": rng.standard_normal((n, 16)).astype(np.float16), "latent_std": np.ones((n, 16), np.float16),
            "orig_w": np.full(n, 20), "orig_h": np.full(n, 20), "crop_top": np.zeros(n), "crop_left": np.zeros(n),
            "meta": np.array(['{"label": 2}'] * n, dtype=object), "ext": np.array(["png"] * n, dtype=object),
            "shard_total": tot, "shard_error": err}


def test_shard_spread_over_batches_commits_once_with_exact_counts(tmp_path):
    out = str(tmp_path / "c")
    ledger = ShardLedger(out, HEADER, compact_seconds=3600)
    ledger.start(["s3://b/00000.tar", "s3://b/00001.tar"])
    # shard 0: 4 rows over two batches (one skipped); shard 1: empty (its marker row only)
    b1 = encoded([(0, "k0", ""), (0, "k1", "corrupt"), (1, "", "empty_shard")], {1: 2})
    b2 = encoded([(0, "k3", ""), (0, "k2", "")], {4: 1})
    s1, s2 = write_parts(b1, out, 4, ledger.run), write_parts(b2, out, 4, ledger.run)
    assert list(s1["shard"]) == [0, 1] and list(s1["kept"]) == [1, 0] and s1["file"][1] == ""
    assert ledger.add(s1) == ["s3://b/00001.tar"]  # the empty shard is complete at once
    assert ledger.add(s2) == ["s3://b/00000.tar"]
    # committed by its record; the manifest on disk is not rewritten per shard (compaction is periodic)
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert on_disk["shards"] == {}
    m = read_manifest(out)  # readers fold the commit records in
    e = m["shards"]["s3://b/00000.tar"]
    assert (e["read"], e["kept"], e["skipped"]) == (4, 3, {"corrupt": 1}) and len(shard_files(e)) == 2
    assert m["counts"] == {"read": 4, "kept": 3, "skipped_total": 1}  # an empty shard's marker is no record
    assert m["shards"]["s3://b/00001.tar"]["read"] == 0 and "s3://b/00001.tar" in m["completed_shards"]
    keys = [k for f in part_files(out, m) for k in pq.read_table(f)["key"].to_pylist()]
    assert sorted(keys) == ["k0", "k2", "k3"] and pq.read_table(part_files(out, m)[0])["label"][0].as_py() == 2
    assert m["totals"]["latent_channel_std"] and len(m["totals"]["latent_channel_mean"]) == 4
    ledger.write_manifest()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["counts"] == m["counts"]


def test_redone_shard_replaces_its_parts_and_stray_files_are_swept(tmp_path):
    out = str(tmp_path / "c")
    ledger = ShardLedger(out, HEADER)
    ledger.start(["/d/00000.tar"])
    first = write_parts(encoded([(0, "a", ""), (0, "b", "")], {2: 1}, {0: "/d/00000.tar: ReadError: truncated"}),
                        out, 4, ledger.run)
    ledger.add(first)
    ledger.write_manifest()
    assert read_manifest(out)["failed_shards"] == {"/d/00000.tar": "/d/00000.tar: ReadError: truncated"}
    old_files = shard_files(read_manifest(out)["shards"]["/d/00000.tar"])
    # a rerun redoes the failed shard; a killed run's part (no commit names it) lies beside
    (tmp_path / "c" / "parts" / "deadbeef-0000000-00000000.parquet").write_bytes(b"half")
    (tmp_path / "c" / "parts" / ".x.parquet.123.tmp").write_bytes(b"")
    again = ShardLedger(out, HEADER)
    assert again.start(["/d/00000.tar"]) == 2
    again.add(write_parts(encoded([(0, "a", ""), (0, "b", ""), (0, "c", "")], {3: 2}), out, 4, again.run))
    m = read_manifest(out)
    assert not m["failed_shards"] and m["counts"]["kept"] == 3
    keys = [k for f in part_files(out, m) for k in pq.read_table(f)["key"].to_pylist()]
    assert sorted(keys) == ["a", "b", "c"]  # never the first attempt's rows twice
    left = {f"{d.name}/{p.name}" for d in (tmp_path / "c" / "parts", tmp_path / "c" / "commits") for p in d.iterdir()}
    assert left == {*shard_files(m["shards"]["/d/00000.tar"]), m["shards"]["/d/00000.tar"]["commit"]}
    assert not set(old_files) & left


def test_another_encoder_is_refused(tmp_path):
    out = str(tmp_path / "c")
    ShardLedger(out, HEADER).start(["x"])
    with pytest.raises(CacheMismatch, match="latent_shape"):
        ShardLedger(out, {**HEADER, "latent_shape": [4, 4, 4]})
