"""x4 super-resolution (paper §4.4, SR3's setting) from the 8x8 bicubic copy the encode job caches, concatenated to the
8x8x4 latent and noise-augmented as SD's x4 upscaler. Judged against bicubic upsampling of the same copies: FD / KID
against the held-out set, PSNR / SSIM against each original (a diffusion upsampler trades PSNR for realism, the
paper's Tab. 5), and how often the classifier still sees the original's class."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ldm.config import ConditioningConfig, LDMConfig, get_preset, register_preset
from pipeline.demo.judging import class_kept, held_out_scores, quantised, judge_inputs, save_rows
from pipeline.demo.task import DemoOptions, DemoSize, Task


@register_preset("demo-sr")
def preset() -> LDMConfig:
    """f = 4 = the downscaling factor, so the 8x8 copy meets the 8x8x4 latent without resizing; noise levels 0..350,
    sampled at 20."""
    d = get_preset("demo")
    return replace(d, name="demo-sr", unet=replace(d.unet, in_channels=7, context_dim=None, num_classes=351),
                   conditioning=ConditioningConfig(kind="lowres", concat_channels=3, lowres_factor=4,
                                                   lowres_noise_max=350, lowres_noise_sample=20, cond_drop_prob=0.0))


@dataclass(frozen=True)
class SuperResolution(Task):
    figures = ("psnr_db", "ssim", "bicubic_fd", "bicubic_kid", "bicubic_psnr_db", "bicubic_ssim", "noise_level",
               "class_kept", "bicubic_class_kept", "real_class")
    metrics = ("bicubic_FD", "psnr_db", "ssim", "bicubic_psnr_db", "bicubic_ssim")

    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        return (f"upsample {10 * size.samples_per_class} held-out 8x8 images x4 (DDIM {opts.sample_steps} steps), and "
                f"by bicubic interpolation: FD, PSNR and SSIM of each against the real 32x32 images")

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        import numpy as np
        from PIL import Image

        from ldm.metrics import psnr, ssim
        from pipeline.evaluate.scores import from_uint8
        held, n, sampler = judge_inputs(export, out, size)
        truth, low = held.images[:n], sampler.kind.held_out(sampler.net.cfg, held)[:n]
        images = quantised(sampler(low, steps=opts.sample_steps, cfg_scale=1.0,
                                   seeds=list(range(opts.seed, opts.seed + n))))

        def upsampled(resample):
            return from_uint8(np.stack([np.asarray(Image.fromarray(lo).resize((32, 32), resample)) for lo in low]))
        bicubic = upsampled(Image.BICUBIC)
        scores = held_out_scores(out, size, held)
        r, base = scores.score(images), scores.score(bicubic)
        grid = save_rows([upsampled(Image.NEAREST)[:8], bicubic, images, truth], out, self,
                         "the 8x8 input (nearest), bicubic x4, the LDM x4, the real 32x32 image")
        kept = class_kept(clf, held.labels[:n], class_kept=images, bicubic_class_kept=bicubic, real_class=truth)
        return {**r, **kept, "grid": grid, "noise_level": sampler.conditioner.cfg.lowres_noise_sample,
                "psnr_db": round(float(psnr(images, truth).mean()), 2),
                "ssim": round(float(ssim(images, truth).mean()), 4), "bicubic_fd": base["fd"],
                "bicubic_kid": base["kid"], "bicubic_psnr_db": round(float(psnr(bicubic, truth).mean()), 2),
                "bicubic_ssim": round(float(ssim(bicubic, truth).mean()), 4)}

    headline_format = ("{fd_name} {sample_fd:.1f}, PSNR {psnr_db:.2f} dB",
                       "bicubic {bicubic_fd:.1f}, {bicubic_psnr_db:.2f} dB")
    report_format = ("x4 from 8x8 (noise level {noise_level}): {fd_line}; PSNR {psnr_db:.2f} dB, SSIM {ssim:.3f}\n"
                     "            bicubic x4: {fd_name} {bicubic_fd:.1f}, KID {bicubic_kid:.4f}; PSNR "
                     "{bicubic_psnr_db:.2f} dB, SSIM {bicubic_ssim:.3f}\n            the classifier sees the "
                     "original's class in {class_kept:.0%} of the LDM's images, {bicubic_class_kept:.0%} of "
                     "bicubic's ({real_class:.0%} of the originals)",
                     "grid (input, bicubic, LDM, real per row): {grid}")



TASK = SuperResolution("sr", "demo-sr", "x4 super-resolution UNet: the 8x8 bicubic copy concatenated to z_t, "
                       "noise-augmented (paper §4.4)", "-sr", lowres_factor=4)
