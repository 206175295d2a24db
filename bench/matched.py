"""What the benches share: diffusers' UNet2DConditionModel built to match one of our UNets and holding the same
weights (so the two are timed on identical work); our UNet moved off its zero init (so two runs of it can be
compared); `--tiny` (the size CI runs), the `name=value` lines every bench ends with, a free loopback port."""
from __future__ import annotations


def seeded_unet(unet_cfg, seed: int = 0):
    """Our UNet of `unet_cfg`, every weight nudged by 0.01 noise: off the zero init of the output convs, whose
    outputs would otherwise be zero and compare as equal whatever the computation."""
    import torch

    from ldm.unet import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(unet_cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def diffusers_twin(unet, sample_size: int, context_dim: int | None = None):
    """diffusers' UNet2DConditionModel of our UNet's config (ldm/convert/diffusers.py) with its weights."""
    import diffusers

    from ldm.convert.diffusers import unet_config_to_diffusers, unet_to_diffusers
    dcfg = {k: v for k, v in unet_config_to_diffusers(unet.cfg, sample_size).items() if not k.startswith("_")}
    theirs = diffusers.UNet2DConditionModel(**dcfg)
    theirs.load_state_dict(unet_to_diffusers(unet.state_dict(), unet.cfg), strict=True)
    return theirs


def add_tiny(ap) -> None:
    ap.add_argument("--tiny", action="store_true",
                    help="the smallest size that runs every part (what CI runs: its figures say nothing)")


def tiny(a, **small):
    """With --tiny, the arguments set to `small` (the bench at the size CI runs)."""
    if getattr(a, "tiny", False):
        for k, v in small.items():
            setattr(a, k, v)
    return a


def free_port() -> int:
    """A free TCP port on loopback (a rank group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def figures(**values) -> None:
    """The bench's figures as `name=value` lines, after its table: what a script or CI reads."""
    for k, v in values.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
