"""Inpainting (paper §4.5, SD-inpainting's input): the masked image's latent (rescaled as z is, §4.3.2) and its hole at
the latent's size concatenated to z_t. The cache holds K masked-image latents per image; training draws one per row
and step. Sampling takes an image and its mask (encoded by the first stage) and pastes the known pixels back."""
from __future__ import annotations

import numpy as np
import torch

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import dense_prompts, drop_dense, image_only, one_size
from ldm.kinds.inputs import read_mask, read_rgb
from ldm.masks import eval_masks, latent_mask, mask_out


class Inpaint(Kind):
    name = "inpaint"
    spatial = dense = True
    inputs = (Input("image", "--image", read_rgb, "an image to inpaint (PNG/JPEG, repeatable, each with its --mask); "
                    "the known pixels come back as given", "IMAGE", "binary"),
              Input("mask", "--mask", read_mask, "the hole of the --image at the same position: a grayscale or RGB "
                    "image of its size, white (> 127) = to be generated", "MASK", "binary"))
    sample_columns = ("latent_mean", "inpaint_latent", "inpaint_mask")

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, ae = cfg.conditioning, cfg.autoencoder
        if c.concat_channels != ae.embed_dim + 1:
            raise ConfigError(f"conditioning.kind='inpaint' concatenates the masked image's {ae.embed_dim}-channel "
                              f"latent and the 1-channel hole: set conditioning.concat_channels={ae.embed_dim + 1} "
                              f"(and unet.in_channels={2 * ae.embed_dim + 1})")
        image_only(cfg, self.name)

    def check_cache(self, cfg, manifest, cache):
        if not manifest.get("preprocess", {}).get("inpaint_variants", 0):
            raise CacheMismatch(f"conditioning.kind=inpaint trains on masked images' latents, but the cache {cache} "
                                f"was encoded without them: re-encode into a new --output with --inpaint-variants K "
                                f"(e.g. 4 masks per image)")

    def columns(self, cfg, cached_emb):
        return ("inpaint_latent", "inpaint_mask")

    def setup(self, c) -> None:
        if c.latent_scale is None:
            raise ValueError("an inpainting conditioning needs the run's latent scale")

    def condition(self, c, latent: torch.Tensor, hole: torch.Tensor) -> dict:
        """The masked image's latent (B,C,h,w, the first stage's scale) and its hole (B,1,h,w) -> the concat
        condition, the latent rescaled as z is (§4.3.2)."""
        return {"concat": torch.cat([c.latent_scale.to_diffusion(latent.float()), hole.float()], 1)}

    def batch(self, c, batch, drop, generator):
        dev, n = c.device, drop.shape[0]
        lat, holes = batch["inpaint_latent"].to(dev), batch["inpaint_mask"].to(dev)
        ch = lat.shape[1] // holes.shape[1]          # K*C*h*w / K*h*w
        hw = batch["latent_mean"].shape[1] // ch     # C*h*w / C
        k, side = holes.shape[1] // hw, int(round(hw ** 0.5))
        draw_on = generator.device if generator is not None else dev
        pick = torch.randint(0, k, (n,), generator=generator, device=draw_on).to(dev)  # one of the K variants
        rows = torch.arange(n, device=dev)
        latent, hole = lat.view(n, k, ch, side, side)[rows, pick], holes.view(n, k, 1, side, side)[rows, pick]
        return drop_dense(self.condition(c, latent, hole), drop)

    def prompts(self, c, prompts):
        """{"image": (H,W,3) uint8, "mask": (H,W) bool, True = hole} encoded by the first stage (x * (1 - m), as the
        encode job caches it), or a cached {"latent": (C,h,w), "hole": (h,w)}."""
        dev = c.device
        if all("latent" in p for p in prompts):
            latent = torch.stack([torch.as_tensor(np.asarray(p["latent"], np.float32)) for p in prompts])
            hole = torch.stack([torch.as_tensor(np.asarray(p["hole"], np.float32)) for p in prompts])[:, None]
            return dense_prompts(self.condition(c, latent.to(dev), hole.to(dev)), c.cfg)
        if c.encode is None:
            raise ValueError("inpainting from images and masks needs the first stage's encoder (Conditioner encode=)")
        images = torch.from_numpy(np.stack([np.asarray(p["image"], np.uint8) for p in prompts]))
        masks = torch.from_numpy(np.stack([np.asarray(p["mask"], bool) for p in prompts]))
        latent = c.encode(mask_out(images, masks).to(dev))
        return dense_prompts(self.condition(c, latent, latent_mask(masks[:, None], c.f).to(dev)), c.cfg)

    def canvas(self, c, prompts, size, trained):
        """The output is the images' size (one size, any multiple of the UNet's; §4.3.2)."""
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, dict) or {"image", "mask"} - set(p)]
        if bad:
            raise ValueError(f"an inpainting model takes {{'image': (h, w, 3) uint8, 'mask': (h, w) bool}} per sample; "
                             f"sample(s) {bad[:5]} are not")
        img, mask = one_size({(np.asarray(p["image"]).shape, np.asarray(p["mask"]).shape) for p in prompts},
                             "an inpainting model takes RGB images and their masks")
        if len(img) != 3 or img[2] != 3 or mask != img[:2]:
            raise ValueError(f"an inpainting model takes RGB images with masks of their size; got image {img}, "
                             f"mask {mask}")
        if size is not None and size != img[:2]:
            raise ValueError(f"--size {size[0]}x{size[1]} does not match the images to inpaint ({img[0]}x{img[1]})")
        return prompts, (None if img[:2] == trained else tuple(img[:2]))

    def finish(self, images, prompts):
        """The known pixels as given, the generated ones in the hole (§4.5)."""
        if not all("image" in p for p in prompts):
            return images
        known = torch.from_numpy(np.stack([p["image"] for p in prompts])).permute(0, 3, 1, 2).float() / 127.5 - 1
        hole = torch.from_numpy(np.stack([np.asarray(p["mask"], bool) for p in prompts]))[:, None].to(images.device)
        return torch.where(hole, images, known.to(images.device))

    def sample_prompts(self, cfg, rows, side):
        """Each row's first cached variant ({"latent": (C,h,w), "hole": (h,w)})."""
        out = []
        for r in rows[:8]:
            z, lat, hole = r["latent_mean"], r["inpaint_latent"], r["inpaint_mask"]
            ch = len(lat) // len(hole)  # K*C*h*w / K*h*w
            hw = len(z) // ch
            s = int(round(hw ** 0.5))
            out.append({"latent": np.asarray(lat[:ch * hw], np.float32).reshape(ch, s, s),
                        "hole": np.asarray(hole[:hw], np.float32).reshape(s, s)})
        return out

    def held_out(self, cfg, held) -> list:
        """Each held-out image with one of a fixed set of masks (`eval_masks`): the same for every model compared."""
        pixels = held.pixels()
        return [{"image": p, "mask": m} for p, m in zip(pixels, eval_masks(len(pixels), *pixels.shape[1:3]))]

    def from_inputs(self, values, n):
        images, masks = values.get("image", []), values.get("mask", [])
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} image(s) but {len(masks)} mask(s): give one mask per image")
        for i, (im, m) in enumerate(zip(images, masks)):
            if m.shape != im.shape[:2]:
                raise ValueError(f"mask {i} is {m.shape[0]}x{m.shape[1]} but its image is {im.shape[0]}x"
                                 f"{im.shape[1]}: give a mask of the image's size")
        return [{"image": im, "mask": m} for im, m in zip(images, masks)]

    def describe(self, prompt, i: int) -> str:
        hole = prompt["hole"] if "hole" in prompt else prompt["mask"]
        return f"masked image {i} ({np.asarray(hole, np.float32).mean():.0%} hidden)"


register(Inpaint())
