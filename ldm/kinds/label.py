"""Class-conditional (paper §4.1, Tab. 3): a label y as a learned embedding added to the time embedding; index
num_classes is the null class of classifier-free guidance."""
from __future__ import annotations

import torch

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import apply_drop


def _label(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"a class-conditional model takes class ids as prompts, not {v!r}") from None


class Label(Kind):
    name = "class"
    inputs = (Input("prompt", "--prompt", _label, "a class id (repeatable)", "ID"),)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, un = cfg.conditioning, cfg.unet
        if not c.num_classes or un.num_classes != c.num_classes + 1:
            raise ConfigError("conditioning.kind='class' needs conditioning.num_classes=N and unet.num_classes=N+1 "
                              "(the extra class is the null label for classifier-free guidance)")

    def check_cache(self, cfg, manifest: dict, cache: str) -> None:
        """Every row needs a label in [0, num_classes) (the encode job counts the labels of every shard; a cache
        encoded before the counts were kept is not checked)."""
        labels, n = manifest.get("totals", {}).get("labels"), cfg.conditioning.num_classes
        if labels is None:
            return
        bad = {k: v for k, v in labels.items() if k == "none" or not 0 <= int(k) < n}
        if bad:
            what = ", ".join(f"{v} row(s) {'without a label' if k == 'none' else f'labelled {k}'}"
                             for k, v in bad.items())
            raise CacheMismatch(
                f"conditioning.kind=class with conditioning.num_classes={n} needs a label 0..{n - 1} on every row, "
                f"but the cache {cache} has {what}. Encode shards whose records carry an integer 'label' in their "
                f"metadata (json), or set conditioning.num_classes (and unet.num_classes = it + 1) to cover the labels")

    def columns(self, cfg, cached_emb):
        return ("label",)

    def setup(self, c) -> None:
        c.null = {"y": torch.tensor([c.cfg.num_classes], device=c.device)}

    def batch(self, c, batch, drop, generator):
        return {"y": apply_drop(batch["label"].to(c.device).long(), c.null["y"], drop)}

    def prompts(self, c, prompts):
        return ({"y": torch.tensor([_label(p) for p in prompts], device=c.device)},
                {"y": c.null["y"].expand(len(prompts))})

    def sample_prompts(self, cfg, rows, side):
        return [str(i) for i in range(cfg.conditioning.num_classes)]

    def held_out(self, cfg, held) -> list:
        if held.labels is None:
            raise ValueError("a class-conditional model needs held-out shards whose records carry a 'label'")
        return list(held.labels)

    def from_inputs(self, values, n):
        return [_label(p) for p in values.get("prompt", [])]

    def describe(self, prompt, i: int) -> str:
        return f"label {prompt}"


register(Label())
