"""Exponential moving average of model weights (used for samples and export; paper App. / LitEma).

Works on plain state dicts, so a ZeRO-3 trainer can feed it parameters gathered from the shards.
"""
from __future__ import annotations

import torch


def ema_decay(step: int, max_decay: float = 0.9999, warmup: bool = True) -> float:
    """min(max_decay, (1 + n) / (10 + n)): short memory early, long memory later (CompVis LitEma)."""
    return min(max_decay, (1 + step) / (10 + step)) if warmup else max_decay


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, over floating-point entries of a state dict."""

    def __init__(self, state: dict[str, torch.Tensor], max_decay: float = 0.9999, warmup: bool = True):
        self.shadow = {k: v.detach().clone().float() for k, v in state.items() if v.is_floating_point()}
        self.max_decay, self.warmup, self.num_updates = max_decay, warmup, 0

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> float:
        decay = ema_decay(self.num_updates, self.max_decay, self.warmup)
        shadow = list(self.shadow.values())  # one fused lerp over all tensors, not a Python loop of them
        torch._foreach_lerp_(shadow, [state[k].detach().to(s.device, torch.float32) for k, s in self.shadow.items()],
                             1.0 - decay)
        self.num_updates += 1
        return decay

    def to(self, device) -> "EMA":
        """Keep the shadow where the weights are (a GPU step then copies nothing to the host)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:  # on the CPU, ready for torch.save / safetensors
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "num_updates": self.num_updates,
                "max_decay": self.max_decay, "warmup": self.warmup}

    def load_state_dict(self, d: dict) -> None:
        missing = set(self.shadow) - set(d["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}...")
        dev = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {k: v.to(dev, torch.float32).clone() for k, v in d["shadow"].items()}
        self.num_updates, self.max_decay, self.warmup = int(d["num_updates"]), float(d["max_decay"]), bool(d["warmup"])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        for k, s in self.shadow.items():
            sd[k].copy_(s.to(sd[k].dtype))
