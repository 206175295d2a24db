"""CLIP score (Hessel et al. 2021) of generated images against the captions they were sampled from, with a local CLIP
model (nothing is downloaded): the mean cosine of the image and caption embeddings, reported both raw (`clip_score`,
the MLPerf text-to-image benchmark's figure: >= 0.15 with OpenCLIP ViT-H-14) and in the x100 convention of torchmetrics
and most papers (`clip_score_x100` = max(100 x mean cosine, 0)).

The model is a transformers CLIP folder, or an OpenCLIP checkpoint file (MLPerf's ViT-H-14 laion2b_s32b_b79k as
open_clip_pytorch_model.bin) with its tokenizer beside it, mapped onto transformers' CLIPModel by
pipeline/evaluate/openclip.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.evaluate.scores import to_uint8


def _features(out) -> torch.Tensor:
    """get_*_features' embeddings: a tensor, or (newer transformers) an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _transformers_clip(path: str):
    from transformers import CLIPModel, CLIPProcessor

    from ldm.text_encoders import resolve_local_dir
    local = Path(resolve_local_dir(path)) if "://" in path else Path(path)
    if not (local / "config.json").exists():
        raise FileNotFoundError(
            f"--clip-model {path}: neither a CLIP model folder in transformers' format (config.json, weights, "
            f"tokenizer and preprocessor files, as CLIPModel.save_pretrained and CLIPProcessor.save_pretrained write "
            f"them) nor an OpenCLIP checkpoint file (open_clip_pytorch_model.bin, or .safetensors, .pt, .pth). "
            f"MLPerf's OpenCLIP ViT-H-14 is the Hugging Face repository laion/CLIP-ViT-H-14-laion2B-s32B-b79K, "
            f"which holds both, downloaded where the network is reachable")
    return CLIPModel.from_pretrained(str(local)), CLIPProcessor.from_pretrained(str(local)), local.name


class ClipScore:
    """A CLIP model and its processor, loaded once: `score(images, captions)` -> the two figures."""

    def __init__(self, path: str, device="cpu", batch_size: int = 64):
        from pipeline.evaluate.openclip import is_openclip_file, load_openclip
        if is_openclip_file(path):
            model, self.processor = load_openclip(path)
            name = Path(path).parent.name or Path(path).stem
        else:
            model, self.processor, name = _transformers_clip(path)
        self.model = model.eval().to(device)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.name, self.device, self.batch_size = name, device, batch_size

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """cos(E_I, E_C) per image, images in [-1, 1] seen as the 8-bit files they would be saved as."""
        if len(captions) != len(images) or not all(captions):
            raise ValueError(f"CLIP score needs one non-empty caption per image (got {len(images)} images, "
                             f"{sum(bool(c) for c in captions)} captions): score a text-conditional model on "
                             f"held-out records with captions")
        out, b = [], self.batch_size
        for i in range(0, len(images), b):
            pixels = self.processor(images=list(to_uint8(images[i:i + b])), return_tensors="pt")
            text = self.processor(text=list(captions[i:i + b]), return_tensors="pt", padding=True,
                                  truncation=True, max_length=self.max_length)
            img = _features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
            txt = _features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                         attention_mask=text["attention_mask"].to(self.device)))
            out.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1).cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor, captions: list[str]) -> dict:
        c = self.cosines(images, captions).double().mean().item()
        return {"clip_score": c, "clip_score_x100": max(100.0 * c, 0.0), "clip_model": self.name}
