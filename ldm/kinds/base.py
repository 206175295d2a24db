"""What a conditioning kind (paper §3.3) is: the one class every kind subclasses, and the registry.

A kind owns everything that differs between conditionings: its config checks, the cache columns a training step
reads and what the cache must hold, its trainable tau_theta (if any), a training batch's condition and its null for
classifier-free guidance, sampling's condition from prompts, the canvas a sample is drawn on, the default sample-grid
conditions from the cache's first rows, the held-out set's conditions, and what a sample request carries (the CLI's
flags, the served model's columns). `Conditioner`, the training driver and the samplers ask the kind; none of them
branches on its name. Adding a kind is one module under ldm/kinds/ that calls `register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


class CacheMismatch(ValueError):
    """The latent cache lacks what this kind trains on (a config error: the cache or the config must change)."""


@dataclass(frozen=True)
class Input:
    """One value of a sample request: its name (the served model's column), the CLI flag that gives it, how its bytes
    or text are read (`decode`), and its help."""
    name: str
    flag: str
    decode: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    column_type: str = "string"   # the served model's column: "string" (text, JSON) or "binary" (file bytes)


class Kind:
    """The base every conditioning kind subclasses; the defaults are those of a kind with no condition at all."""
    name = ""
    spatial = False          # laid out on the image: a mirrored latent would need its condition mirrored too
    dense = False            # concatenated to z_t; its null is zeros (only where training dropped it)
    sizes = False            # conditions on the image's original size, crop and target size itself (SDXL)
    inputs: tuple[Input, ...] = ()  # what a sample request carries; () = a caption/"" prompt
    sample_columns: tuple[str, ...] = ()  # cache columns the default sample grid reads

    # ---- config and cache
    def validate(self, cfg) -> None:
        """Refuse a config this kind cannot run (raise ldm.config.ConfigError naming the key and the fix)."""

    def check_cache(self, cfg, manifest: dict, cache: str) -> None:
        """Refuse a latent cache that lacks what this kind trains on (raise CacheMismatch naming the fix)."""

    def columns(self, cfg, cached_emb: bool) -> tuple[str, ...]:
        """The cache columns a training step reads for the condition."""
        return ()

    def cond_stage(self, cfg) -> nn.Module | None:
        """The trainable tau_theta this kind brings into LatentDiffusion (None: nothing trained beside the UNet)."""
        return None

    def frozen_encoder(self, cfg, path: str, device) -> nn.Module | None:
        """The frozen pretrained encoder this kind reads its condition with (None: none)."""
        return None

    # ---- conditions
    def setup(self, c) -> None:
        """Prepare the Conditioner `c` (load encoders, make the null condition)."""

    def batch(self, c, batch: dict, drop: torch.Tensor, generator: torch.Generator | None) -> dict:
        """A training batch's condition, the samples in `drop` set to the null (CFG training)."""
        return {}

    def prompts(self, c, prompts: list) -> tuple[dict, dict | None]:
        """Sampling's (cond, uncond); uncond None: no null was trained, sample unguided."""
        return {}, {}

    def with_sizes(self, c, cond: dict, micro: torch.Tensor, drop: torch.Tensor) -> dict:
        """A training condition with the micro-conditions beside it (unet.micro_cond), zeros where dropped."""
        return {**cond, "micro": torch.where(drop.to(micro.device)[:, None], torch.zeros_like(micro), micro)}

    def sampled_sizes(self, c, cond: dict, uncond: dict | None, micro: torch.Tensor) -> tuple:
        """Sampling's (cond, uncond) with the micro-conditions: the null's are zeros where training dropped them with
        the condition (cond_drop_prob > 0), else the same values (guidance then leaves them alone)."""
        null = torch.zeros_like(micro) if c.cfg.cond_drop_prob else micro
        return {**cond, "micro": micro}, None if uncond is None else {**uncond, "micro": null}

    # ---- sampling
    def canvas(self, c, prompts: list, size: tuple[int, int] | None, trained: tuple[int, int]) -> tuple[list, Any]:
        """(prompts, size) of the samples: `size` as asked, or what the prompts dictate (None: the training size)."""
        return prompts, size

    def noise_level(self, cfg, level: int):
        """`cfg` (ConditioningConfig) with the condition's noise level at sampling set to `level`."""
        raise ValueError(f"noise level {level}: only a super-resolution model trained with noise augmentation takes "
                         f"one (this model: {self.name} conditioning)")

    def finish(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        """The decoded samples as returned (e.g. inpainting pastes the known pixels back)."""
        return images

    def sample_prompts(self, cfg, rows: list[dict], side: int) -> list:
        """The default sample-grid conditions from the cache's first rows (`sample_columns` read), `side` pixels."""
        return [""] * max(1, min(8, len(rows)))

    def held_out_reads(self, cfg) -> dict:
        """What the held-out set must be read with (read_held_out's label_maps / layouts)."""
        return {}

    def held_out(self, cfg, held) -> list:
        """The conditions of a held-out set (pipeline HeldOut: images, captions, labels, label maps, layouts)."""
        return [""] * len(held.captions)

    def from_inputs(self, values: dict, n: int) -> list:
        """Prompts from a request's decoded `inputs` (each a list of n values; a plain prompt: "prompt")."""
        return [str(p) for p in values.get("prompt", [""] * n)]

    def describe(self, prompt, i: int) -> str:
        """One line of a sample grid's prompts.txt."""
        return str(prompt)


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"conditioning kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown conditioning kind {name!r}; registered: {', '.join(sorted(KINDS))}")
    return KINDS[name]
