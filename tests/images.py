"""Real photos that packages ship (scikit-image, scikit-learn), as small [-1, 1] tensors for tests."""
import numpy as np
import torch
import torch.nn.functional as F

_SKIMAGE = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
            "retina", "colorwheel", "cat", "logo", "page"]


def real_images(n: int = 8, size: int = 16) -> torch.Tensor:
    import skimage.data
    from sklearn.datasets import load_sample_images
    arrays = [img for img in load_sample_images().images]
    for name in _SKIMAGE:
        if len(arrays) >= n:
            break
        try:
            a = getattr(skimage.data, name)()
        except Exception:  # some skimage images need pooch downloads; only bundled ones are used
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        arrays.append(a[..., :3])
    out = []
    for a in arrays[:n]:
        h, w = a.shape[:2]
        s = min(h, w)
        a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        x = torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    assert len(out) == n, f"only {len(out)} bundled images found"
    return torch.cat(out).clamp(-1, 1)
