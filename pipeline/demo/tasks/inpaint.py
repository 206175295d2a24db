"""Inpainting (paper §4.5): large stroke and box holes of held-out images filled from the masked image's latent (the
cache keeps 2 masked variants per image, one drawn per step), sampled with DDIM eta 1 and the known pixels pasted back.
Judged against a classical fill of the same holes (biharmonic inpainting, scikit-image): FD / KID of the filled images
against the held-out set, PSNR inside the holes, and how often the classifier still sees the original's class."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ldm.config import ConditioningConfig, LDMConfig, get_preset, register_preset
from pipeline.demo.judging import class_kept, held_out_scores, quantised, judge_inputs, save_rows
from pipeline.demo.task import DemoOptions, DemoSize, Task


@register_preset("demo-inpaint")
def preset() -> LDMConfig:
    """The masked image's 8x8x4 latent and its 8x8 hole concatenated to z_t (4 + 4 + 1 = 9 input channels)."""
    d = get_preset("demo")
    return replace(d, name="demo-inpaint", unet=replace(d.unet, in_channels=9, context_dim=None),
                   conditioning=ConditioningConfig(kind="inpaint", concat_channels=5, cond_drop_prob=0.0))


@dataclass(frozen=True)
class Inpainting(Task):
    figures = ("hole_psnr_db", "hole_share", "classical_fd", "classical_kid", "classical_hole_psnr_db", "class_kept",
               "classical_class_kept", "real_class", "eta")
    metrics = ("classical_FD", "hole_psnr_db", "classical_hole_psnr_db")

    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        return (f"fill the holes of {10 * size.samples_per_class} held-out images (DDIM {opts.sample_steps} steps, eta "
                f"{self.eta:g}), and by biharmonic inpainting: FD of each against the real images, PSNR in the holes")

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        import numpy as np
        import torch
        from skimage.restoration import inpaint_biharmonic

        from ldm.metrics import masked_psnr
        from pipeline.evaluate.scores import from_uint8
        held, n, sampler = judge_inputs(export, out, size)
        truth, prompts = held.images[:n], sampler.kind.held_out(sampler.net.cfg, held)[:n]  # a fixed set of holes
        holes = torch.from_numpy(np.stack([p["mask"] for p in prompts]))[:, None]
        images = quantised(sampler(prompts, steps=opts.sample_steps, cfg_scale=1.0, eta=self.eta,
                                   seeds=list(range(opts.seed, opts.seed + n))))
        classical = from_uint8(np.stack([
            (inpaint_biharmonic(p["image"] / 255.0, p["mask"], channel_axis=-1) * 255).round().clip(0, 255)
            .astype(np.uint8) for p in prompts]))
        scores = held_out_scores(out, size, held)
        r, base = scores.score(images), scores.score(classical)
        masked = torch.where(holes, torch.zeros_like(truth), truth)
        grid = save_rows([masked[:8], classical, images, truth], out, self, "the held-out image with its hole (gray), "
                         "biharmonic inpainting, the LDM's fill, the real image")
        kept = class_kept(clf, held.labels[:n], class_kept=images, classical_class_kept=classical, real_class=truth)
        return {**r, **kept, "grid": grid, "hole_share": round(float(holes.float().mean()), 4), "eta": self.eta,
                "hole_psnr_db": round(float(masked_psnr(images, truth, holes).mean()), 2),
                "classical_fd": base["fd"], "classical_kid": base["kid"],
                "classical_hole_psnr_db": round(float(masked_psnr(classical, truth, holes).mean()), 2)}

    headline_format = ("{fd_name} {sample_fd:.1f}, hole PSNR {hole_psnr_db:.2f} dB",
                       "biharmonic {classical_fd:.1f}, {classical_hole_psnr_db:.2f} dB")
    report_format = ("holes of {hole_share:.0%} of the pixels filled (DDIM eta {eta:g}): {fd_line}; PSNR in the holes "
                     "{hole_psnr_db:.2f} dB\n            biharmonic inpainting: {fd_name} {classical_fd:.1f}, KID "
                     "{classical_kid:.4f}; PSNR in the holes {classical_hole_psnr_db:.2f} dB\n            the "
                     "classifier sees the original's class in {class_kept:.0%} of the LDM's fills, "
                     "{classical_class_kept:.0%} of the biharmonic's ({real_class:.0%} of the originals)\n"
                     "            cache with {variants} mask variants per image: {cache_mb} MB, encoded in "
                     "{encode_seconds:.0f} s", "grid (masked input, biharmonic, LDM, real per row): {grid}")

    def values(self, s: dict) -> dict:
        return {"variants": self.inpaint_variants}



# stochastic steps (eta 1) correct a small model's errors in the hole; 2 variants per image rather than 4 halve the
# extra encode passes and buy the LDM 25% more steps (docs/measurements.md, the inpainting task)
TASK = Inpainting("inpaint", "demo-inpaint", "inpainting UNet: a masked image's latent and its hole concatenated to "
                  "z_t, one of 2 cached mask variants per image and step (paper §4.5)", "-inpaint", inpaint_variants=2,
                  ldm_steps_factor=1.25, eta=1.0)
