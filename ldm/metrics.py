"""Image metrics for the first stage and samples: PSNR, SSIM, improved precision/recall, codebook usage.

The Fréchet distance, KID and Inception Score come from torchmetrics (pipeline/evaluate/scores.py), on
whatever features it is given; with the offline EfficientNet-Lite0 they are reported as "FD-EffNetLite0" etc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (data_range 2)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=tuple(range(1, x.ndim))).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def masked_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB over the pixels where `mask` (B,1,H,W) is set: an inpainting's error in its hole (§4.5)."""
    m = mask.float().expand_as(x)
    mse = (((x.float() - y.float()) ** 2) * m).sum(dim=tuple(range(1, x.ndim))) / m.sum(dim=tuple(range(1, x.ndim)))
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


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


def _kth_neighbour(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of `a` to its k-th nearest row of `b` (k counts a row's zero distance to itself
    when a is b, so callers pass k + 1 for a set's own radii)."""
    return torch.cat([torch.cdist(a[i:i + chunk], b).kthvalue(k, dim=1).values for i in range(0, len(a), chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each point lies in at least one ball (centre, radius)."""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, paper §4 tables): each set's manifold is the
    union of balls reaching every feature's k-th nearest neighbour; precision is the share of fakes inside
    the real manifold (fidelity), recall the share of reals inside the fake one (diversity)."""
    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated images "
                         f"(got {len(real)} and {len(fake)})")
    r_real, r_fake = _kth_neighbour(real, real, k + 1), _kth_neighbour(fake, fake, k + 1)
    return {"precision": float(_inside(fake, real, r_real).double().mean()),
            "recall": float(_inside(real, fake, r_fake).double().mean())}


def codebook_usage(indices: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Fraction of codes used and the codebook perplexity exp(H(p)) over a set of VQ indices."""
    p = torch.bincount(indices.flatten(), minlength=n_embed).float()
    p = p / p.sum()
    return {"usage": float((p > 0).float().mean()), "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}
