"""Semantic synthesis (paper §4.3.2): trained on a 32x32 tile of each 64x64 scene, its label map (background + 10
classes) one-hot, pooled to the latent and concatenated; sampled whole at 64x64, twice the training canvas (the UNet
is convolutional), and once at 128x128 from four maps tiled. Judged by the classifier on each region (the same judge
on the real scenes is the ceiling; chance 10%), the generated silhouettes' overlap with the maps, FD / KID."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ldm.config import ConditioningConfig, LDMConfig, get_preset, register_preset
from pipeline.demo.judging import (PALETTE, held_out_scores, quantised, judge_inputs, region_agreement,
                                   save_rows)
from pipeline.demo.task import DemoOptions, DemoSize, Task


@register_preset("demo-semantic")
def preset() -> LDMConfig:
    """Dropped to zeros 10% of the time so that sampling can guide on it; min-SNR-5 loss weighting (Hang et al.
    2023) and self-attention at the 4x4 level only (docs/measurements.md, the semantic task). The first stage is the
    demo's, trained on 32x32 crops: convolutional, it encodes the 64x64 canvas as it is."""
    d = get_preset("demo")
    return replace(d, name="demo-semantic",
                   unet=replace(d.unet, in_channels=15, context_dim=None, attention_resolutions=(2,)),
                   diffusion=replace(d.diffusion, loss_weighting="min_snr"),
                   conditioning=ConditioningConfig(kind="semantic", num_classes=11, concat_channels=11,
                                                   cond_drop_prob=0.1))


def silhouette_iou(images, maps) -> float:
    """Mean IoU of the generated foreground (brighter than the label maps' item threshold) with the maps' items."""
    import numpy as np

    from pipeline.data.make_shards import SCENE_THRESHOLD
    fg = (images.mean(1) > SCENE_THRESHOLD / 127.5 - 1).cpu().numpy()
    want = np.stack([np.asarray(m) > 0 for m in maps])
    inter, union = (fg & want).sum((1, 2)), (fg | want).sum((1, 2))
    return round(float(np.mean(inter / np.maximum(union, 1))), 4)


def coloured(label_map):
    """A label map drawn with a colour per class, as an image in [-1, 1]."""
    import numpy as np

    from pipeline.evaluate.scores import from_uint8
    return from_uint8(np.asarray(PALETTE, np.uint8)[np.asarray(label_map)][None])[0]


@dataclass(frozen=True)
class SemanticSynthesis(Task):
    figures = ("region_agreement", "real_region_agreement", "silhouette_iou", "real_silhouette_iou",
               "region_agreement_4x", "silhouette_iou_4x", "regions", "grid_4x", "eta")
    metrics = ("region_agreement", "real_region_agreement", "silhouette_iou", "region_agreement_4x",
               "silhouette_iou_4x")

    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        return (f"draw {10 * size.samples_per_class} scenes from held-out label maps (DDIM {opts.sample_steps} steps; "
                f"twice the training crops) and one from four maps tiled (four times): the classifier on each region, "
                f"the silhouettes' overlap with the maps, FD against the real scenes")

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        import numpy as np
        import torch

        from pipeline.evaluate.grid import save_grid
        held, n, sampler = judge_inputs(export, out, size, self)
        maps, truth = sampler.kind.held_out(sampler.net.cfg, held)[:n], held.images[:n]
        boxes = [m["layout"] for m in held.metas[:n]]
        kw = dict(steps=opts.sample_steps, cfg_scale=self.cfg_scale or 1.0, eta=self.eta)
        images = quantised(sampler(maps, seeds=list(range(opts.seed, opts.seed + n)), **kw))
        s = self.canvas  # the 4x sample: four held-out maps tiled, their boxes moved with them
        big_map = np.block([[maps[0], maps[1]], [maps[2], maps[3]]])
        big_boxes = [[c, t + s * (i // 2), le + s * (i % 2), h, w] for i in range(4) for c, t, le, h, w in boxes[i]]
        big = quantised(sampler([big_map], seeds=[opts.seed], **kw))
        grid = save_rows([torch.stack([coloured(m) for m in maps[:8]]), images, truth], out, self,
                         "the held-out label map (a colour per class), the LDM's scene, the real scene")
        wide = out / f"samples_4x{self.tag}.png"
        save_grid(torch.stack([coloured(big_map), big[0]]), str(wide), nrow=2, upscale=3)
        return {**held_out_scores(out, size, held).score(images), "grid": grid, "grid_4x": str(wide), "eta": self.eta,
                "region_agreement": region_agreement(clf, images, boxes),
                "real_region_agreement": region_agreement(clf, truth, boxes),
                "silhouette_iou": silhouette_iou(images, maps), "real_silhouette_iou": silhouette_iou(truth, maps),
                "region_agreement_4x": region_agreement(clf, big, [big_boxes]),
                "silhouette_iou_4x": silhouette_iou(big, [big_map]), "regions": sum(len(b) for b in boxes)}

    headline_format = ("region agreement {region_agreement:.1%}", "real scenes {real_region_agreement:.1%}")
    report_format = ("the classifier sees each region's class in {region_agreement:.0%} of {regions} regions (real "
                     "scenes: {real_region_agreement:.0%}, chance 10%); silhouette IoU with the maps "
                     "{silhouette_iou:.3f} (real: {real_silhouette_iou:.3f})\n            {fd_line}\n            "
                     "(64x64: twice the 32x32 training crops); at four times (128x128, four maps tiled): "
                     "{region_agreement_4x:.0%} of its regions, IoU {silhouette_iou_4x:.3f}: {grid_4x}",
                     "grid (label map, LDM, real per row): {grid}")



# trained on a 32x32 tile (quadrant) of each scene, as the paper's model trains on 256^2 crops and samples 512x1024
TASK = SemanticSynthesis("semantic", "demo-semantic", "semantic synthesis UNet on 32x32 tiles of 64x64 scenes: the "
                         "label map one-hot, pooled to the 8x8 latent and concatenated to z_t (paper §4.3.2)",
                         "-semantic", scenes=12000, ldm_steps_factor=1.875, cfg_scale=3.0)
