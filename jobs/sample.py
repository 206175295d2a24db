#!/usr/bin/env python
"""Generate images from a trained LDM export (model.safetensors written by jobs/train_ldm.py):
DDIM, DPM-Solver++(2M) or DDPM with classifier-free guidance, decoded by the first stage.

  python jobs/sample.py --model runs/ldm-demo-.../checkpoint_.../export/model.safetensors \\
      --prompt "a photo of a sneaker" --prompt "a photo of a dress" --n 4 --out samples.png
  python jobs/sample.py --model runs/ldm-demo-sr-.../export/model.safetensors --lowres small.png --n 4 --cfg-scale 1
  python jobs/sample.py --model runs/ldm-demo-inpaint-.../export/model.safetensors --image photo.png --mask hole.png
  python jobs/sample.py --model runs/ldm-demo-semantic-.../export/model.safetensors --label-map scene.png --cfg-scale 1
  python jobs/sample.py --model runs/ldm-demo-layout-.../export/model.safetensors --layout scene.json --cfg-scale 2
  (scene.json: {"size": [64, 64], "boxes": [[7, 2, 3, 28, 28], [0, 34, 33, 28, 28]]}, boxes [class, top, left,
  height, width] in pixels of that canvas)
"""
import argparse

from _common import run

from ldm.sampling import SAMPLERS
from pipeline.common.precision import HELP, PRECISIONS


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="LDM export: a model.safetensors path or mlflow-models:/NAME/VERSION")
    for flag, (helps, metavar) in condition_flags().items():  # every registered kind's inputs (ldm/kinds/)
        p.add_argument(flag, action="append", default=[], metavar=metavar, help="; ".join(helps))
    p.add_argument("--noise-level", type=int, default=-1,
                   help="super-resolution: the low-res condition's noise-augmentation level at sampling "
                        "(0 = clean .. conditioning.lowres_noise_max; -1 = the model's lowres_noise_sample)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="samples.png", help="output grid PNG (one row per prompt)")
    p.add_argument("--sampler", choices=["auto", *sorted(SAMPLERS)], default="auto",
                   help="sampler (ldm.sampling.SAMPLERS); auto: the model's own, ddim for the ddpm objective, euler "
                        "for flow (heun: flow's second-order sampler)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise: 0 deterministic (the default), 1 DDPM-like; ddim sampler only")
    p.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="image size in pixels (default: the training size); larger sizes sample the convolutional "
                   "UNet beyond its training canvas (paper 4.3.2); a multiple of f x the UNet's downsampling. A "
                   "model trained on aspect buckets (encode --bucket) samples at the bucket nearest this aspect")
    p.add_argument("--orig-size", type=_size, default=None, metavar="HxW",
                   help="a micro-conditioned model (unet.micro_cond, SDXL): draw as if from an original image of "
                   "this size (default: the sample's own size; a small one asks for the look of an upscaled image)")
    p.add_argument("--crop", type=_pair, default=(0, 0), metavar="TOP,LEFT",
                   help="a micro-conditioned model: draw as if cropped at this offset from the original (default "
                   "0,0: an uncropped, centred subject)")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--precision", choices=PRECISIONS + ("",), default="",
                   help="default: the precision the model was trained in (its export records it); " + HELP)
    p.add_argument("--autoencoder", default="", help="first stage (default: the one recorded in the export)")
    p.add_argument("--text-encoder", default="", help="frozen text encoder folder (default: the recorded one)")
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of the grid")
    return p.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 64x128") from None
    return h, w


def _pair(text: str) -> tuple[int, int]:
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crop {text!r}: give TOP,LEFT in pixels, e.g. 0,32") from None
    return top, left


def condition_flags() -> dict:
    """{flag: ([help per kind], metavar)} over every registered conditioning kind's inputs."""
    from ldm.kinds import KINDS
    flags: dict = {}
    for kind in KINDS.values():
        for i in kind.inputs:
            helps, _ = flags.setdefault(i.flag, ([], i.metavar))
            helps.append(f"{kind.name} models: {i.help}")
    return flags


def conditions(a, kind) -> tuple[list, str]:
    """What to sample from, from the flags the model's kind takes: (prompts, what they are)."""
    takes = {i.flag for i in kind.inputs}
    stray = [f for f in condition_flags() if getattr(a, dest(f)) and f not in takes]
    if stray:
        raise ValueError(f"this {kind.name}-conditioned model takes {', '.join(sorted(takes)) or 'no condition'}, "
                         f"not {', '.join(stray)}")
    values = {i.name: [i.decode(v) for v in getattr(a, dest(i.flag))] for i in kind.inputs}
    n = max((len(v) for v in values.values()), default=0)
    if n:
        return kind.from_inputs(values, n), f"{kind.name} conditions"
    if kind.inputs and kind.inputs[0].name != "prompt":
        raise ValueError(f"a {kind.name}-conditioned model samples from {', '.join(sorted(takes))}: give them")
    return [""], "prompts"  # an empty caption, or an unconditional model's one sample


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def main(argv=None) -> int:
    from pipeline.common.models import local_file
    from pipeline.evaluate.grid import save_grid
    from pipeline.evaluate.sample import LDMSampler
    a = parse(argv)
    model = LDMSampler(local_file(a.model), a.autoencoder, a.text_encoder, precision=a.precision)
    if a.noise_level >= 0:
        model.set_noise_level(a.noise_level)
    prompts, what = conditions(a, model.kind)
    used = [p for p in prompts for _ in range(a.n)]
    images = model(used, steps=a.steps, cfg_scale=a.cfg_scale, seed=a.seed, sampler=a.sampler, eta=a.eta,
                   size=a.size, orig_size=a.orig_size, crop=a.crop)
    save_grid(images, a.out, nrow=a.n, upscale=a.upscale)
    print(f"[sample] {len(used)} images of {images.shape[-2]}x{images.shape[-1]} ({len(prompts)} {what} x {a.n}) "
          f"-> {a.out}")
    return 0


if __name__ == "__main__":
    run(main, "sample")
