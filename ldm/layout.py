"""Layout-to-image conditioning (paper §4.3.1, App. D.3): a scene's boxes as tokens of a transformer tau_theta
trained with the UNet, which cross-attends to them.

The paper turns each box into a (l, b, c) tuple: its top-left l and bottom-right b on a discrete grid, and its class
c. Here a box is one token: a learned class embedding plus a linear map of Fourier features of its two corner cells
(neighbouring cells get similar tokens, so a few thousand scenes teach every position; a table per cell would learn
only the cells it saw). A learned start token is always present, so an empty layout (classifier-free guidance's null)
still has a token to attend to.
Boxes are given in pixels as [class, top, left, height, width] with the canvas size, and padded with class -1.

Hybrid conditioning (concat + cross-attention): `box_raster` also draws the boxes as one occupancy channel per
class at the latent's size, concatenated to z_t as the paper's dense conditions are (§3.3), so every latent cell knows
which class's box covers it; the tokens still carry the set to the cross-attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layout_tokens(boxes: torch.Tensor, height: int, width: int, grid: int, pad_class: int) -> torch.Tensor:
    """(B, N, 5) pixel boxes [class, top, left, h, w] (class < 0: padding) on an height x width canvas -> (B, N, 5)
    long tokens [class, top row, left column, bottom row, right column] of a grid x grid discretisation (§4.3.1's
    (l, b, c)); padding gets class `pad_class` and cells 0."""
    b = boxes.float()
    pad = b[..., 0] < 0
    y0, x0 = b[..., 1] / height, b[..., 2] / width
    y1, x1 = (b[..., 1] + b[..., 3]) / height, (b[..., 2] + b[..., 4]) / width

    def cell(u):  # the grid cell holding a coordinate in [0, 1]; the far edge stays in the last cell
        return torch.where(pad, 0, (u * grid).floor().clamp(0, grid - 1).long())
    cls = torch.where(pad, torch.full_like(b[..., 0], pad_class), b[..., 0]).long()
    return torch.stack([cls, cell(y0), cell(x0), cell(y1 - 1e-6), cell(x1 - 1e-6)], -1)


def unpadded_boxes(row) -> list[list[int]]:
    """A cached layout (flat int16 max_boxes*5, -1 padded) as its boxes, the padding left out."""
    import numpy as np
    boxes = np.asarray(row, np.int64).reshape(-1, 5)
    return boxes[boxes[:, 0] >= 0].tolist()


def box_raster(boxes: torch.Tensor, height: int, width: int, num_classes: int, f: int) -> torch.Tensor:
    """(B, N, 5) pixel boxes (class < 0: padding) on an height x width canvas -> (B, num_classes, height/f, width/f):
    the share of each latent cell's f x f pixels that a box of each class covers (the spatial rescaler)."""
    b = boxes.float()
    ys = torch.arange(height, device=b.device, dtype=torch.float32).view(1, 1, -1, 1) + 0.5
    xs = torch.arange(width, device=b.device, dtype=torch.float32).view(1, 1, 1, -1) + 0.5
    top, left, h, w = (b[..., k, None, None] for k in range(1, 5))
    inside = ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)).float()  # (B, N, H, W)
    onehot = F.one_hot(b[..., 0].long().clamp(min=0), num_classes).float() * (b[..., 0:1] >= 0)  # (B, N, C)
    occupancy = torch.einsum("bnhw,bnc->bchw", inside, onehot).clamp(max=1)
    return F.avg_pool2d(occupancy, f) if f > 1 else occupancy


def corner_features(cells: torch.Tensor, grid: int, bands: int = 6) -> torch.Tensor:
    """(..., 4) grid cells -> (..., 4 * 2 * bands) Fourier features of the cells' centres in [0, 1]."""
    u = (cells.float() + 0.5) / grid
    freqs = torch.pi * 2.0 ** torch.arange(bands, device=cells.device, dtype=torch.float32)
    ang = u[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)


class LayoutEncoder(nn.Module):
    """tau_theta for layouts: class embedding + corner features per box, a start token, N pre-norm transformer
    layers. No sequence position: the boxes are a set, so their order does not matter."""

    def __init__(self, num_classes: int, grid: int, dim: int, depth: int, heads: int, bands: int = 6):
        super().__init__()
        self.num_classes, self.grid, self.dim, self.bands = num_classes, grid, dim, bands
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # + the padding class
        self.box_proj = nn.Linear(4 * 2 * bands, dim)
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        for p in (self.class_emb.weight, self.start):
            nn.init.normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def context(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
        """LatentDiffusion's call: layout tokens -> (context, mask)."""
        return self(tokens)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 5) tokens of layout_tokens -> context (B, 1+N, dim) and its mask (B, 1+N), 1 = a token to attend."""
        corners = corner_features(tokens[..., 1:], self.grid, self.bands).to(self.box_proj.weight.dtype)  # bf16 module
        h = self.class_emb(tokens[..., 0]) + self.box_proj(corners)
        h = torch.cat([self.start.expand(h.shape[0], 1, -1).to(h.dtype), h], 1)
        keep = torch.cat([torch.ones_like(tokens[:, :1, 0], dtype=torch.bool), tokens[..., 0] != self.num_classes], 1)
        return self.norm(self.layers(h, src_key_padding_mask=~keep)), keep.long()
