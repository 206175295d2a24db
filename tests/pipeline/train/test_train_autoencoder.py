"""jobs/train_autoencoder.py: 2-worker stage-1 runs (DDP on Ray Train) on real images, evaluated on held-out
images, tracked in MLflow, resumable, and usable by the encode job."""
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from ldm.autoencoder import build_autoencoder
from ldm.config import get_preset
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.evaluate.metrics import evaluate_autoencoder, shard_image_batches
from pipeline.data.make_shards import fashion_records, photo_records, write_shards
from pipeline.data.preprocess import PreprocessConfig
from pipeline.compare_f import CompareFOptions, run_compare_f
from pipeline.train.autoencoder_driver import ch_mult_for_f, run_train_autoencoder
from pipeline.train.options import AETrainOptions

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def stage1_shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    write_shards(fashion_records("train", 600, 0, "png"), str(root / "train"), "webdataset", 200, seed=0)

    def test_recs():
        yield from fashion_records("test", 120, 0, "png")
        yield from photo_records("test", 0, "jpg")  # real colour photos too
    write_shards(test_recs(), str(root / "test"), "webdataset", 200, seed=0)
    return root


def aeopts(root, tmp_path, **kw):
    base = dict(input=str(root / "train"), preset="tiny", num_workers=2, max_steps=60, batch_size=16, lr=1e-3,
                checkpoint_every=20, sample_every=30, log_every=10, storage_path=str(tmp_path / "runs"),
                eval_max_images=200, eval_fd=True, max_failures=0)
    base.update(kw)
    return AETrainOptions(**base)


def untrained_psnr(root, reg):
    cfg = get_preset("tiny").autoencoder
    torch.manual_seed(0)
    model = build_autoencoder(cfg.__class__(**{**cfg.__dict__, "reg": reg}))
    return evaluate_autoencoder(model, shard_image_batches(str(root / "test"), 16), fd=False)["psnr"]


def test_kl_two_workers_tracked_resumed_and_usable_by_encode(stage1_shards, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    s = run_train_autoencoder(aeopts(stage1_shards, tmp_path, reg="kl", mlflow_uri=uri, name="kl", max_steps=40))
    assert s["step"] == 40 and s["eval"]["images"] > 120  # the default held-out set: the sibling test/ folder
    base = untrained_psnr(stage1_shards, "kl")
    assert s["eval"]["psnr"] > base + 4, (s["eval"]["psnr"], base)
    assert "fd_effnet_lite0" in s["eval"]
    client = mlflow.MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(s["mlflow_run_id"], "model")] == ["model/autoencoder.safetensors"]
    assert {"reconstructions/recon_0000030.png"} <= {a.path for a in client.list_artifacts(s["mlflow_run_id"],
                                                                                            "reconstructions")}
    hist = client.get_metric_history(s["mlflow_run_id"], "psnr")
    assert len(hist) == 40 and client.get_run(s["mlflow_run_id"]).data.metrics["eval/psnr"] == pytest.approx(
        s["eval"]["psnr"])
    # resume: the same run name continues from its last checkpoint to a higher step count, same MLflow run
    s2 = run_train_autoencoder(aeopts(stage1_shards, tmp_path, reg="kl", mlflow_uri=uri, name="kl", max_steps=60,
                                      eval_fd=False))  # FD was checked above
    assert s2["step"] == 60 and s2["mlflow_run_id"] == s["mlflow_run_id"]
    assert len(client.get_metric_history(s["mlflow_run_id"], "psnr")) == 60  # 40 + 20, no step trained twice
    # the registered model feeds the encode job directly
    spec = f"models:/ae-tiny-kl-f2/{s2['model_version']}"
    out = run_encode(EncodeOptions(input=str(stage1_shards / "test"), output=str(tmp_path / "lat"), autoencoder=spec,
                                   preprocess=PreprocessConfig(resolution=16), max_length=8, mlflow_uri=uri))
    assert out["kept"] > 120 and not out["shards_failed"]


def test_vq_two_workers_beats_untrained(stage1_shards, tmp_path):
    s = run_train_autoencoder(aeopts(stage1_shards, tmp_path, reg="vq", name="vq", sample_every=0))
    base = untrained_psnr(stage1_shards, "vq")
    assert s["eval"]["psnr"] > base + 3, (s["eval"]["psnr"], base)
    assert 0 < s["eval"]["codebook_usage"] <= 1 and s["eval"]["codebook_perplexity"] > 1


def test_compare_f_parent_and_children(stage1_shards, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    # paper §4.1 carried through: per f a first stage, its cache, an LDM with the same budget, FD of its samples
    r = run_compare_f(aeopts(stage1_shards, tmp_path, num_workers=1, max_steps=15, sample_every=0, eval_fd=False,
                             mlflow_uri=uri, checkpoint_every=100, eval_max_images=64), [1, 16],
                      CompareFOptions(ldm_steps=8, ldm_batch_size=16, eval_samples=16, sample_steps=4))
    assert [row["f"] for row in r["rows"]] == [1, 16]  # the extremes: no downsampling, and a 1x1 latent
    assert [row["latent_numbers"] for row in r["rows"]] == [4 * 16 * 16, 4 * 1 * 1]  # f=16: a 1-level UNet
    assert all(row["sample_fd"] > 0 and row["ldm_samples_per_s"] > 0 for row in r["rows"])
    client = mlflow.MlflowClient(uri)
    children = client.search_runs([mlflow.get_experiment_by_name("train_autoencoder").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{r['parent_run_id']}'")
    assert len(children) == 4  # a stage-1 run and an LDM run per f
    assert "| 16 | 4x1x1 |" in r["table"] and "FD-EffNetLite0 (samples)" in r["table"]
    assert [m.step for m in client.get_metric_history(r["parent_run_id"], "sample_fd")] == [1, 16]
    assert {a.path for a in client.list_artifacts(r["parent_run_id"])} >= {"compare_f.md", "compare_f.png"}


def test_ch_mult_for_f():
    assert ch_mult_for_f(1, (1, 2, 2)) == (1,)
    assert ch_mult_for_f(4, (1, 2, 2)) == (1, 2, 2)
    assert ch_mult_for_f(16, (1, 2, 2)) == (1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="power of two"):
        ch_mult_for_f(6, (1, 2))


def test_evaluate_cli(stage1_shards, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--autoencoder", "random:tiny",
                          "--input", str(stage1_shards / "test"), "--no-fd", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PSNR" in out.stdout and (tmp_path / "r.json").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--autoencoder", "/nope.safetensors",
                          "--input", str(stage1_shards / "test")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
