"""Exponential moving average of model weights (used for samples and export; paper App. / LitEma), or EDM2's
power-function EMA of a given relative standard deviation (Karras et al. 2024, §3.1), whose snapshots
ldm/posthoc_ema.py recombines into any other one after training.

Works on plain state dicts, so a ZeRO-3 trainer can feed it the partitions a rank owns.
"""
from __future__ import annotations

import numpy as np
import torch


def ema_decay(step: int, max_decay: float = 0.9999, warmup: bool = True) -> float:
    """min(max_decay, (1 + n) / (10 + n)): short memory early, long memory later (CompVis LitEma)."""
    return min(max_decay, (1 + step) / (10 + step)) if warmup else max_decay


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile p(tau) ~ tau^gamma whose relative std is sigma_rel (EDM2 eq. 3 solved:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the real root of a cubic)."""
    t = float(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_decay(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1): the EMA that averages updates 1..t with weights ~ tau^gamma (EDM2 §3.1)."""
    return (1 - 1 / t) ** (gamma + 1)


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, over floating-point entries of a state dict. The decay is
    LitEma's (`max_decay`, `warmup`), or with `sigma_rel` > 0 the power function of that relative std."""

    def __init__(self, state: dict[str, torch.Tensor], max_decay: float = 0.9999, warmup: bool = True,
                 sigma_rel: float = 0.0):
        self.shadow = {k: v.detach().clone().float() for k, v in state.items() if v.is_floating_point()}
        self.max_decay, self.warmup, self.num_updates, self.sigma_rel = max_decay, warmup, 0, float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel) if sigma_rel else None

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> float:
        decay = (power_decay(self.gamma, self.num_updates + 1) if self.gamma is not None
                 else ema_decay(self.num_updates, self.max_decay, self.warmup))
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
                "max_decay": self.max_decay, "warmup": self.warmup, "sigma_rel": self.sigma_rel}

    def load_state_dict(self, d: dict) -> None:
        missing = set(self.shadow) - set(d["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}...")
        dev = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {k: v.to(dev, torch.float32).clone() for k, v in d["shadow"].items()}
        self.num_updates, self.max_decay, self.warmup = int(d["num_updates"]), float(d["max_decay"]), bool(d["warmup"])
        if float(d.get("sigma_rel", 0.0)) != self.sigma_rel:
            raise ValueError(f"EMA state of sigma_rel {d.get('sigma_rel', 0.0)} loaded into one of {self.sigma_rel}")

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        for k, s in self.shadow.items():
            sd[k].copy_(s.to(sd[k].dtype))
