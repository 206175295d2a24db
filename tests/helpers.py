"""Plain helpers for tests (imported by name; conftest modules share one import name across folders)."""
import json
import socket
import time

import torch


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (zero-init convs, unit norms) so parity tests test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc=None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class _TinyInception(torch.nn.Module):
    """The calling convention of StyleGAN3/clean-fid's TorchScript Inception-v3, with random weights."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=4)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = self.conv(img / 255.0).mean(dim=(2, 3))
        return f if return_features else self.fc(f)


def tiny_inception(path):
    """A stand-in for inception-2015-12-05.pt (TorchScript, 16-d pool features), saved at `path`."""
    torch.manual_seed(0)
    torch.jit.script(_TinyInception()).save(str(path))
    return path


def coco_json(path, images=8, per_image=3):
    """A COCO captions file in the layout of captions_val2014.json, annotation ids shuffled against the images."""
    anns = [{"image_id": 100 + i, "id": 1000 - (i * per_image + j), "caption": f" image {i} caption {j} "}
            for i in range(images) for j in range(per_image)]
    path.write_text(json.dumps({"images": [{"id": 100 + i} for i in range(images)], "annotations": anns}))
    return path
