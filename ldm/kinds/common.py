"""What several kinds share: classifier-free-guidance dropout (Ho & Salimans 2022) and the cache's flat rows."""
from __future__ import annotations

import torch


def drop_mask(batch: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Which samples lose their condition this step (classifier-free guidance training, p ~ 0.1)."""
    dev = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=dev) < p).to(device)


def apply_drop(cond: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the condition of dropped samples by the null condition (broadcast over the batch)."""
    d = drop.view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(d, null.to(cond.dtype).expand_as(cond), cond)


def drop_dense(cond: dict, drop: torch.Tensor) -> dict:
    """A dense condition with the concat of the samples in `drop` set to zeros, its null (CFG training)."""
    return {**cond, "concat": torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(cond["concat"]), cond["concat"])}


def dense_prompts(cond: dict, cfg) -> tuple[dict, dict | None]:
    """Sampling's (cond, uncond) of a dense condition: zeros are its null if training dropped it, else no guidance."""
    return cond, ({**cond, "concat": torch.zeros_like(cond["concat"])} if cfg.cond_drop_prob else None)


def square_images(rows: torch.Tensor) -> torch.Tensor:
    """Flat (B, s*s*3) RGB rows, as the cache stores low-res images, as (B, s, s, 3)."""
    s = int(round((rows.shape[1] // 3) ** 0.5))
    return rows.view(rows.shape[0], s, s, 3)


def one_size(shapes: set, what: str) -> tuple:
    """The one shape a list of sample conditions shares; a clear error when they differ."""
    if len(shapes) != 1:
        raise ValueError(f"{what} of one size per call; got shapes {sorted(shapes)}")
    return next(iter(shapes))


def image_only(cfg, name: str) -> None:
    """A condition that is an image alone: the UNet takes no class label and cross-attends to no context."""
    from ldm.config import ConfigError
    if cfg.unet.num_classes is not None or cfg.unet.context_dim is not None:
        raise ConfigError(f"conditioning.kind='{name}' has no class or text: set unet.num_classes=null and "
                          f"unet.context_dim=null")
