"""Sample quality end to end: a tiny LDM trained on a real first stage logs FD along training, and
jobs/evaluate.py --model scores it (table, plot, JSON, an MLflow run under the training run)."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from ldm.checkpoint import load_components, save_components
from ldm.config import LDMConfig, from_dict
from ldm.model import LatentDiffusion
from pipeline.data.make_shards import fashion_records, write_shards
from pipeline.data.preprocess import PreprocessConfig
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.evaluate.held_out import read_held_out
from pipeline.evaluate.model_eval import ModelEvalOptions, evaluate_model
from pipeline.evaluate.scores import SampleScores, load_feature_net
from pipeline.train.ldm_driver import run_train
from pipeline.train.options import TrainOptions
from sd_models import tiny_clip

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trained(ray_local, tiny_ae_ckpt, tmp_path_factory):
    """320 Fashion-MNIST training images encoded by a real (briefly trained) first stage, 48 held-out ones, and
    a tiny text-conditional LDM trained on them for 150 steps with FD evaluated at steps 75 and 150."""
    root = tmp_path_factory.mktemp("eval")
    write_shards(fashion_records("train", 320, 0, "png"), str(root / "train"), "webdataset", 160, seed=0)
    write_shards(fashion_records("test", 48, 0, "png"), str(root / "test"), "webdataset", 48, seed=0)
    run_encode(EncodeOptions(input=str(root / "train"), output=str(root / "latents"), autoencoder=tiny_ae_ckpt,
                             preprocess=PreprocessConfig(resolution=16), max_length=16, batch_size=64,
                             store_text_embeddings=True), log=lambda *a: None)
    uri = f"sqlite:///{root}/mlflow.db"
    s = run_train(TrainOptions(
        latents=str(root / "latents"), preset="tiny",
        overrides=("conditioning.text_encoder=hf", "unet.context_dim=384"),
        num_workers=1, zero_stage=0, max_steps=150, batch_size=32, lr=3e-3, warmup_steps=10, ema_decay=0.95,
        checkpoint_every=1000, sample_every=0, sample_steps=10, cfg_scale=2.0, log_every=50,
        eval_every=75, eval_samples=32, eval_input=str(root / "test"),
        storage_path=str(root / "runs"), name="evaluated", mlflow_uri=uri, experiment="train", seed=0))
    return {"root": root, "uri": uri, **s}


def test_training_logs_sample_fd_along_the_loss(trained):
    client = mlflow.MlflowClient(trained["uri"])
    fd = client.get_metric_history(trained["mlflow_run_id"], "FD-EffNetLite0")
    kid = client.get_metric_history(trained["mlflow_run_id"], "KID-EffNetLite0")
    assert sorted(m.step for m in fd) == [75, 150] and sorted(m.step for m in kid) == [75, 150]
    assert all(m.value > 0 for m in fd)


def test_trained_model_scores_better_than_noise_and_than_the_untrained_model(trained, tmp_path):
    untrained = tmp_path / "untrained.safetensors"
    comps, config, meta = load_components(trained["export"])
    torch.manual_seed(0)
    fresh = LatentDiffusion(from_dict(LDMConfig, config)).unet.state_dict()
    save_components(untrained, {"unet": fresh, "ema_unet": fresh}, config, meta)
    o = dict(input=str(trained["root"] / "test"), num_samples=48, cfg_scales=(2.0,), steps=(10,), workers=1,
             agreement=False)
    ours = evaluate_model(ModelEvalOptions(model=trained["export"], **o))["rows"][0]
    again = evaluate_model(ModelEvalOptions(model=trained["export"], **o))["rows"][0]
    base = evaluate_model(ModelEvalOptions(model=str(untrained), **o))["rows"][0]
    held = read_held_out(str(trained["root"] / "test"), 16, 48)
    noise = SampleScores(load_feature_net(), held.images).score(
        torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert {k: v for k, v in ours.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert ours["fd"] < base["fd"] and ours["fd"] < noise["fd"], (ours["fd"], base["fd"], noise["fd"])
    assert ours["kid"] < base["kid"] and ours["kid"] < noise["kid"]
    print(f"FD trained {ours['fd']:.1f} untrained {base['fd']:.1f} noise {noise['fd']:.1f}")


def test_generation_spread_over_ray_data_workers_gives_the_same_images(trained):
    o = dict(model=trained["export"], input=str(trained["root"] / "test"), num_samples=12, cfg_scales=(2.0,),
             steps=(4,), batch_size=5, agreement=False)
    here = evaluate_model(ModelEvalOptions(workers=1, **o))["rows"][0]
    spread = evaluate_model(ModelEvalOptions(workers=2, cpus_per_worker=0.5, **o))["rows"][0]
    assert spread["fd"] == pytest.approx(here["fd"], rel=1e-3) and spread["kid"] == pytest.approx(here["kid"],
                                                                                                  rel=1e-2, abs=1e-4)


def test_evaluate_job_sweeps_and_writes_json_plot_and_a_child_mlflow_run(trained, tmp_path):
    out = tmp_path / "eval.json"
    clip = tiny_clip(tmp_path / "clip")  # a random stand-in: the CLIP score's plumbing, not its value
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", trained["export"],
                        "--input", str(trained["root"] / "test"), "--num-samples", "24", "--cfg-scales", "1,3",
                        "--steps", "4,8", "--json", str(out), "--mlflow-uri", trained["uri"], "--workers", "1",
                        "--no-agreement", "--baselines", "--clip-model", str(clip)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| cfg | steps | FD-EffNetLite0 |" in r.stdout
    res = json.loads(out.read_text())
    assert {"fd", "kid", "precision", "recall", "feature_net", "num_samples"} <= set(res["rows"][0])
    assert res["feature_net"] == "EffNetLite0" and res["num_samples"] == 24 and res["seed"] == 0
    assert [(x["cfg_scale"], x["steps"]) for x in res["rows"]] == [(1.0, 4), (1.0, 8), (3.0, 4), (3.0, 8)]
    assert out.with_suffix(".png").exists()
    assert [b["baseline"] for b in res["baselines"]] == ["noise", "untrained"] and "| noise | 4 |" in r.stdout
    client = mlflow.MlflowClient(trained["uri"])
    runs = client.search_runs([client.get_run(trained["mlflow_run_id"]).info.experiment_id],
                              f"tags.ldm_ray.evaluates_run = '{trained['mlflow_run_id']}'")
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == trained["mlflow_run_id"]
    assert runs[0].data.metrics["FD-EffNetLite0/cfg3_steps8"] == pytest.approx(res["rows"][3]["fd"])
    assert runs[0].data.metrics["FD-EffNetLite0/baseline_noise"] == pytest.approx(res["baselines"][0]["fd"])
    # the CLIP score of every point, raw and x100, in the JSON, the table and MLflow
    assert all(-1 <= x["clip_score"] <= 1 and x["clip_score_x100"] == pytest.approx(max(100 * x["clip_score"], 0))
               for x in res["rows"] + res["baselines"])
    assert "CLIP score (x100) |" in r.stdout
    assert runs[0].data.metrics["clip_score/cfg3_steps8"] == pytest.approx(res["rows"][3]["clip_score"])
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluate")}
    assert {"evaluate/eval.png", "evaluate/evaluate.json", "evaluate/table.json"} <= arts
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", trained["export"],
                          "--input", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nowhere" in bad.stderr


def test_mlperf_protocol_end_to_end_on_stand_in_files(trained, tmp_path):
    """--protocol mlperf at a tiny size: COCO-style captions, a stand-in Inception and CLIP, reference statistics of
    the stand-in's features of real held-out images; the figures in the JSON and an MLflow run under training's."""
    from helpers import coco_json, tiny_inception
    inception = tiny_inception(tmp_path / "inception.pt")
    real = read_held_out(str(trained["root"] / "test"), 16, 48).images
    feats = load_feature_net(str(inception))(real)[0].double().numpy()
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats.T))
    out = tmp_path / "mlperf.json"
    args = ["--model", trained["export"], "--protocol", "mlperf", "--captions", str(coco_json(tmp_path / "c.json")),
            "--inception-weights", str(inception), "--clip-model", str(tiny_clip(tmp_path / "clip")),
            "--fid-stats", str(tmp_path / "stats.npz"), "--num-samples", "6", "--steps", "3", "--workers", "1",
            "--json", str(out), "--mlflow-uri", trained["uri"]]
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["num_samples"] == 6 and res["cfg_scale"] == 8.0 and res["seed"] == 2023 and res["sampler"] == "ddim"
    assert res["fid"] > 0 and -1 <= res["clip_score"] <= 1 and isinstance(res["meets_target"], bool)
    assert "MLPerf: FID" in r.stdout and "the target (FID <= 90, CLIP >= 0.15)" in r.stdout
    client = mlflow.MlflowClient(trained["uri"])
    runs = client.search_runs([client.get_run(trained["mlflow_run_id"]).info.experiment_id],
                              "tags.ldm_ray.protocol = 'mlperf'")
    assert len(runs) == 1 and runs[0].data.metrics["mlperf/fid"] == pytest.approx(res["fid"])
    missing = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", trained["export"],
                              "--protocol", "mlperf", "--captions", str(tmp_path / "nowhere.json")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--fid-stats (not given)" in missing.stderr
