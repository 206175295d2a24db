"""jobs/encode_latents.py end to end on real shards through a real (embedded) Ray."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from ldm.metrics import psnr
from pipeline.common import storage
from pipeline.encode.flow import EncodeOptions, encoder_pool, run_encode
from pipeline.cache.reader import part_files, read_manifest
from pipeline.encode.latent_cache import CacheMismatch
from pipeline.common.models import load_autoencoder
from pipeline.data.preprocess import PreprocessConfig, decode_image, resize_crop
from pipeline.data.sources import discover_shards, read_shard
from salted import write_bad_parquet_set, write_salted_webdataset

ROOT = Path(__file__).resolve().parents[3]


def opts(inp, out, ae, **kw):
    pre = kw.pop("preprocess", PreprocessConfig(resolution=16))
    return EncodeOptions(input=str(inp), output=str(out), autoencoder=ae, preprocess=pre, batch_size=32,
                         write_batch_size=32, max_length=16, **kw)


def read_cache(out):
    m = read_manifest(str(out))
    tables = [pq.read_table(storage.read_bytes(f) if "://" in f else f) if "://" not in f else
              pq.read_table(__import__("io").BytesIO(storage.read_bytes(f))) for f in part_files(str(out), m)]
    keys = [k for t in tables for k in t["key"].to_pylist()]
    return m, tables, keys


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_encode_real_shards_and_decode_back(ray_local, fmnist_shards, tiny_ae_ckpt, tmp_path, layout):
    out = tmp_path / "latents"
    s = run_encode(opts(fmnist_shards[layout], out, tiny_ae_ckpt))
    m, tables, keys = read_cache(out)
    shards = discover_shards(fmnist_shards[layout])
    n_records = sum(1 for sh in shards.shards for r in read_shard({"uri": sh, "shard": 0}, shards.layout) if r["key"])
    assert s["read"] == n_records and m["counts"]["read"] == n_records
    assert len(keys) == len(set(keys)) == s["kept"] == n_records  # every real record is good
    assert m["latent_shape"] == [4, 8, 8] and len(m["latent_channel_std"] if "latent_channel_std" in m else
                                                  m["totals"]["latent_channel_std"]) == 4
    assert set(m["completed_shards"]) == set(shards.shards) and not m["failed_shards"]
    t = tables[0]
    assert t["latent_mean"].type.value_type == __import__("pyarrow").float16()
    assert t["input_ids"].type.list_size == 16 and t["label"].null_count < len(t)
    # decoding the stored posterior mean reproduces the image within the autoencoder's own error
    ae = load_autoencoder(tiny_ae_ckpt).model
    originals = {r["key"]: r for sh in shards.shards for r in read_shard({"uri": sh, "shard": 0}, shards.layout)}
    pre = PreprocessConfig(resolution=16)
    rows = t.slice(0, 16).to_pylist()
    x = torch.stack([torch.from_numpy(resize_crop(decode_image(originals[r["key"]]["image"], pre)[0], pre, r["key"])[0])
                     .permute(2, 0, 1).float() / 127.5 - 1 for r in rows])
    stored = torch.tensor(np.array([r["latent_mean"] for r in rows], np.float32)).view(-1, 4, 8, 8)
    with torch.no_grad():
        from_cache = ae.decode(stored)
        direct = ae.decode(ae.encode(x).mean)
    p_cache, p_direct = psnr(from_cache, x).mean(), psnr(direct, x).mean()
    assert p_direct > 18, p_direct  # the tiny AE really reconstructs
    assert abs(p_cache - p_direct) < 0.2, (p_cache, p_direct)
    # rerun: nothing to do, same cache
    s2 = run_encode(opts(fmnist_shards[layout], out, tiny_ae_ckpt))
    assert s2["encoded_this_run"] == 0 and read_cache(out)[2] == keys


def test_flipped_latents_are_the_mirrored_images(ray_local, fmnist_shards, tiny_ae_ckpt, tmp_path):
    """--flip-latents: each row also holds the posterior of its image mirrored left-right, which decodes to the
    mirrored image; the summary reports how far mirroring the latent itself would be from it."""
    out = tmp_path / "flipped"
    pre = PreprocessConfig(resolution=16, flip_latents=True)
    s = run_encode(opts(fmnist_shards["webdataset"], out, tiny_ae_ckpt, preprocess=pre, max_shards=1))
    m, tables, _ = read_cache(out)
    assert m["preprocess"]["flip_latents"] and 0 < s["flip_gap"] == m["totals"]["flip_gap"]
    t = tables[0]
    assert t["latent_flip_mean"].type == t["latent_mean"].type
    shards = discover_shards(fmnist_shards["webdataset"])
    originals = {r["key"]: r for sh in shards.shards for r in read_shard({"uri": sh, "shard": 0}, shards.layout)}
    rows = t.slice(0, 16).to_pylist()
    x = torch.stack([torch.from_numpy(resize_crop(decode_image(originals[r["key"]]["image"], pre)[0], pre, r["key"])[0])
                     .permute(2, 0, 1).float() / 127.5 - 1 for r in rows])
    ae = load_autoencoder(tiny_ae_ckpt).model
    with torch.no_grad():
        flipped = ae.decode(torch.tensor(np.array([r["latent_flip_mean"] for r in rows], np.float32)).view(-1, 4, 8, 8))
    to_mirrored, to_original = psnr(flipped, x.flip(-1)).mean(), psnr(flipped, x).mean()
    assert to_mirrored > 18 and to_mirrored > to_original, (to_mirrored, to_original)
    mirrored = torch.tensor(np.array([r["latent_mean"] for r in rows], np.float32)).view(-1, 4, 8, 8).flip(-1)
    stored = torch.tensor(np.array([r["latent_flip_mean"] for r in rows], np.float32)).view(-1, 4, 8, 8)
    gap = (mirrored - stored).pow(2).mean().sqrt() / m["totals"]["latent_std"]
    assert abs(gap - s["flip_gap"]) < 0.1 * s["flip_gap"], (gap, s["flip_gap"])  # fp16 rows vs the encoder's fp32
    with pytest.raises(CacheMismatch, match="flip_latents=True but this run has flip_latents=False"):
        run_encode(opts(fmnist_shards["webdataset"], out, tiny_ae_ckpt))
    # training flips half the samples by default (auto) from this cache, and refuses flips from a cache without them
    from pipeline.train.ldm_driver import CacheConfigMismatch, run_train
    from pipeline.train.options import TrainOptions
    lines = []
    train = dict(preset="tiny", overrides=("conditioning.text_encoder=hf", "unet.context_dim=384",
                                           "conditioning.max_length=16"), num_workers=1, zero_stage=0, max_steps=3,
                 batch_size=8, checkpoint_every=10, sample_every=0, storage_path=str(tmp_path / "runs"))
    r = run_train(TrainOptions(latents=str(out), **train), log=lines.append)
    assert r["step"] == 3 and np.isfinite(r["loss"])
    assert any("each sample mirrored with probability 0.5" in x for x in lines), lines
    run_encode(opts(fmnist_shards["webdataset"], tmp_path / "plain", tiny_ae_ckpt, max_shards=1))
    with pytest.raises(CacheConfigMismatch, match="encoded without them: re-encode .* --flip-latents"):
        run_train(TrainOptions(latents=str(tmp_path / "plain"), flip_prob=0.5, **train))


def test_salted_records_counted_by_reason_and_bad_shard_named(ray_local, tmp_path):
    expect = write_salted_webdataset(tmp_path / "salted")
    pre = PreprocessConfig(resolution=16, min_aesthetic=4.5)
    s = run_encode(opts(tmp_path / "salted", tmp_path / "out", "random:tiny", preprocess=pre))
    assert len(expect["skipped"]) >= 10
    assert s["skipped"] == expect["skipped"]
    m, tables, keys = read_cache(tmp_path / "out")
    assert set(keys) == expect["good_keys"] and s["kept"] == expect["kept"]
    (failed_uri, err), = m["failed_shards"].items()
    assert failed_uri.endswith("00001.tar") and "00001.tar" in err and "ReadError" in err
    # the truncated shard's whole records before the cut are kept, it is retried by a rerun
    assert m["shards"][failed_uri]["kept"] == 5
    s2 = run_encode(opts(tmp_path / "salted", tmp_path / "out", "random:tiny", preprocess=pre))
    assert s2["encoded_this_run"] == 1 and read_cache(tmp_path / "out")[2].count("tgood0") == 1


def test_bad_parquet_shards_do_not_stop_others(ray_local, fmnist_shards, tmp_path):
    good = Path(fmnist_shards["parquet"], "00000.parquet").read_bytes()
    write_bad_parquet_set(tmp_path / "pq", good)
    s = run_encode(opts(tmp_path / "pq", tmp_path / "out", "random:tiny"))
    assert s["kept"] == 40 and set(Path(u).name for u in s["shards_failed"]) == {"00001.parquet", "00002.parquet"}
    assert "no image column" in s["shards_failed"][str(tmp_path / "pq" / "00002.parquet")]


def test_clear_errors(ray_local, fmnist_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_encode(opts(tmp_path / "nope", tmp_path / "o", "random:tiny"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root writes anywhere; a file in the way works for everyone
        with pytest.raises(PermissionError, match="not writable"):
            run_encode(opts(fmnist_shards["webdataset"], ro / "x", "random:tiny"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        run_encode(opts(fmnist_shards["webdataset"], tmp_path / "afile" / "x", "random:tiny"))
    with pytest.raises(ValueError, match="not a multiple"):
        run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o", "random:demo",
                        preprocess=PreprocessConfig(resolution=18)))
    run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o2", "random:tiny", max_shards=1))
    with pytest.raises(CacheMismatch, match="latents of different encoders, or rows with and without"):
        run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o2", "random:tiny:1"))
    # a rerun that would add a task's condition columns to some parts only is refused too
    with pytest.raises(CacheMismatch, match="inpaint_variants=0 but this run has inpaint_variants=2"):
        run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o2", "random:tiny",
                        preprocess=PreprocessConfig(resolution=16, inpaint_variants=2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(str(tmp_path / "missing.safetensors"))
    # the web-data settings name the flag and the fix
    for pre, message in ((PreprocessConfig(resolution=16, extra_resolutions=(24,)), "24 is not a multiple of the "
                          "first resolution 16"),
                         (PreprocessConfig(resolution=16, bucket=True, bucket_step=4, label_maps=True),
                          "--label-maps caches a square condition"),
                         (PreprocessConfig(resolution=16, bucket=True, bucket_step=3), "--bucket-step 3 must be a "
                          "positive multiple of the autoencoder's f=2"),
                         (PreprocessConfig(resolution=16, dedup="fuzzy"), "--dedup 'fuzzy': use one of off, exact")):
        with pytest.raises(ValueError, match=message):
            run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o3", "random:tiny", preprocess=pre))
    sys.path.insert(0, str(ROOT / "jobs"))
    from encode_latents import resolutions
    assert resolutions("256,512") == [256, 512]
    with pytest.raises(ValueError, match="give increasing sizes"):
        resolutions("512,256")


def test_s3_input_and_output(ray_local, s3_server, fmnist_shards, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem()
    fs.mkdir("ldm-test")
    fs.put(fmnist_shards["webdataset"] + "/", "ldm-test/shards/", recursive=True)
    from ldm.text_encoders import default_text_encoder_path
    fs.put(default_text_encoder_path() + "/", "ldm-test/minilm/", recursive=True)  # a text encoder on S3 too
    s = run_encode(opts("s3://ldm-test/shards", "s3://ldm-test/latents", "random:tiny",
                        text_encoder="s3://ldm-test/minilm", store_text_embeddings=True))
    assert s["shards_done"] == 3 and not s["shards_failed"]
    m = json.loads(fs.cat("ldm-test/latents/manifest.json"))
    assert m["counts"]["kept"] == s["kept"] > 100 and m["text_encoder"]["source"] == "s3://ldm-test/minilm"
    assert m["text_encoder"]["dim"] == 384 and m["text_encoder"]["embeddings"] is True
    files = [f for sh in m["shards"].values() for f in sh["files"]]
    assert files and all(fs.exists(f"ldm-test/latents/{f}") for f in files)
    assert len(fs.ls("ldm-test/latents/commits")) == 3  # one commit record per shard


def test_mlflow_summary(ray_local, fmnist_shards, tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o", "random:tiny", mlflow_uri=uri, max_shards=1))
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(s["mlflow_run_id"])
    assert run.data.metrics["kept"] == s["kept"] and run.data.params["preprocess.resolution"] == "16"
    cpus = ray.cluster_resources()["CPU"]  # the pool as it ran (auto: one single-threaded encoder per CPU), not "0"
    assert (run.data.params["num_encoders"], run.data.params["encoder_threads"]) == (str(int(cpus)), "1")
    assert "manifest.json" in [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]


def test_decode_and_write_tasks_do_not_import_torch():
    """Every Ray worker that runs a read, decode or write task imports these modules; torch would cost each ~2 s."""
    code = ("import sys, pipeline.data.datasets, pipeline.encode.latent_cache; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_encoder_pool_auto_on_the_embedded_cpu_ray_else_one_encoder_of_one_cpu():
    o = EncodeOptions(input="", output="", autoencoder="random:tiny")
    assert (o.num_encoders, o.cpus_per_encoder) == (0, 0.0)  # auto
    local = encoder_pool(o, "local", 2, 0)  # one single-threaded encoder per CPU, beside one decode task (0.5 CPU)
    assert (local.num_encoders, local.cpus_per_encoder, local.encoder_threads) == (2, 0.75, 1)
    assert encoder_pool(o, "local", 8, 0).cpus_per_encoder == 0.938
    for mode, gpus in (("cluster", 0), ("local", 1)):  # a cluster's pool or a GPU's: one encoder of 1 CPU
        p = encoder_pool(o, mode, 8, gpus)
        assert (p.num_encoders, p.cpus_per_encoder, p.encoder_threads) == (1, 1.0, 1)
    mine = encoder_pool(replace(o, num_encoders=3, encoder_threads=2), "local", 2, 0)  # given: kept (CPUs: 1 each)
    assert (mine.num_encoders, mine.cpus_per_encoder, mine.encoder_threads) == (3, 1.0, 2)


def _encode_cmd(inp, out):
    return [sys.executable, str(ROOT / "jobs" / "encode_latents.py"), "--input", str(inp), "--output", str(out),
            "--autoencoder", "random:demo", "--resolution", "32", "--batch-size", "16", "--max-length", "8",
            "--write-batch-size", "16"]


def test_kill_and_resume_equals_uninterrupted(ray_local, tmp_path):
    from pipeline.data.make_shards import fashion_records, write_shards
    # 16 shards: a burst of commits between two polls must not finish them all before the kill (with 8 of 60
    # records, one CI run saw all 8 committed at its first look)
    write_shards(fashion_records("test", 480, 1, "png"), str(tmp_path / "in"), "webdataset", 30, seed=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_encode_cmd(tmp_path / "in", tmp_path / "full"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen(_encode_cmd(tmp_path / "in", tmp_path / "part"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300:  # shards are committed one record each; the manifest is compacted later
        commits = tmp_path / "part" / "commits"
        if commits.exists() and len([c for c in commits.iterdir() if c.suffix == ".json"]) >= 2:
            break
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = read_manifest(str(tmp_path / "part"))["completed_shards"]  # manifest + commit records
    assert 2 <= len(done_at_kill) < 16, done_at_kill
    visible = sorted(p.name for p in (tmp_path / "part" / "parts").iterdir() if not p.name.startswith("."))
    assert len(visible) >= len(done_at_kill)  # only whole files under final names
    resumed = subprocess.run(_encode_cmd(tmp_path / "in", tmp_path / "part"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(done_at_kill)} already done" in resumed.stdout
    mf, _, keys_full = read_cache(tmp_path / "full")
    mp, _, keys_part = read_cache(tmp_path / "part")
    assert sorted(keys_part) == sorted(keys_full) and len(keys_part) == len(set(keys_part)) == 480
    assert mp["counts"] == mf["counts"] and mp["completed_shards"] == mf["completed_shards"]
    assert mp["totals"]["latent_channel_std"] == pytest.approx(mf["totals"]["latent_channel_std"], rel=1e-6)
    # the killed run's unfinished parts and temp files are swept: every file left is one a commit names
    named = {f for sh in mp["shards"].values() for f in [*sh["files"], sh["commit"]]}
    left = {f"{d}/{p.name}" for d in ("parts", "commits") for p in (tmp_path / "part" / d).iterdir()}
    assert left == named, left ^ named


def test_decompression_bomb_counts_as_too_large(monkeypatch):
    """Over Pillow's limit the image is refused at open (DecompressionBombError): counted too_large, not corrupt."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    cfg = PreprocessConfig(resolution=16, max_pixels=10 ** 9)
    assert decode_image(buf.getvalue(), cfg)[1] is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000: an error at open
    assert decode_image(buf.getvalue(), cfg) == (None, "too_large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 px > 3000: Pillow's warning at load
    assert decode_image(buf.getvalue(), cfg) == (None, "too_large")


def test_cache_files_get_the_umask_mode_not_0600(ray_local, fmnist_shards, tmp_path):
    """Parts and manifest are readable by a training job running as another user (a pod with its own UID)."""
    old = os.umask(0o022)
    try:
        run_encode(opts(fmnist_shards["webdataset"], tmp_path / "o", "random:tiny", max_shards=1))
    finally:
        os.umask(old)
    files = [tmp_path / "o" / "manifest.json", *(tmp_path / "o" / "parts").iterdir()]
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o644}


def test_unreachable_storage_is_one_exit_code(tmp_path):
    """An S3 endpoint that is down gives exit 5 and a message naming it, for the input and for the output alike."""
    from helpers import free_port
    from pipeline.data.make_shards import fashion_records, write_shards
    write_shards(fashion_records("test", 8, 1, "png"), str(tmp_path / "in"), "webdataset", 8, seed=1)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    for inp, out, which in (("s3://down/in", tmp_path / "o", "input"), (tmp_path / "in", "s3://down/out", "output")):
        r = subprocess.run(_encode_cmd(inp, out), env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 5, (which, r.stderr[-2000:])
        assert f"cannot reach the storage of the {which}" in r.stderr and env["AWS_ENDPOINT_URL"] in r.stderr


def test_two_plain_jobs_on_one_machine_stay_private(tmp_path):
    """Two `python jobs/encode_latents.py` at once: each starts its own embedded Ray (they used to join each other's
    through address="auto" and deadlock on 2 cores), and both finish with exact counts."""
    from pipeline.data.make_shards import fashion_records, write_shards
    write_shards(fashion_records("test", 64, 1, "png"), str(tmp_path / "in"), "webdataset", 32, seed=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(_encode_cmd(tmp_path / "in", tmp_path / f"out{i}"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "ray: local" in out and "2/2 complete" in out
    for i in range(2):
        m = read_manifest(str(tmp_path / f"out{i}"))
        assert m["counts"]["kept"] == 64 and len(m["completed_shards"]) == 2
