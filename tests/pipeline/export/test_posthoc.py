"""Post-hoc EMA end to end: a run trained with --posthoc-ema snapshots its profiles at every checkpoint, and
jobs/posthoc_ema.py rebuilds any sigma_rel from them, as exports that sample and score, with the curve in MLflow."""
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import load_components
from pipeline.export.posthoc import PosthocOptions, write_exports
from pipeline.train.ldm_driver import run_train
from pipeline.train.options import TrainOptions

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def posthoc_run(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc")
    uri = f"sqlite:///{root}/m.db"
    s = run_train(TrainOptions(latents=tiny_cache, preset="tiny", overrides=("conditioning.text_encoder=hf",
                                                                            "unet.context_dim=384"),
                               num_workers=1, zero_stage=2, max_steps=9, batch_size=8, lr=2e-3, warmup_steps=1,
                               checkpoint_every=3, keep_checkpoints=2, sample_every=0, log_every=3,
                               storage_path=str(root / "runs"), name="posthoc", mlflow_uri=uri,
                               posthoc_ema=(0.05, 0.10), seed=0))
    return root, uri, s


def test_snapshots_are_kept_where_pruning_does_not_reach(posthoc_run):
    root, uri, s = posthoc_run
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(s["mlflow_run_id"], "posthoc_ema")}
    assert arts == {f"posthoc_ema/posthoc_ema_step{k:07d}.safetensors" for k in (3, 6, 9)}  # step 3's checkpoint
    kept = sorted(p.name for p in (root / "runs" / "posthoc").glob("checkpoint_*/posthoc_ema_step*.safetensors"))
    assert kept == ["posthoc_ema_step0000006.safetensors", "posthoc_ema_step0000009.safetensors"]  # is pruned
    ckpt = Path(s["checkpoint"])
    assert {"posthoc_ema_0.05.pt", "posthoc_ema_0.1.pt", "ema.pt"} <= {p.name for p in ckpt.iterdir()}


def test_a_tracked_sigma_rel_is_rebuilt_as_itself_and_others_between(posthoc_run, tmp_path):
    root, uri, s = posthoc_run
    out = write_exports(PosthocOptions(run=f"mlflow:{s['mlflow_run_id']}", sigma_rels=(0.05, 0.07), out=str(tmp_path),
                                       tracking_uri=uri), log=lambda *a: None)
    direct = load_file(str(Path(s["checkpoint"]) / "posthoc_ema_step0000009.safetensors"))
    rebuilt = {sigma: load_components(path)[0]["ema_unet"] for sigma, path in out}
    for k, v in rebuilt[0.05].items():
        assert (v - direct[f"0.05/unet.{k}"]).abs().max() <= 1e-4, k
    k = "out.2.weight"
    lo, hi, mid = direct[f"0.05/unet.{k}"], direct[f"0.1/unet.{k}"], rebuilt[0.07][k]
    assert not torch.equal(lo, hi)
    assert (mid - lo).abs().max() < (hi - lo).abs().max() * 1.5 and not torch.allclose(mid, lo)
    comps, config, meta = load_components(out[1][1])
    base = load_components(s["export"])[0]
    assert torch.equal(comps["unet"]["out.2.weight"], base["unet"]["out.2.weight"])  # the raw weights as they were
    assert meta["posthoc_sigma_rel"] == "0.07" and meta["step"] == "9"
    # from the run dir only the kept checkpoints' snapshots (6, 9) are there: rebuilt as of step 6
    early = write_exports(PosthocOptions(run=str(root / "runs" / "posthoc"), sigma_rels=(0.1,), out=str(tmp_path / "d"),
                                         step=6), log=lambda *a: None)
    six = load_file(str(root / "runs" / "posthoc" / sorted(
        p.parent.name for p in (root / "runs" / "posthoc").glob("checkpoint_*/posthoc_ema_step0000006.safetensors"))[0]
        / "posthoc_ema_step0000006.safetensors"))
    assert (load_components(early[0][1])[0]["ema_unet"][k] - six[f"0.1/unet.{k}"]).abs().max() <= 1e-4


def test_the_job_scores_each_rebuilt_ema_and_logs_the_curve(posthoc_run, tiny_cache, tmp_path):
    root, uri, s = posthoc_run
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "posthoc_ema.py"), "--run", f"mlflow:{s['mlflow_run_id']}",
                        "--mlflow-uri", uri, "--sigma-rel", "0.05", "0.15", "--out", str(tmp_path),
                        "--evaluate-input", str(Path(tiny_cache).parent / "shards"), "--num-samples", "8",
                        "--sample-steps", "3", "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lowest FD at sigma_rel" in r.stdout
    client = mlflow.MlflowClient(uri)
    fd = {m.step: m.value for m in client.get_metric_history(s["mlflow_run_id"], "posthoc/fd")}
    assert sorted(fd) == [50, 150] and all(v > 0 for v in fd.values())
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "posthoc_ema.py"), "--run", s["export"].rsplit(
        "/checkpoint_", 1)[0], "--sigma-rel", "0.3", "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=120)
    assert bad.returncode == 2 and "sigma_rel 0.3 must be in (0, 0.28)" in bad.stderr
