"""jobs/demo.py wiring: every stage of the paper runs and the demo reports what it promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from pipeline.demo import cpu_bf16
from pipeline.encode.latent_cache import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def demo(out: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "demo.py"), "--size", "smoke", "--out", str(out),
                        "--sample-steps", "5", *args], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "LDM_RAY_CACHE": str(cache)})  # the judge is trained there
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The text demo at smoke size: (its --out, the judge's cache folder, its stdout)."""
    root = tmp_path_factory.mktemp("demo")
    return root / "demo", root / "cache", demo(root / "demo", root / "cache").stdout


def test_demo_smoke_size_end_to_end(smoke, tmp_path):
    out, cache, text = smoke
    for stage in range(1, 7):
        assert f"[demo {stage}/6]" in text
    assert "PSNR" in text and "agreement" in text and "mlflow ui --backend-store-uri" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["cache_rows"] == 400 and Path(s["grid"]).exists() and Path(s["ldm_export"]).exists()
    assert 0 <= s["prompt_class_agreement"] <= 1 and set(s["per_class_agreement"]) == {
        "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"}
    assert s["classifier_test_accuracy"] > 0.75  # one epoch on 15,000 images of the real 60k (80.0%) train split
    client = mlflow.MlflowClient(s["mlflow_uri"])
    names = {e.name for e in client.search_experiments()}
    assert {"demo-stage1", "demo-encode", "demo-ldm"} <= names
    ldm_run = client.search_runs([client.get_experiment_by_name("demo-ldm").experiment_id])[0]
    assert "demo/prompt_class_agreement" in ldm_run.data.metrics and s["fd_name"] == "FD-EffNetLite0"
    assert s["sample_fd"] > 0 and s["fd_real_images"] == 100 and "FD-EffNetLite0" in text
    fd = client.get_metric_history(ldm_run.info.run_id, "FD-EffNetLite0")  # sample quality along training
    assert sorted(m.step for m in fd) == [10, 20]
    assert list(cache.glob("fashion_cnn_e1_s0_n15000.safetensors"))  # kept for the next run
    assert f"1 encoder actor(s) x (1.0 CPU, 0.0 GPU, {os.cpu_count()} thread(s))" in text  # the cores decode leaves
    assert client.search_model_versions("name='demo-ldm'") and client.search_model_versions("name='demo-autoencoder'")
    # jobs/sample.py on the export: DDIM with eta, and at twice the training canvas (the UNet is convolutional)
    grid = tmp_path / "big.png"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["ldm_export"], "--prompt",
                        "a photo of a bag", "--n", "2", "--steps", "3", "--eta", "0.5", "--size", "64x64", "--out",
                        str(grid)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 images of 64x64" in r.stdout and Image.open(grid).size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), "--model", s["ldm_export"], "--size", "60x64",
                        "--out", str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "sample size 60x64 is not a positive multiple of" in r.stderr.splitlines()[-1]


def test_demo_tasks_share_stage_one_and_report_their_figures(smoke):
    """--task class,uncond,sr,inpaint,semantic,layout in one process under the text demo's --out: its shards and
    stage 1 are reused (resumed, not retrained), each task gets its own cache, LDM run, model, grid and summary,
    reports its figure next to its baseline, and a closing table lists them all."""
    out, cache, _ = smoke
    r = demo(out, cache, "--task", "class,uncond,sr,inpaint,semantic,layout")
    table = r.stdout[r.stdout.index("ldm-ray demo: 6 tasks under one --out"):].splitlines()
    assert [ln.split()[0] for ln in table[1:8]] == ["task", "class", "uncond", "sr", "inpaint", "semantic", "layout"]
    assert "chance 10%" in table[2] and "untrained" in table[3] and "bicubic" in table[4] and "empty layout" in table[7]
    c = json.loads((out / "summary-class.json").read_text())
    assert c["task"] == "class" and 0 <= c["prompt_class_agreement"] <= 1 and len(c["per_class_agreement"]) == 10
    assert "between the requested class and the classifier" in r.stdout and "chance: 10%" in r.stdout
    assert "[stage1] reused: finished earlier under this --out (20 steps" in r.stdout  # the text run's, as it stands
    assert "[stage1] resumed" not in r.stdout and "[demo 2/6]" in r.stdout
    assert (out / "prompts-class.txt").read_text().splitlines()[3] == "row 3: label 3 (dress)"
    u = json.loads((out / "summary-uncond.json").read_text())
    assert u["task"] == "uncond" and u["sample_fd"] > 0 and u["untrained_fd"] > 0
    assert abs(sum(u["class_shares"].values()) - 1) < 1e-3 and "the same model untrained: FD-EffNetLite0" in r.stdout
    sr = json.loads((out / "summary-sr.json").read_text())
    assert sr["task"] == "sr" and sr["sample_fd"] > 0 and sr["bicubic_fd"] > 0 and sr["bicubic_psnr_db"] > 10
    assert 0 <= sr["ssim"] <= 1 and 0 <= sr["class_kept"] <= 1 and "bicubic x4: FD-EffNetLite0" in r.stdout
    assert read_manifest(str(out / "latents-sr"))["preprocess"]["lowres_factor"] == 4
    ip = json.loads((out / "summary-inpaint.json").read_text())
    assert ip["classical_fd"] > 0 and 0 < ip["hole_share"] < 1 and ip["hole_psnr_db"] > 0 and ip["eta"] == 1.0
    assert "biharmonic inpainting: FD-EffNetLite0" in r.stdout and ip["cache_mb"] > 0
    assert read_manifest(str(out / "latents-inpaint"))["preprocess"]["inpaint_variants"] == 2
    se = json.loads((out / "summary-semantic.json").read_text())
    assert se["regions"] > 0 and 0 <= se["region_agreement"] <= 1 and se["real_silhouette_iou"] == 1.0
    assert Image.open(se["grid_4x"]).size == (2 * 128 * 3 + 3 * 2 * 3, 128 * 3 + 2 * 2 * 3)  # map + 128x128, x3
    assert "the classifier sees each region's class" in r.stdout and (out / "shards" / "scenes-test").exists()
    m = read_manifest(str(out / "latents-semantic"))
    assert m["preprocess"]["label_maps"] and m["preprocess"]["crop"] == "tile" and m["latent_shape"][1:] == [8, 8]
    la = json.loads((out / "summary-layout.json").read_text())
    assert la["regions"] == se["regions"] and 0 <= la["null_region_agreement"] <= 1
    assert la["real_region_agreement"] > 0.5
    assert "the classifier sees each box's class" in r.stdout and "given no boxes" in r.stdout
    m = read_manifest(str(out / "latents-layout"))
    assert m["preprocess"]["layout_boxes"] == 4 and m["latent_shape"][1:] == [16, 16]
    for s, tag in ((c, "-class"), (u, "-uncond"), (sr, "-sr"), (ip, "-inpaint"), (se, "-semantic"), (la, "-layout")):
        assert Path(s["grid"]).name == f"samples_grid{tag}.png" and Path(s["grid"]).exists()
        assert (out / f"latents{tag}" / "manifest.json").exists() and f"/runs/ldm{tag}/" in s["ldm_export"]
    client = mlflow.MlflowClient(u["mlflow_uri"])
    for tag, figure in (("-class", "demo/prompt_class_agreement"), ("-uncond", "demo/untrained_FD-EffNetLite0"),
                        ("-sr", "demo/bicubic_FD-EffNetLite0"), ("-inpaint", "demo/classical_FD-EffNetLite0"),
                        ("-semantic", "demo/region_agreement"), ("-layout", "demo/null_region_agreement")):
        run = client.search_runs([client.get_experiment_by_name(f"demo-ldm{tag}").experiment_id])[0]
        assert figure in run.data.metrics
        if tag == "-class":  # 25 steps: half-way rounded up and the end, no evaluation twice in a row
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "FD-EffNetLite0")) == [13, 25]
        assert client.search_model_versions(f"name='demo-ldm{tag}'")
        # the layout LDM trains under bf16 autocast where the CPU computes bf16 natively; the others in fp32
        want = "autocast" if tag == "-layout" and cpu_bf16() else "fp32"
        assert run.data.params["train.precision"] == want and json.loads(
            (out / f"summary{tag}.json").read_text())["ldm_precision"] == want
