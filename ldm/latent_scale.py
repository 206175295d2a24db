"""The latent rescaling of paper §4.3.2: diffusion runs on z' = (z - shift) * scale, scale = 1 / std of the
first-stage latents, so the UNet sees unit variance; samples go back with z = z' / scale + shift."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatentScale:
    scale: float = 1.0
    shift: float = 0.0

    @classmethod
    def choose(cls, config_scale: float, channel_mean: list[float], measured_scale: float) -> "LatentScale":
        """A fixed scale from the config (e.g. SD's 0.18215, no shift), else 1/std and the mean of the data. A fixed
        scale that would leave the latents' std more than 2x off 1 belongs to another autoencoder: refused."""
        if config_scale:
            # the std the UNet would see: config_scale * (1 / measured_scale); a cache without a measured scale has 0
            std = config_scale / measured_scale if measured_scale > 0 else 1.0
            if not 0.5 <= std <= 2.0:
                from ldm.config import ConfigError
                raise ConfigError(f"scale_factor={config_scale:g} gives these latents a std of {std:.3g}, not ~1: it "
                                  f"was chosen for another autoencoder (this cache's is 1/std = {measured_scale:.5g}). "
                                  f"Set scale_factor=0 to use the cache's, or scale_factor={measured_scale:.5g}")
            return cls(float(config_scale), 0.0)
        return cls(float(measured_scale), float(sum(channel_mean) / len(channel_mean)))

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.shift

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LatentScale":
        return cls(**json.loads(text))
