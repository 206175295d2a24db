"""Image metrics for the first stage and samples: PSNR, SSIM, Fréchet distance, codebook usage.

The Fréchet distance here is computed on whatever features it is given; with the offline
EfficientNet-Lite0 report it as "FD-EffNetLite0" (not FID, which needs Inception-v3 weights).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (data_range 2)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=tuple(range(1, x.ndim))).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2).float() / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), valid padding."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    win = min(win, x.shape[-1], x.shape[-2])
    g = _gauss(win).to(x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, win, win)
    f = lambda t: F.conv2d(t, k, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    from scipy import linalg
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sa, sb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        eps = np.eye(sa.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def codebook_usage(indices: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Fraction of codes used and the codebook perplexity exp(H(p)) over a set of VQ indices."""
    p = torch.bincount(indices.flatten(), minlength=n_embed).float()
    p = p / p.sum()
    return {"usage": float((p > 0).float().mean()), "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}
