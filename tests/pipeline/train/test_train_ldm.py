"""jobs/train_ldm.py end to end: Ray Train (2 CPU workers) + real DeepSpeed ZeRO + MLflow."""
import glob
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ldm.checkpoint import load_components
from ldm.config import ConfigError
from pipeline.common.errors import DataError
from pipeline.cache.reader import part_files, read_manifest
from pipeline.train.options import TrainOptions
from pipeline.train.ldm_driver import CacheConfigMismatch, run_train

ROOT = Path(__file__).resolve().parents[3]
TINY_TEXT = ("conditioning.text_encoder=hf", "unet.context_dim=384")


def topts(cache, tmp_path, **kw):
    base = dict(latents=cache, preset="tiny", overrides=TINY_TEXT, num_workers=2, zero_stage=2, max_steps=12,
                batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=5, sample_every=6, sample_steps=4,
                log_every=2, storage_path=str(tmp_path / "runs"), ema_decay=0.99, seed=0, max_failures=1)
    base.update(kw)
    return TrainOptions(**base)


def metric_history(uri, run_id, key):
    return [m.value for m in sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_zero3_run_tracks_to_mlflow_server_and_registers_a_pyfunc(tiny_cache, mlflow_server, tmp_path):
    """Two workers under ZeRO-3 with activation checkpointing (each keeps the EMA of its own partition, gathered for
    samples and the export; every other run here is ZeRO-2 or plain DDP) tracked to a real `mlflow server`; then
    the run continues elastic on the one worker Ray can place (its DeepSpeed state and EMA re-partitioned, its two data
    streams on one)."""
    stage = 3
    s = run_train(topts(tiny_cache, tmp_path, zero_stage=stage, mlflow_uri=mlflow_server, experiment=f"zero{stage}",
                        name=f"z{stage}", overrides=TINY_TEXT + ("unet.grad_checkpointing=true",),
                        posthoc_ema=(0.05, 0.1)))
    assert s["step"] == 12 and s["images_seen"] == 12 * 8 * 2
    # the EMA and the post-hoc profiles each kept as the ranks' partitions; the profiles' snapshot gathered whole
    assert {"ema_rank0.pt", "ema_rank1.pt", "posthoc_ema_0.05_rank0.pt", "posthoc_ema_0.1_rank1.pt",
            "posthoc_ema_step0000012.safetensors"} <= {p.name for p in Path(s["checkpoint"]).iterdir()}
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.params["train.zero_stage"] == str(stage) and run.data.params["ldm.unet.model_channels"] == "32"
    assert len(metric_history(mlflow_server, run.info.run_id, "loss")) >= 3
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_0000006.png", "samples/step_0000012.png"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    assert s["model_version"] is not None
    local = mlflow.artifacts.download_artifacts(f"models:/ldm-tiny/{s['model_version']}", tracking_uri=mlflow_server)
    comps, config, meta = load_components(glob.glob(f"{local}/**/model.safetensors", recursive=True)[0])
    assert {"unet", "ema_unet"} <= set(comps) and config["unet"]["model_channels"] == 32
    assert json.loads(meta["latent_scale"])["scale"] > 0 and json.loads(meta["autoencoder"])["source"] == "random:tiny"
    assert "scale_factor" not in meta and config["scale_factor"] == 0.0  # the scale is stored once, in latent_scale
    # ema differs from the raw weights after training
    k = "out.2.weight"
    assert not torch.equal(comps["unet"][k], comps["ema_unet"][k])
    # the registered version is an MLflow pyfunc: load it from the registry and predict images
    import io

    import pandas as pd
    from PIL import Image
    model = mlflow.pyfunc.load_model(f"models:/ldm-tiny/{s['model_version']}")
    out = model.predict(pd.DataFrame({"prompt": ["a photo of a bag", "a photo of a dress"], "seed": [3, 4]}),
                        params={"steps": 2, "cfg_scale": 2.0})
    assert list(out.columns) == ["prompt", "seed", "image"] and list(out["seed"]) == [3, 4]
    assert Image.open(io.BytesIO(out["image"][0])).size == (16, 16)
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"caption": ["x"]}))
    # the export also lies in the last Ray checkpoint
    assert Path(s["export"]).exists()
    said = []  # continued elastic (1-2 workers of 1.5 CPUs on 2): Ray places one, which hosts both data streams
    one = run_train(topts(tiny_cache, tmp_path, zero_stage=stage, min_workers=1, cpus_per_worker=1.5, max_steps=14,
                          name=f"z{stage}", sample_every=0, overrides=TINY_TEXT + ("unet.grad_checkpointing=true",),
                          posthoc_ema=(0.05, 0.1)), log=said.append)
    assert one["step"] == 14 and one["images_seen"] == 14 * 8 * 2  # the same global batch on one worker
    assert any("elastic: 1-2 workers share 2 data stream(s)" in ln for ln in said), said
    state = json.loads((Path(one["checkpoint"]) / "train_state.json").read_text())
    assert state["world"] == 1 and state["data_streams"] == 2
    for name in ("ema", "posthoc_ema_0.05", "posthoc_ema_0.1"):
        assert torch.load(Path(one["checkpoint"]) / f"{name}_rank0.pt")["num_updates"] == 14, name


def test_loss_falls_on_a_fixed_cache(tiny_cache, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    lines = []
    s = run_train(topts(tiny_cache, tmp_path, num_workers=1, zero_stage=0, max_steps=150, lr=3e-3, sample_every=0,
                        checkpoint_every=1000, mlflow_uri=uri, name="falls", batch_size=16), log=lines.append)
    # a cache this small is kept by the worker after one read (--in-memory auto): 8 epochs read each part once
    assert any("each worker keeps the parts it reads" in x for x in lines), lines
    parts = len(part_files(tiny_cache))
    assert (s["parts_read"], s["epochs_begun"]) == (parts, 8), s
    loss = metric_history(uri, s["mlflow_run_id"], "loss")
    assert len(loss) == 150
    assert np.mean(loss[-10:]) < 0.8 * np.mean(loss[:5]), (loss[:5], loss[-10:])


def test_filter_trains_on_the_rows_it_keeps(tiny_cache, tmp_path):
    """--filter on the cache's LAION columns: the driver counts the rows it keeps and the epoch plan is theirs."""
    cols = pq.read_table(part_files(tiny_cache), columns=["punsafe", "aesthetic"]).to_pandas()
    want = int(((cols.punsafe < 0.05) & (cols.aesthetic >= 5)).sum())
    assert 16 <= want < 200, want
    lines = []
    s = run_train(topts(tiny_cache, tmp_path, num_workers=1, zero_stage=0, max_steps=12, sample_every=0,
                        checkpoint_every=100, name="filtered", filter="punsafe<0.05 and aesthetic>=5"),
                  log=lines.append)
    assert any(f"rows that pass punsafe < 0.05 and aesthetic >= 5: {want} of 320" in x for x in lines), lines
    assert s["step"] == 12 and s["epochs_begun"] == -(-12 // (want // 8))  # an epoch is the kept rows' batches
    with pytest.raises(DataError, match="keeps no row"):
        run_train(topts(tiny_cache, tmp_path, filter="aesthetic > 100"))
    with pytest.raises(DataError, match=r"share of the rows --filter 'punsafe<0.05 and aesthetic>=5' keeps"):
        run_train(topts(tiny_cache, tmp_path, batch_size=want, filter="punsafe<0.05 and aesthetic>=5"))


def test_micro_conditioned_model_trains_and_samples_as_from_a_chosen_original(tiny_cache, tmp_path):
    """unet.micro_cond: the cache's original sizes and crops reach the UNet in training, and jobs/sample.py's
    --orig-size / --crop reach it in sampling (a model without them refuses those flags); sampling and training
    under bf16 autocast."""
    from pipeline.evaluate.sample import sample_images
    s = run_train(topts(tiny_cache, tmp_path, num_workers=1, max_steps=4, checkpoint_every=4, sample_every=4,
                        name="micro", overrides=TINY_TEXT + ("unet.micro_cond=true",)))
    assert s["step"] == 4 and np.isfinite(s["loss"])
    comps, _, _ = load_components(s["export"])
    assert any(k.startswith("micro_embed.") for k in comps["unet"])
    small, _ = sample_images(s["export"], ["a photo"], 2, steps=3, orig_size=(8, 8), crop=(2, 0))
    full, _ = sample_images(s["export"], ["a photo"], 2, steps=3)
    assert small.shape == full.shape and not torch.equal(small, full)
    # sampled under bf16 autocast (--precision autocast): the same images to bf16 accuracy
    fast, _ = sample_images(s["export"], ["a photo"], 2, steps=3, precision="autocast")
    assert fast.dtype == torch.float32 and not torch.equal(fast, full) and (fast - full).abs().mean() < 0.05
    with pytest.raises(ValueError, match="precision 'fp16'"):
        sample_images(s["export"], ["a photo"], 1, steps=2, precision="fp16")
    # a model trained under DeepSpeed's torch_autocast (train_ldm --precision autocast)
    plain = run_train(topts(tiny_cache, tmp_path, num_workers=1, max_steps=1, checkpoint_every=1, sample_every=0,
                            name="plain", precision="autocast"))
    assert np.isfinite(plain["loss"])
    with pytest.raises(ValueError, match="trained without them"):
        sample_images(plain["export"], ["a photo"], 1, steps=2, orig_size=(8, 8))


def test_compiled_unet_trains_under_deepspeed_and_exports_plain_weights(tiny_cache, tmp_path):
    """--compile: the UNet compiled in place trains under ZeRO-2 and the export loads into an uncompiled UNet."""
    from ldm.config import apply_overrides, get_preset
    from ldm.unet import UNetModel
    s = run_train(topts(tiny_cache, tmp_path, num_workers=1, max_steps=3, compile=True, checkpoint_every=3,
                        sample_every=0, name="compiled"))
    assert s["step"] == 3 and np.isfinite(s["loss"])
    comps, config, _ = load_components(s["export"])
    assert not [k for k in comps["unet"] if "_orig_mod" in k]
    UNetModel(apply_overrides(get_preset("tiny"), TINY_TEXT).unet).load_state_dict(comps["unet"], strict=True)


# 2 workers x batch 8 over the tiny cache's 320 rows: 20 steps an epoch, constant lr after 2 warm-up steps, so the
# first steps of a longer run are those of a shorter one
STRAIGHT = dict(max_failures=0, sample_every=0, checkpoint_every=10, lr=1e-3, shuffle_buffer=40)


@pytest.fixture(scope="module")
def straight(tiny_cache, tmp_path_factory):
    """(the summary, per-step losses) of a 40-step run never interrupted: what the resumed runs below must match."""
    tmp = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{tmp}/m.db"
    b = run_train(topts(tiny_cache, tmp, max_steps=40, name="straight", mlflow_uri=uri, **STRAIGHT))
    return b, metric_history(uri, b["mlflow_run_id"], "loss")


def test_resume_mid_epoch_matches_uninterrupted(tiny_cache, straight, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    common = dict(mlflow_uri=uri, **STRAIGHT)
    # the first run stops at step 13, mid-epoch, and continues elastic (--num-workers 1-2) with 1.5 of the cluster's
    # 2 CPUs per worker: Ray places ONE, which hosts both data streams (its reads asking no CPU beside it): the same
    # global batches, so the same losses. It streams the parts every epoch (--in-memory no), the straight one keeps
    # them after one read
    a1 = run_train(topts(tiny_cache, tmp_path, max_steps=13, name="resumed", in_memory="no", **common))
    assert a1["step"] == 13
    said = []
    a2 = run_train(topts(tiny_cache, tmp_path, max_steps=40, name="resumed", in_memory="no", min_workers=1,
                         cpus_per_worker=1.5, **common), log=said.append)
    assert any("elastic: 1-2 workers share 2 data stream(s)" in ln for ln in said), said
    state = json.loads((Path(a2["checkpoint"]) / "train_state.json").read_text())
    assert (state["world"], state["data_streams"]) == (1, 2)
    b, lb = straight
    assert a2["step"] == b["step"] == 40 and a2["images_seen"] == b["images_seen"]
    assert a2["mlflow_run_id"] == a1["mlflow_run_id"]  # one MLflow run continued
    assert a2["epochs_begun"] == b["epochs_begun"] == 2  # the resumed run sought into epoch 0's middle
    la = metric_history(uri, a2["mlflow_run_id"], "loss")
    assert len(la) == len(lb) == 40
    # the same rows in the same order in both streams (and the same noise): the same losses, step for step
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    # --resume from an MLflow run: its ray_run_dir tag names the run dir, whose latest checkpoint is step 40 (an
    # explicit checkpoint directory: test_corrupt_latest_checkpoint_falls_back_and_explicit_resume_wins), back on 2
    d = run_train(topts(tiny_cache, tmp_path, max_steps=44, resume=f"mlflow:{a2['mlflow_run_id']}", **common))
    assert d["step"] == 44 and d["mlflow_run_id"] == a1["mlflow_run_id"] and d["images_seen"] == 44 * 16


def step_losses(text: str) -> dict[int, str]:
    """{step: its logged loss} from a job's step lines, the last line of each step (a resumed run repeats some)."""
    out = {}
    for ln in text.splitlines():
        if "| loss " in ln and "step " in ln:
            out[int(ln.split("step ")[1].split("/")[0])] = ln.split("| loss ")[1].split()[0]
    return out


def test_killed_worker_restarts_from_last_checkpoint(tiny_cache, straight, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    # the straight run's settings, through the CLI (its seed, lr and warm-up; a checkpoint every 8 steps)
    cmd = [sys.executable, str(ROOT / "jobs" / "train_ldm.py"), "--latents", tiny_cache, "--preset", "tiny",
           *TINY_TEXT, "--num-workers", "2", "--zero-stage", "2", "--max-steps", "30", "--batch-size", "8",
           "--lr", "1e-3", "--warmup-steps", "2", "--ema-decay", "0.99", "--seed", "0", "--shuffle-buffer", "40",
           "--checkpoint-every", "8", "--sample-every", "0", "--log-every", "1", "--storage-path",
           str(tmp_path / "runs"), "--name", "killed", "--max-failures", "2", "--mlflow-uri", uri]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, killed = [], None
    t0 = time.time()
    for line in proc.stdout:
        lines.append(line)
        if killed is None and "step 20/30" in line:
            workers = [p for p in psutil.process_iter(["cmdline", "status", "create_time"])
                       if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
                       and p.info["status"] != psutil.STATUS_ZOMBIE]
            assert workers, "no Ray Train worker process found"
            killed = max(workers, key=lambda p: p.info["create_time"]).pid
            os.kill(killed, signal.SIGKILL)
        assert time.time() - t0 < 500
    proc.wait()
    text = "".join(lines)
    (tmp_path / "job.log").write_text(text)
    assert proc.returncode == 0, text[-4000:]
    assert killed is not None
    # the checkpoint of step 16 may still be in flight to the controller when the worker dies; 8 is not
    resumed = [int(ln.split("resumed at step ")[1].split()[0]) for ln in lines if "resumed at step " in ln]
    assert resumed and resumed[0] in (8, 16), text[-4000:]
    assert "done: step 30" in text
    # mid-epoch (20 steps an epoch): the restarted workers sought their data position, and trained on the same
    # rows in the same order as a run that was never killed (same noise too): the same loss at every step
    assert f"data position: epoch 0, batch {resumed[0]}:" in text
    assert sorted(step_losses(text)) == list(range(1, 31))
    logged = {}  # the steps trained again after the restart are logged twice: the later value counts
    client = mlflow.MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("train_ldm").experiment_id])[0].info.run_id
    for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
        logged[m.step] = m.value
    assert sorted(logged) == list(range(1, 31))
    np.testing.assert_allclose([logged[k] for k in range(1, 31)], straight[1][:30], rtol=1e-5)


def _nan_cache(src, dst, nan_parts):
    """A copy of a cache whose first `nan_parts` part files hold NaN latents (corrupt data)."""
    (dst / "parts").mkdir(parents=True)
    m = read_manifest(src)
    for i, f in enumerate(part_files(src, m)):
        t = pq.read_table(f)
        if i < nan_parts:
            mean = np.full((len(t), t["latent_mean"].type.list_size), np.nan, np.float16)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(mean.reshape(-1), pa.float16()), mean.shape[1])
            t = t.set_column(t.schema.get_field_index("latent_mean"), "latent_mean", arr)
        pq.write_table(t, dst / "parts" / Path(f).name)
    (dst / "manifest.json").write_text(json.dumps(m))
    return str(dst)


def test_non_finite_steps_skipped_and_counted(tiny_cache, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    bad = _nan_cache(tiny_cache, tmp_path / "quarter-nan", nan_parts=1)
    # 45 steps of 2 x 8 > two epochs of 320 rows: the corrupt quarter (10 batches an epoch) is certainly met. Under
    # --grad-accum 2 a bad micro-batch is set aside and replaced, and two of them count one skipped optimizer step
    s = run_train(topts(bad, tmp_path, num_workers=1, zero_stage=1, max_steps=45, sample_every=0, name="some-nan",
                        nan_tolerance=100, mlflow_uri=uri, shuffle_buffer=0, checkpoint_every=100, grad_accum=2))
    assert s["step"] == 45 and s["images_seen"] == 45 * 8 * 2
    assert 10 <= s["skipped_steps"] <= 20  # >= 20 bad micro-batches met, counted in steps of 2
    assert metric_history(uri, s["mlflow_run_id"], "skipped_steps")[-1] == s["skipped_steps"]
    assert np.isfinite(metric_history(uri, s["mlflow_run_id"], "loss")).all()


def test_non_finite_run_stops_and_keeps_last_good_checkpoint(tiny_cache, tmp_path):
    good = run_train(topts(tiny_cache, tmp_path, max_steps=10, checkpoint_every=10, sample_every=0, name="good",
                           max_failures=0))
    before = {p: p.stat().st_mtime for p in Path(good["checkpoint"]).rglob("*") if p.is_file()}
    bad = _nan_cache(tiny_cache, tmp_path / "all-nan", nan_parts=99)
    with pytest.raises(Exception, match="non-finite losses in a row"):
        run_train(topts(bad, tmp_path, max_steps=30, sample_every=0, name="nan", nan_tolerance=3,
                        resume=good["checkpoint"], max_failures=0))
    assert {p: p.stat().st_mtime for p in Path(good["checkpoint"]).rglob("*") if p.is_file()} == before
    assert json.loads((Path(good["checkpoint"]) / "train_state.json").read_text())["step"] == 10


def test_cache_mismatch_refused(tiny_cache, tmp_path):
    with pytest.raises(CacheConfigMismatch, match="was encoded with autoencoder config"):
        run_train(topts(tiny_cache, tmp_path, overrides=TINY_TEXT + ("autoencoder.ch=64",)))
    with pytest.raises(CacheConfigMismatch, match="unet.context_dim"):
        run_train(topts(tiny_cache, tmp_path, overrides=("conditioning.text_encoder=hf", "unet.context_dim=32")))
    with pytest.raises(ConfigError):
        run_train(topts(tiny_cache, tmp_path, overrides=("unet.nope=1",)))


# ---------------------------------------------------------------------------------------------
# hardening: checkpoints that carry code or are corrupt, configs that would fail in the workers


class _RunsCode:
    """What an attacker pickles into a 'checkpoint': unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpointed(tiny_cache, tmp_path_factory):
    """(storage path, summary) of a 6-step one-worker run with a checkpoint every 2 steps, all kept: [2, 4, 6]."""
    root = tmp_path_factory.mktemp("checkpointed")
    s = run_train(topts(tiny_cache, root, num_workers=1, max_steps=6, checkpoint_every=2, keep_checkpoints=10,
                        sample_every=0, log_every=1, name="fallback"))
    return root, s


def run_checkpoints(run_dir: Path) -> tuple[list[Path], list[int]]:
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return ckpts, [json.loads((c / "train_state.json").read_text())["step"] for c in ckpts]


def test_checkpoint_that_carries_code_is_refused_not_run(tiny_cache, checkpointed, tmp_path):
    from pipeline.train.checkpoints import seal
    from pipeline.common.errors import CheckpointError
    first = run_checkpoints(checkpointed[0] / "runs" / "fallback")[0][0]  # step 2: no other test alters it
    ckpt = tmp_path / "runs" / "victim" / first.name  # a copy, as it would lie in a run dir of its own
    shutil.copytree(first, ckpt)
    marker = tmp_path / "PWNED"
    target = ckpt / "ds" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    torch.save({**state, "client": _RunsCode(marker)}, target)  # a real model-states file plus a payload
    (ckpt / "seal-rank0.json").unlink()
    seal(str(ckpt), 0, 1)  # whoever can write the bucket can write the seal too
    t0 = time.time()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is not a plain weights file"):
        run_train(topts(tiny_cache, tmp_path, num_workers=1, max_steps=8, sample_every=0, name="attacked",
                        resume=str(ckpt), max_failures=3))
    assert not marker.exists()
    assert time.time() - t0 < 120  # raised as itself, at once: not after 3 worker-group restarts


def test_corrupt_latest_checkpoint_falls_back_and_explicit_resume_wins(tiny_cache, checkpointed):
    root, _ = checkpointed
    run_dir = root / "runs" / "fallback"

    def run(max_steps, resume=""):
        return run_train(topts(tiny_cache, root, num_workers=1, max_steps=max_steps, checkpoint_every=2,
                               keep_checkpoints=10, sample_every=0, log_every=1, name="fallback", resume=resume))

    ckpts, got = run_checkpoints(run_dir)
    assert got == [2, 4, 6], got
    bad = ckpts[-1] / "ds" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated: a crash mid-upload, a full disk
    assert run(8)["step"] == 8
    assert run_checkpoints(run_dir)[1] == [2, 4, 6, 6, 8]  # resumed from step 4, the newest intact checkpoint
    # an explicit --resume is honoured over the run's own latest checkpoint (step 8): from step 2 on to 5
    assert run(5, resume=str(ckpts[0]))["step"] == 5
    assert run_checkpoints(run_dir)[1] == [2, 4, 6, 6, 8, 4, 5]
    # ... and an explicit one that is corrupt is refused by the job with exit 2, naming the file, before Ray starts
    (ckpts[1] / "train_state.json").write_text("")
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_ldm.py"), "--latents", tiny_cache, "--preset",
                        "tiny", *TINY_TEXT, "--max-steps", "9", "--resume", str(ckpts[1]), "--storage-path",
                        str(root / "runs"), "--name", "explicit-bad"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"checkpoint {ckpts[1]} is corrupt: train_state.json has 0 bytes" in r.stderr.splitlines()[-1]
    assert "[train] ray " not in r.stdout and not (root / "runs" / "explicit-bad").exists()


@pytest.mark.parametrize("override, message", [
    ("conditioning.kind=cls", "conditioning.kind='cls' is not valid: it must be one of the registered kinds "
                              "(ldm/kinds/): 'text', 'class', 'none'"),
    ("unet.model_channels=0", "unet.model_channels=0 is not valid: it must be > 0"),
    ("unet.model_channels=-32", "unet.model_channels=-32 is not valid: it must be > 0"),
])
def test_bad_configs_fail_in_the_driver_within_seconds(tiny_cache, tmp_path, override, message):
    t0 = time.time()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train(topts(tiny_cache, tmp_path, overrides=TINY_TEXT + (override,)))
    assert time.time() - t0 < 10


def test_launch_checks_from_the_manifest(tiny_cache, tmp_path):
    t0 = time.time()
    with pytest.raises(DataError, match=r"--batch-size 200 is larger than a worker's share of the cache \(320 rows"):
        run_train(topts(tiny_cache, tmp_path, batch_size=200))
    with pytest.raises(CacheConfigMismatch, match="not the first stage the cache .* was encoded with"):
        run_train(topts(tiny_cache, tmp_path, autoencoder="random:tiny:1"))  # same config, other weights
    assert time.time() - t0 < 20


FLOW = TINY_TEXT + ("diffusion.objective=flow", "diffusion.timestep_sampling=logit_normal")


def test_flow_model_trains_resumes_exactly_samples_exports_and_evaluates(tiny_cache, tmp_path):
    """diffusion.objective=flow through the whole pipeline: training (a grid sampled with Euler), a resume from a
    mid-run checkpoint that repeats the same steps with the same losses, jobs/sample.py with Heun, the export that
    records the objective, evaluation that samples with the model's own sampler."""
    from pipeline.evaluate.model_eval import ModelEvalOptions, evaluate_model
    from pipeline.export.formats import export_model
    uri = f"sqlite:///{tmp_path}/m.db"

    def run(max_steps, resume=""):
        return run_train(topts(tiny_cache, tmp_path, num_workers=1, max_steps=max_steps, checkpoint_every=4,
                               keep_checkpoints=10, sample_every=8, sample_steps=3, name="flow", mlflow_uri=uri,
                               overrides=FLOW, resume=resume, max_failures=0, shuffle_buffer=40))
    s = run(8)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(s["mlflow_run_id"]).data.params["ldm.diffusion.objective"] == "flow"
    assert "samples/step_0000008.png" in {a.path for a in client.list_artifacts(s["mlflow_run_id"], "samples")}
    ckpts, steps = run_checkpoints(tmp_path / "runs" / "flow")
    assert steps == [4, 8]
    again = run(8, resume=str(ckpts[0]))  # steps 5-8 once more, from step 4's weights, data position and noise
    assert again["step"] == 8 and again["mlflow_run_id"] == s["mlflow_run_id"]
    hist = sorted(client.get_metric_history(s["mlflow_run_id"], "loss"), key=lambda m: m.timestamp)
    assert [m.step for m in hist] == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8]
    np.testing.assert_allclose([m.value for m in hist[8:]], [m.value for m in hist[4:8]], rtol=1e-4)
    _, config, _ = load_components(again["export"])
    assert config["diffusion"]["objective"] == "flow" and config["diffusion"]["timestep_sampling"] == "logit_normal"
    out = tmp_path / "heun.png"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", again["export"], "--prompt",
                        "a bag", "--n", "2", "--steps", "3", "--sampler", "heun", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    with pytest.raises(ValueError, match="rectified-flow UNet .* has no Stable Diffusion pipeline"):
        export_model(again["export"], "diffusers", str(tmp_path / "sd"))
    report = evaluate_model(ModelEvalOptions(model=again["export"], input=str(Path(tiny_cache).parent / "shards"),
                                             num_samples=8, steps=(3,), workers=1, agreement=False))
    assert report["sampler"] == "euler" and report["rows"][0]["fd"] > 0
