"""Image grids for samples and reconstructions (PNG, written atomically)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.common import storage


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, upscale: int = 1) -> str:
    im = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    storage.write_bytes_atomic(path, buf.getvalue())
    return path


def png_bytes(images: torch.Tensor) -> list[bytes]:
    """Images in [-1, 1] as one PNG file's bytes each."""
    from pipeline.evaluate.scores import to_uint8
    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def figure(ncols: int, size: tuple[float, float]):
    """(fig, axes) of a headless matplotlib figure, one row of `ncols` plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, path: str) -> str:
    """A matplotlib figure as PNG, written atomically (local or s3://), then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())
    return path
