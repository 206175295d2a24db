"""Unconditional (paper §4.1, Tab. 1): no condition; the UNet's attention layers attend to the latent itself."""
from __future__ import annotations

from ldm.kinds.base import Kind, register


class Unconditional(Kind):
    name = "none"

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        if cfg.unet.context_dim is not None:
            raise ConfigError(f"conditioning.kind='none' has no context to cross-attend to, but unet.context_dim="
                              f"{cfg.unet.context_dim}: set unet.context_dim=null")

    def sample_prompts(self, cfg, rows, side):
        return [""] * 8

    def from_inputs(self, values, n):
        return [""] * n

    def describe(self, prompt, i: int) -> str:
        return f"sample {i} (unconditional)"


register(Unconditional())
