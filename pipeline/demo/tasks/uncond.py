"""Unconditional (paper §4.1, Tab. 1): no condition. Judged by its samples' FD / KID against held-out images next to
the same model untrained (the figure training must lower), and by the share of each class among its samples as the
judge sees them (the real data is balanced: a missing class is a lost mode)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ldm.config import ConditioningConfig, LDMConfig, get_preset, register_preset
from pipeline.data.make_shards import FASHION_CLASSES
from pipeline.demo.judging import held_out_scores, quantised
from pipeline.demo.task import DemoOptions, DemoSize, Task


@register_preset("demo-uncond")
def preset() -> LDMConfig:
    d = get_preset("demo")
    return replace(d, name="demo-uncond", unet=replace(d.unet, context_dim=None),
                   conditioning=ConditioningConfig(kind="none"))


@dataclass(frozen=True)
class Unconditional(Task):
    figures = ("untrained_fd", "untrained_kid", "class_shares")
    metrics = ("untrained_FD",)

    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        return (f"sample {10 * size.samples_per_class} images (DDIM {opts.sample_steps} steps), and as many from the "
                f"same model untrained: FD / KID of each against held-out images")

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        import torch

        from pipeline.evaluate.classifier import predict
        from pipeline.evaluate.grid import save_grid
        from pipeline.evaluate.sample import LDMSampler
        sampler = LDMSampler(export)
        n = 10 * size.samples_per_class
        kw = dict(steps=opts.sample_steps, cfg_scale=1.0, seeds=list(range(opts.seed, opts.seed + n)))
        images = sampler([""] * n, **kw)
        untrained = sampler.untrained(opts.seed)([""] * n, **kw)
        scores = held_out_scores(out, size)  # the held-out set read and the feature net loaded once for both
        r, base = scores.score(quantised(images)), scores.score(quantised(untrained))
        counts = torch.bincount(predict(clf, images), minlength=10)
        grid = out / f"samples_grid{self.tag}.png"
        save_grid(images, str(grid), nrow=size.samples_per_class, upscale=3)
        return {**r, "untrained_fd": base["fd"], "untrained_kid": base["kid"], "grid": str(grid),
                "class_shares": {FASHION_CLASSES[c]: round(float(counts[c]) / n, 4) for c in range(10)}}

    headline_format = ("{fd_name} {sample_fd:.1f}", "untrained {untrained_fd:.1f}")
    report_format = ("{fd_line}\n            (the same model untrained: {fd_name} {untrained_fd:.1f}, KID "
                     "{untrained_kid:.4f})\n            classes the judge sees in them: {shares}", "grid: {grid}")

    def values(self, s: dict) -> dict:
        return {"shares": ", ".join(f"{k} {v:.0%}" for k, v in s["class_shares"].items())}



TASK = Unconditional("uncond", "demo-uncond", "unconditional UNet on the cache (paper §4.1)", "-uncond",
                     prompts=("",) * 10)
