"""Held-out evaluation of a first stage (paper §4.1, Tab. 8): PSNR, SSIM, a Fréchet distance between
EfficientNet-Lite0 features of reconstructions and inputs ("FD-EffNetLite0", torchmetrics' Fréchet distance;
not FID, which needs Inception-v3 weights), and codebook usage for VQ models."""
from __future__ import annotations

import numpy as np
import torch

from ldm.autoencoder import AutoencoderKL, VQModel
from ldm.metrics import codebook_usage, psnr, ssim


@torch.no_grad()
def evaluate_autoencoder(model: torch.nn.Module, batches, fd: bool = True, max_images: int = 0,
                         device: str = "cpu") -> dict:
    """`batches` yields uint8 (N, H, W, 3) arrays. Reconstructions use the posterior mean (KL) or the
    quantised latent (VQ)."""
    model = model.to(device).eval()
    from pipeline.evaluate.scores import frechet_distance, load_feature_net
    feat_net = load_feature_net() if fd else None
    p, s, fa, fb, idx = [], [], [], [], []
    n = 0
    for arr in batches:
        if max_images and n >= max_images:
            break
        x = torch.from_numpy(np.array(arr)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        if max_images:
            x = x[: max_images - n]
        if isinstance(model, AutoencoderKL):
            rec = model.decode(model.encode(x).mean)
        else:
            z = model.encode(x)
            zq, _, info = model.quantize(z)
            rec = model.decoder(model.post_quant_conv(zq))
            idx.append(info["indices"].flatten().cpu())
        rec = rec.clamp(-1, 1)
        p.append(psnr(rec, x).cpu())
        s.append(ssim(rec, x).cpu())
        if feat_net is not None:
            fa.append(feat_net(x.cpu())[0])
            fb.append(feat_net(rec.cpu())[0])
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate on")
    out = {"images": n, "psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean())}
    if feat_net is not None and n >= 2:
        out["fd_effnet_lite0"] = frechet_distance(torch.cat(fa), torch.cat(fb))
    if isinstance(model, VQModel) and idx:
        u = codebook_usage(torch.cat(idx), model.cfg.n_embed)
        out.update(codebook_usage=u["usage"], codebook_perplexity=u["perplexity"])
    return out


def shard_image_batches(input_uri: str, resolution: int, batch_size: int = 64):
    """Preprocessed held-out images from shards, streamed through Ray Data."""
    from pipeline.data.datasets import training_images
    from pipeline.data.preprocess import PreprocessConfig
    ds = training_images(input_uri, PreprocessConfig(resolution=resolution))
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield b["image"]


def format_eval(name: str, r: dict) -> str:
    parts = [f"PSNR {r['psnr']:.2f} dB", f"SSIM {r['ssim']:.4f}"]
    if "fd_effnet_lite0" in r:
        parts.append(f"FD-EffNetLite0 {r['fd_effnet_lite0']:.2f}")
    if "codebook_usage" in r:
        parts.append(f"codebook usage {100 * r['codebook_usage']:.1f}% (perplexity {r['codebook_perplexity']:.1f})")
    return f"[eval] {name}: {', '.join(parts)} on {r['images']} held-out images"
