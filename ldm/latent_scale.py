"""The latent rescaling of paper §4.3.2: diffusion runs on z' = (z - shift) * scale, scale = 1 / std of the
first-stage latents, so the UNet sees unit variance; samples go back with z = z' / scale + shift.

Per channel (EDM2's latent normalisation, Karras et al. 2024): scale and shift are one value per latent channel (its
1 / std and mean), so every channel, not just the latent as a whole, is zero-mean and unit-variance in diffusion space.
A first stage whose channels sit far apart (here one at mean -6.8, another at std 0.6 around 2.0) otherwise leaves the
UNet to learn large per-channel offsets, and a short run falls short of them (samples come out too bright)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

Value = float | tuple[float, ...]


@dataclass(frozen=True)
class LatentScale:
    scale: Value = 1.0
    shift: Value = 0.0

    @classmethod
    def choose(cls, config_scale: float, channel_mean: list[float], measured_scale: float,
               channel_std: list[float] | None = None, per_channel: bool = False,
               published: float = 0.0) -> "LatentScale":
        """A fixed scale from the config (e.g. SD's 0.18215, no shift); else the scale the first stage was published
        with (an imported SD autoencoder: its models were trained on it); else per channel (1/std and mean of each);
        else 1/std and the mean of the data. A fixed config scale that would leave the latents' std more than 2x off 1
        belongs to another autoencoder: refused."""
        from ldm.config import ConfigError
        if not config_scale and published:
            return cls(float(published), 0.0)
        if config_scale:
            # the std the UNet would see: config_scale * (1 / measured_scale); a cache without a measured scale has 0
            std = config_scale / measured_scale if measured_scale > 0 else 1.0
            if not 0.5 <= std <= 2.0:
                raise ConfigError(f"scale_factor={config_scale:g} gives these latents a std of {std:.3g}, not ~1: it "
                                  f"was chosen for another autoencoder (this cache's is 1/std = {measured_scale:.5g}). "
                                  f"Set scale_factor=0 to use the cache's, or scale_factor={measured_scale:.5g}")
            return cls(float(config_scale), 0.0)
        if per_channel:
            if not channel_std or len(channel_std) != len(channel_mean):
                raise ConfigError("latent_norm='channel' needs the cache's per-channel latent std "
                                  "(totals.latent_channel_std in its manifest.json): re-run encode_latents.py, which "
                                  "writes it, or use latent_norm='global'")
            return cls(tuple(1.0 / max(float(s), 1e-6) for s in channel_std), tuple(float(m) for m in channel_mean))
        return cls(float(measured_scale), float(sum(channel_mean) / len(channel_mean)))

    def _view(self, v: Value, z: torch.Tensor):
        """A scalar as it is; a per-channel tuple as a (1, C, 1, ...) tensor on z's device."""
        if isinstance(v, tuple):
            return torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
        return v

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x / self._view(self.scale, x) + self._view(self.shift, x)

    def describe(self) -> str:
        """"scale 0.24201, shift -2.32868", or each channel's values."""
        def fmt(v):
            return f"({', '.join(f'{x:.5f}' for x in v)})" if isinstance(v, tuple) else f"{v:.5f}"
        what = "per channel: " if isinstance(self.scale, tuple) else ""
        return f"{what}scale {fmt(self.scale)}, shift {fmt(self.shift)}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # a per-channel tuple becomes a JSON list

    @classmethod
    def from_json(cls, text: str) -> "LatentScale":
        def value(v):  # a JSON list is one value per channel
            return tuple(float(x) for x in v) if isinstance(v, list) else float(v)
        return cls(**{k: value(v) for k, v in json.loads(text).items()})
