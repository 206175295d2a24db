"""The registered model stands alone: logged from code (nothing pickled) with its first stage, text encoder and
tokenizer as artifacts and its real pip requirements, and `mlflow models serve` on 127.0.0.1 answers a JSON request
(prompts, seeds, steps, guidance) with PNG images."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from helpers import free_port, wait_port


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny text model (the frozen MiniLM as its text encoder) exported, logged as a pyfunc and registered."""
    import mlflow

    from ldm.autoencoder import build_autoencoder
    from ldm.checkpoint import save_components
    from ldm.config import to_dict
    from ldm.latent_scale import LatentScale
    from ldm.model import LatentDiffusion
    from pipeline.common.models import load_autoencoder, text_encoder_identity
    from pipeline.common.tracking import register_version
    from pipeline.export.pyfunc import log_pyfunc
    from pipeline.presets import load_config
    root = tmp_path_factory.mktemp("serve")
    cfg = load_config("tiny", overrides=["conditioning.text_encoder=hf", "unet.context_dim=384"])
    torch.manual_seed(0)
    ae_path = root / "ae.safetensors"
    save_components(ae_path, {"autoencoder": build_autoencoder(cfg.autoencoder).state_dict()},
                    {"autoencoder": to_dict(cfg.autoencoder)})
    unet = LatentDiffusion(cfg).unet.state_dict()
    export = root / "model.safetensors"
    save_components(export, {"unet": unet, "ema_unet": unet}, to_dict(cfg), {
        "latent_scale": LatentScale(1.0, 0.0).to_json(), "latent_shape": json.dumps([4, 8, 8]), "precision": "fp32",
        "autoencoder": json.dumps(load_autoencoder(str(ae_path)).identity),
        "text_encoder": json.dumps(text_encoder_identity("", 16, False))})
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("serve", artifact_location=str(root / "artifacts"))
    run = mlflow.MlflowClient(uri).create_run(exp)
    log_pyfunc(uri, run.info.run_id, str(export), str(ae_path))
    assert register_version(uri, run.info.run_id, "served", print, artifact="pyfunc") == "1"
    return uri, root


def test_the_model_folder_holds_code_weights_and_requirements(registered):
    uri, root = registered
    import mlflow
    folder = Path(mlflow.artifacts.download_artifacts("models:/served/1", tracking_uri=uri))
    spec = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in spec and not list(folder.rglob("*.pkl"))  # from code: nothing pickled
    assert (folder / "code" / "ldm").is_dir() and (folder / "code" / "pipeline").is_dir()
    arts = folder / "artifacts"
    assert {p.name for p in arts.iterdir()} >= {"model.safetensors", "ae.safetensors", "text"}
    assert (arts / "text" / "config.json").exists() and (arts / "text" / "tokenizer.json").exists()
    reqs = (folder / "requirements.txt").read_text()
    assert all(f"{name}==" in reqs for name in ("torch", "transformers", "safetensors", "pillow", "mlflow"))


def test_mlflow_models_serve_answers_a_json_request_with_images(registered, tmp_path):
    uri, _ = registered
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([shutil.which("mlflow", path=bin_dir), "models", "serve", "-m", "models:/served/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=180, proc=proc)
        body = {"dataframe_split": {"columns": ["prompt", "seed"], "data": [["a photo of a bag", 0],
                                                                           ["a photo of a dress", 1]]},
                "params": {"steps": 2, "cfg_scale": 3.0}}
        t0, reply = time.time(), None
        while reply is None and time.time() - t0 < 120:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
            except OSError:
                time.sleep(1)
        rows = reply["predictions"]
        assert [r["seed"] for r in rows] == [0, 1]
        images = [Image.open(io.BytesIO(base64.b64decode(r["image"]))) for r in rows]
        assert [im.size for im in images] == [(16, 16)] * 2
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
