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


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="LDM export: a model.safetensors path or mlflow-models:/NAME/VERSION")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable); class ids for class models")
    p.add_argument("--lowres", action="append", default=[], metavar="IMAGE",
                   help="a low-res image file (PNG/JPEG, repeatable) for a super-resolution model: the output is "
                        "its size times the model's lowres_factor")
    p.add_argument("--image", action="append", default=[], metavar="IMAGE",
                   help="an image to inpaint (PNG/JPEG, repeatable, each with its --mask) for an inpainting model; "
                        "the known pixels come back as given")
    p.add_argument("--mask", action="append", default=[], metavar="MASK",
                   help="the hole of the --image at the same position: a grayscale or RGB image of its size, white "
                        "(> 127) = to be generated")
    p.add_argument("--label-map", action="append", default=[], metavar="PNG",
                   help="a label map (8-bit grayscale or palette PNG whose values are class ids, repeatable) for a "
                        "semantic synthesis model: the output has its size, any multiple of the UNet's (paper 4.3.2)")
    p.add_argument("--layout", action="append", default=[], metavar="JSON",
                   help='a layout file (repeatable) for a layout-to-image model: {"size": [H, W], "boxes": [[class, '
                        'top, left, height, width], ...]} in pixels of that canvas; the output has its size unless '
                        '--size says otherwise (the boxes keep their place relative to the canvas)')
    p.add_argument("--noise-level", type=int, default=-1,
                   help="super-resolution: the low-res condition's noise-augmentation level at sampling "
                        "(0 = clean .. conditioning.lowres_noise_max; -1 = the model's lowres_noise_sample)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="samples.png", help="output grid PNG (one row per prompt)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="sampler (ldm.sampling.SAMPLERS)")
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
    p.add_argument("--precision", choices=["fp32", "autocast"], default="fp32",
                   help="autocast: fp32 weights, bf16 matmuls/convs (the layout demo samples 1.8x as fast on a CPU "
                        "with AVX512-BF16 or AMX; slower than fp32 on a CPU without them)")
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


def read_file(path: str, flag: str, reader=None):
    """A --lowres/--image file as an (h, w, 3) uint8 array (a --mask as (h, w) bool); a clear error naming the file
    when it is not an image."""
    from PIL import UnidentifiedImageError

    from pipeline.evaluate.sample import read_rgb
    try:
        return (reader or read_rgb)(path)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SystemExit(f"[sample] {flag} {path}: not a readable image ({e}); give a PNG or JPEG file") from None


def conditions(a) -> tuple[list, str]:
    """What to sample from, from the flags: (prompts, what they are)."""
    from pipeline.evaluate.sample import read_label_map, read_mask
    given = [f for f, v in (("--prompt", a.prompt), ("--lowres", a.lowres), ("--image", a.image),
                            ("--label-map", a.label_map), ("--layout", a.layout)) if v]
    if len(given) > 1:
        raise SystemExit(f"[sample] give one kind of condition, not {' and '.join(given)}")
    if len(a.image) != len(a.mask):
        raise SystemExit(f"[sample] {len(a.image)} --image but {len(a.mask)} --mask: give one --mask per --image")
    if a.image:
        pairs = []
        for img, msk in zip(a.image, a.mask):
            pair = {"image": read_file(img, "--image"), "mask": read_file(msk, "--mask", read_mask)}
            if pair["mask"].shape != pair["image"].shape[:2]:
                raise SystemExit(f"[sample] --mask {msk} is {pair['mask'].shape[0]}x{pair['mask'].shape[1]} but "
                                 f"--image {img} is {pair['image'].shape[0]}x{pair['image'].shape[1]}: give a mask "
                                 f"of the image's size")
            pairs.append(pair)
        return pairs, "images to inpaint"
    if a.lowres:
        return [read_file(f, "--lowres") for f in a.lowres], "low-res images"
    if a.label_map:
        return [read_file(f, "--label-map", read_label_map) for f in a.label_map], "label maps"
    if a.layout:
        return [read_layout(f) for f in a.layout], "layouts"
    return a.prompt or [""], "prompts"


def read_layout(path: str) -> dict:
    """A --layout JSON file; a clear error naming the file when it is not one."""
    import json
    try:
        with open(path) as f:
            layout = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"[sample] --layout {path}: not a readable JSON file ({e})") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("size"), list) or len(layout["size"]) != 2 \
            or not isinstance(layout.get("boxes"), list):
        raise SystemExit(f'[sample] --layout {path}: give {{"size": [height, width], "boxes": [[class, top, left, '
                         f'height, width], ...]}} in pixels')
    return layout


def main(argv=None) -> int:
    from pipeline.evaluate.grid import save_grid
    from pipeline.common.models import local_file
    from pipeline.evaluate.sample import sample_images
    a = parse(argv)
    prompts, what = conditions(a)
    images, used = sample_images(local_file(a.model), prompts, a.n, a.autoencoder, a.text_encoder, a.steps,
                                 a.cfg_scale, a.seed, a.sampler, eta=a.eta, size=a.size,
                                 noise_level=None if a.noise_level < 0 else a.noise_level, orig_size=a.orig_size,
                                 crop=a.crop, precision=a.precision)
    save_grid(images, a.out, nrow=a.n, upscale=a.upscale)
    print(f"[sample] {len(used)} images of {images.shape[-2]}x{images.shape[-1]} ({len(prompts)} {what} x {a.n}) "
          f"-> {a.out}")
    return 0


if __name__ == "__main__":
    run(main, "sample")
