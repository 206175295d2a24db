"""The encoder stage: a Ray Data callable class holding the frozen autoencoder (and text encoder) once per
actor, turning preprocessed pixels into the posterior (mean, std) in fp16 and captions into tokens."""
from __future__ import annotations

import numpy as np
import torch

from ldm.autoencoder import encode_latent


class LatentEncoder:
    def __init__(self, autoencoder: str, autoencoder_preset: str, text_encoder: str, max_length: int,
                 store_text_embeddings: bool, resolution: int, threads: int = 1, tracking_uri: str = ""):
        from pipeline.common.models import load_autoencoder
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ae = load_autoencoder(autoencoder, autoencoder_preset, tracking_uri).model.to(self.device)
        self.resolution = resolution
        self.text = None
        self.tokenizer = None
        self.store_text_embeddings = store_text_embeddings
        if text_encoder != "none":
            from ldm.conditioning import FrozenHFTextEncoder
            self.text = FrozenHFTextEncoder(text_encoder, max_length).to(self.device)
            self.tokenizer = self.text.tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        good = np.array([not s for s in batch["skip"]], dtype=bool)
        r = self.resolution
        out = {k: v for k, v in batch.items() if k != "pixels"}
        mean = std = None
        if good.any():
            px = np.stack([np.frombuffer(b, np.uint8).reshape(r, r, 3) for b in batch["pixels"][good]])
            x = torch.from_numpy(px).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                m, s = encode_latent(self.ae, x)
            mean, std = m.float().flatten(1).cpu().numpy(), s.float().flatten(1).cpu().numpy()
        d = mean.shape[1] if mean is not None else 1
        out["latent_mean"] = np.zeros((n, d), np.float16)
        out["latent_std"] = np.zeros((n, d), np.float16)
        if mean is not None:
            out["latent_mean"][good] = mean.astype(np.float16)
            out["latent_std"][good] = std.astype(np.float16)
        if self.text is not None:
            captions = [str(c) for c in batch["caption"]]
            ids, mask = self.text.tokenize(captions)
            out["input_ids"] = ids.numpy().astype(np.int32)
            out["attention_mask"] = mask.numpy().astype(np.int8)
            if self.store_text_embeddings:
                out["text_emb"] = self.embed(ids, mask).reshape(n, -1).astype(np.float16)
        return out

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Text embeddings, each distinct (tokens, mask) row encoded once: captions repeat within a batch (templates,
        stock phrases) and a row's embedding does not depend on its batch neighbours."""
        rows, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
        length = ids.shape[1]
        emb = self.text.encode(rows[:, :length].to(self.device), rows[:, length:].to(self.device))
        return emb.float().cpu().numpy()[inverse.numpy()]
