"""The encoder stage: a Ray Data callable class holding the frozen autoencoder (and text encoder) once per
actor, turning preprocessed pixels into the posterior (mean, std) in fp16 and captions into tokens."""
from __future__ import annotations

import numpy as np
import torch

from ldm.autoencoder import encode_latent
from ldm.masks import latent_mask, mask_out
from pipeline.common.precision import PRECISIONS, resolve
from pipeline.common.runtime import node_id

COMPILE = ("auto", "on", "off")


class LatentEncoder:
    """precision: fp32; autocast (fp32 weights, bf16 matmuls/convs); bf16 (bf16 weights and activations, norm
    statistics accumulated in fp32); auto = bf16 on a GPU, fp32 on a CPU.
    compile: torch.compile the encoder (GroupNorm + SiLU fused; a one-off compile per actor); auto = on a GPU.
    bf16 + compile is the fastest of these on a GPU and channels_last helps neither, so it is off there by default
    (docs/benchmarks.md, bench/mfu.py); on a CPU channels_last (None = auto) is on: oneDNN's convolutions run NHWC
    about 15% faster on one thread (docs/measurements.md). On a GPU the pixels go through a pinned buffer and their
    scaling to [-1, 1] runs inside the compiled graph. cudnn_benchmark lets cuDNN time its algorithms once per shape."""

    def __init__(self, autoencoder: str, autoencoder_preset: str, text_encoder: str, max_length: int,
                 store_text_embeddings: bool, resolution: int, threads: int = 1, tracking_uri: str = "",
                 precision: str = "auto", compile: str = "auto", channels_last: bool | None = None,
                 cudnn_benchmark: bool = True, flip: bool = False, bucket: bool = False,
                 extra_resolutions: tuple[int, ...] = ()):
        from pipeline.common.models import load_autoencoder
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if compile not in COMPILE:
            raise ValueError(f"compile {compile!r}: use one of {', '.join(COMPILE)}")
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark  # this actor's process only
        self._staging: torch.Tensor | None = None  # pinned flat uint8 pixels, grown to the largest batch seen
        precision = resolve(precision, cuda=self.device == "cuda")
        self.autocast = precision == "autocast"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if channels_last is None:
            channels_last = self.device == "cpu"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.ae = load_autoencoder(autoencoder, autoencoder_preset, tracking_uri).model
        self.ae = self.ae.to(self.device, self.dtype).to(memory_format=fmt)
        self.fmt = fmt
        on = compile == "on" or (compile == "auto" and self.device == "cuda")
        self.encode = torch.compile(self._encode) if on else self._encode
        self.resolution = resolution
        self.flip = flip  # also encode each image mirrored left-right (--flip-latents)
        self.bucket = bucket  # rows of several sizes (aspect buckets): latents as one flat array per row
        self.extra = tuple(extra_resolutions)  # the same crops at these resolutions too (a multi-resolution cache)
        self.text = None  # the frozen text encoder(s) with --store-text-embeddings, else its tokenizer alone
        self.store_text_embeddings = store_text_embeddings
        if text_encoder != "none":
            from ldm.text_encoders import CaptionTokenizer, load_frozen_text
            self.text = load_frozen_text(text_encoder, max_length).to(self.device) if store_text_embeddings \
                else CaptionTokenizer(text_encoder, max_length)
        self.max_length = max_length
        self.node = node_id()

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        good = np.array([not s for s in batch["skip"]], dtype=bool)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "masks") and not k.startswith("pixels_")}
        out["encoder_node"] = np.full(n, self.node, dtype=object)  # where the work ran, for the job's summary
        for r in self.extra:  # rows whose image is smaller than r have no latent there (an empty one)
            k = r // self.resolution
            has = good & np.array([len(b) > 0 for b in batch[f"pixels_{r}"]], bool)
            got = self.encode_buckets({"pixels": batch[f"pixels_{r}"], "bucket_h": np.asarray(batch["bucket_h"]) * k,
                                       "bucket_w": np.asarray(batch["bucket_w"]) * k}, has)
            out.update({f"{c}_{r}": v for c, v in got.items() if c != "flip_sq"})
        if self.bucket:
            out.update(self.encode_buckets(batch, good))
            return self.add_text(batch, out)
        mean = std = None
        if good.any():
            px = self.pixels_to_device(batch["pixels"][good])
            m, s = self.encode(px)
            mean, std = m.float().flatten(1).cpu().numpy(), s.float().flatten(1).cpu().numpy()
            if "masks" in batch:
                out.update(self.encode_masked(px, batch["masks"][good], good, m.shape[1:]))
            if self.flip:
                out.update(self.encode_flipped(px, m, good))
        elif "masks" in batch:  # no good row: the columns still exist (as latent_mean's below)
            out.update(inpaint_latent=np.zeros((n, 1), np.float16), inpaint_mask=np.zeros((n, 1), np.uint8))
        d = mean.shape[1] if mean is not None else 1
        out["latent_mean"] = np.zeros((n, d), np.float16)
        out["latent_std"] = np.zeros((n, d), np.float16)
        if mean is not None:
            out["latent_mean"][good] = mean.astype(np.float16)
            out["latent_std"][good] = std.astype(np.float16)
        return self.add_text(batch, out)

    def encode_buckets(self, batch: dict, good: np.ndarray) -> dict:
        """Rows of several sizes (aspect buckets), each size encoded as one batch: the posterior (and, with flip,
        the mirrored image's) as one flat fp16 array per row."""
        n = len(good)
        cols = ("latent_mean", "latent_std") + (("latent_flip_mean", "latent_flip_std") if self.flip else ())
        out = {c: np.empty(n, dtype=object) for c in cols}
        for c in cols:
            out[c][:] = [np.zeros(0, np.float16)] * n
        if self.flip:
            out["flip_sq"] = np.zeros(n, np.float64)
        sizes = np.stack([np.asarray(batch["bucket_h"]), np.asarray(batch["bucket_w"])], 1)
        for h, w in {tuple(int(v) for v in sizes[i]) for i in np.flatnonzero(good)}:
            rows = good & (sizes[:, 0] == h) & (sizes[:, 1] == w)
            px = self.pixels_to_device(batch["pixels"][rows], (h, w))
            m, s = self.encode(px)
            got = {"latent_mean": m.float().flatten(1).cpu().numpy().astype(np.float16),
                   "latent_std": s.float().flatten(1).cpu().numpy().astype(np.float16)}
            if self.flip:
                flipped = self.encode_flipped(px, m, np.ones(int(rows.sum()), bool))
                out["flip_sq"][rows] = flipped.pop("flip_sq")
                got.update(flipped)
            for c, arr in got.items():
                for i, row in zip(np.flatnonzero(rows), arr):
                    out[c][i] = row
        return out

    def add_text(self, batch: dict, out: dict) -> dict:
        n = len(batch["key"])
        if self.text is not None:
            captions = [str(c) for c in batch["caption"]]
            ids, mask = self.text.tokenize(captions)
            out["input_ids"] = ids.numpy().astype(np.int32)
            out["attention_mask"] = mask.numpy().astype(np.int8)
            if self.store_text_embeddings:
                emb, pooled = self.embed(captions)
                out["text_emb"] = emb.reshape(n, -1).astype(np.float16)
                if getattr(self.text, "encoders", None) is not None:  # SDXL's pooled projection beside the context
                    out["text_pooled"] = pooled.astype(np.float16)
        return out

    def encode_flipped(self, px: torch.Tensor, mean: torch.Tensor, good: np.ndarray) -> dict:
        """The posterior of each image mirrored left-right (fp16, flat C*h*w), so a trainer can flip per sample:
        the autoencoder is not flip-equivariant, so mirroring the cached latent would not be the same image. Also
        each row's squared gap between the two (flip_sq, summed over the latent; the cache reports it)."""
        n, d = len(good), mean[0].numel()
        m, s = self.encode(torch.flip(px, dims=[2]))  # NHWC: width is dim 2
        out = {"latent_flip_mean": np.zeros((n, d), np.float16), "latent_flip_std": np.zeros((n, d), np.float16),
               "flip_sq": np.zeros(n, np.float64)}
        out["latent_flip_mean"][good] = m.float().flatten(1).cpu().numpy().astype(np.float16)
        out["latent_flip_std"][good] = s.float().flatten(1).cpu().numpy().astype(np.float16)
        out["flip_sq"][good] = (torch.flip(mean.float(), dims=[-1]) - m.float()).pow(2).flatten(1).sum(1).double().cpu()
        return out

    def encode_masked(self, px: torch.Tensor, masks: np.ndarray, good: np.ndarray, latent: tuple) -> dict:
        """Inpainting's condition (paper §4.5), cached as K variants per image: each mask's masked image encoded by
        the first stage (the posterior mean, fp16, flat K*C*h*w) and the hole at the latent's size (uint8, K*h*w)."""
        n, (r, k) = len(good), (self.resolution, len(masks[0]) // self.resolution ** 2)
        hole = torch.from_numpy(np.stack([np.frombuffer(b, np.uint8) for b in masks]).reshape(-1, 1, r, r))
        images = px.repeat_interleave(k, 0)  # (b*k, r, r, 3): each image once per mask
        m, _ = self.encode(mask_out(images, hole[:, 0].bool()))
        c, h, w = latent
        out = {"inpaint_latent": np.zeros((n, k * c * h * w), np.float16),
               "inpaint_mask": np.zeros((n, k * h * w), np.uint8)}
        out["inpaint_latent"][good] = m.float().reshape(-1, k * c * h * w).cpu().numpy().astype(np.float16)
        out["inpaint_mask"][good] = latent_mask(hole, r // h).reshape(-1, k * h * w).numpy().astype(np.uint8)
        return out

    def pixels_to_device(self, pixels: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The rows' RGB bytes as one (n, h, w, 3) uint8 tensor on the device (through a pinned buffer on a GPU);
        size (h, w) defaults to the square resolution."""
        (h, w), n = size or (self.resolution, self.resolution), len(pixels)
        rows = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in pixels]
        if self.device != "cuda":
            return torch.from_numpy(np.stack(rows))
        if self._staging is None or self._staging.numel() < n * h * w * 3:  # flat: any bucket's shape fits
            self._staging = torch.empty(n * h * w * 3, dtype=torch.uint8, pin_memory=True)
        stage = self._staging[: n * h * w * 3].view(n, h, w, 3)
        np.stack(rows, out=stage.numpy())
        # the copy runs on the compute stream: the outputs' .cpu() in __call__ waits for it and for the encoder,
        # so the buffer is free again when the next call refills it
        return stage.to(self.device, non_blocking=True)

    def _encode(self, px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NHWC pixels -> the posterior's (mean, std); the scaling to [-1, 1] is fused in when compiled."""
        x = px.permute(0, 3, 1, 2)  # NHWC bytes: channels_last already
        x = (x.float() / 127.5 - 1.0).to(self.dtype).contiguous(memory_format=self.fmt)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            return encode_latent(self.ae, x)

    def embed(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context, pooled) embeddings of the captions, each distinct caption encoded once: captions repeat within a
        batch (templates, stock phrases) and a row's embedding does not depend on its batch neighbours."""
        distinct = sorted(set(captions))
        where = {c: i for i, c in enumerate(distinct)}
        context, pooled = self.text.embed(distinct)
        pick = np.array([where[c] for c in captions])
        return context.float().cpu().numpy()[pick], pooled.float().cpu().numpy()[pick]
