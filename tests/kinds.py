"""Every registered conditioning kind at tiny size: the one entry per kind that the kinds' contract test
(tests/ldm/kinds/test_contract.py) and the jobs' end-to-end tests (tests/pipeline/test_kinds_e2e.py) share.

An entry: the `tiny` preset's overrides that make the kind, a manifest fragment whose cache the kind trains on, and a
sample request (what the served model's columns carry: text, or a file's bytes)."""
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _scene_map() -> np.ndarray:
    m = np.zeros((16, 16), np.uint8)
    m[2:8, 2:8], m[9:15, 9:15] = 2, 9  # a trouser and a bag
    return m


def _hole() -> np.ndarray:
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    return m


@dataclass(frozen=True)
class Entry:
    overrides: tuple[str, ...]
    manifest: dict = field(default_factory=dict)    # what the cache must say (beside the latents) for the kind
    request: dict = field(default_factory=dict)     # the served model's columns for two samples


TINY = {
    # the tiny preset as it is: the paper's transformer over BERT tokens, trained with the UNet
    "text": Entry((), {"text_encoder": {"kind": "hf", "max_length": 16}},
                  {"prompt": ["a photo of a bag", "a photo of a dress"]}),
    "class": Entry(("conditioning.kind=class", "conditioning.num_classes=10", "unet.num_classes=11",
                    "unet.context_dim=null"), {"totals": {"labels": {"3": 5, "7": 5}}}, {"prompt": ["3", "7"]}),
    "none": Entry(("conditioning.kind=none", "unet.context_dim=null")),
    # x4 super-resolution on the f=2 first stage: the 4x4 low-res image resized to the 8x8 latent (the spatial
    # rescaler) and noise-augmented, its level the UNet's class
    "lowres": Entry(("conditioning.kind=lowres", "conditioning.concat_channels=3", "unet.in_channels=7",
                     "unet.context_dim=null", "conditioning.lowres_factor=4", "conditioning.lowres_noise_max=350",
                     "unet.num_classes=351", "conditioning.lowres_noise_sample=20", "conditioning.cond_drop_prob=0"),
                    {"preprocess": {"lowres_factor": 4}},
                    {"image": [png(np.full((4, 4, 3), 40, np.uint8)), png(np.full((4, 4, 3), 220, np.uint8))]}),
    # the masked image's 4-channel latent and its hole concatenated to z_t (4 + 4 + 1 input channels)
    "inpaint": Entry(("conditioning.kind=inpaint", "conditioning.concat_channels=5", "unet.in_channels=9",
                      "unet.context_dim=null", "conditioning.cond_drop_prob=0"),
                     {"preprocess": {"inpaint_variants": 2}},
                     {"image": [png(np.full((16, 16, 3), 90, np.uint8))] * 2, "mask": [png(_hole())] * 2}),
    # the label map (background + 10 classes) one-hot, pooled to the latent, concatenated to z_t
    "semantic": Entry(("conditioning.kind=semantic", "conditioning.num_classes=11", "conditioning.concat_channels=11",
                       "unet.in_channels=15", "unet.context_dim=null", "conditioning.cond_drop_prob=0"),
                      {"preprocess": {"label_maps": True}}, {"label_map": [png(_scene_map())] * 2}),
    # hybrid layout-to-image: up to 2 boxes, each a token of a 1-layer transformer the UNet cross-attends to, and drawn
    # per class, concatenated to z_t (4 + 10 input channels); latents normalised per channel (EDM2)
    "layout": Entry(("latent_norm=channel", "conditioning.kind=layout", "conditioning.num_classes=10",
                     "conditioning.max_boxes=2", "conditioning.n_embed=32", "conditioning.n_layer=1",
                     "conditioning.layout_grid=8", "unet.context_dim=32", "conditioning.layout_concat=true",
                     "conditioning.concat_channels=10", "unet.in_channels=14"), {"preprocess": {"layout_boxes": 2}},
                    {"layout": [json.dumps({"size": [16, 16], "boxes": [[3, 2, 2, 8, 8]]}),
                                json.dumps({"size": [16, 16], "boxes": [[1, 0, 0, 6, 6], [8, 8, 8, 8, 8]]})]}),
    # SDXL's conditioning on the offline MiniLM (one encoder here, two in SDXL): its penultimate layer as the context,
    # its pooled output and 6 x 8 size features as the vector y; the cache holds the embeddings
    "text_pooled": Entry(("conditioning.kind=text_pooled", "conditioning.text_encoder=hf",
                          "conditioning.text_layer=penultimate", "conditioning.mask_padding=false",
                          "conditioning.pooled_dim=384", "conditioning.micro_dim=8", "unet.context_dim=384",
                          "unet.adm_in_channels=432"),
                         {"text_encoder": {"kind": "hf", "embeddings": True, "pooled_dim": 384, "dim": 384,
                                           "max_length": 16, "layer": "penultimate", "mask_padding": False}},
                         {"prompt": ["a photo of a bag", "a photo of a dress"]}),
}


def cache_batch(columns, n: int, latent=(4, 8, 8), seed: int = 0) -> dict:
    """A batch of `n` cache rows holding `columns` as the latent cache stores them (flat rows, tokens, uint8 images,
    -1 padded boxes), with values drawn from `seed`: what a training step reads for any kind."""
    import torch
    g = torch.Generator().manual_seed(seed)
    c, h, w = latent
    make = {
        "latent_mean": lambda: torch.randn(n, c * h * w, generator=g).half(),
        "latent_std": lambda: (0.1 * torch.rand(n, c * h * w, generator=g)).half(),
        "input_ids": lambda: torch.randint(100, 2000, (n, 16), generator=g),
        "attention_mask": lambda: torch.ones(n, 16, dtype=torch.long),
        "label": lambda: torch.randint(0, 10, (n,), generator=g),
        "lowres": lambda: torch.randint(0, 256, (n, 4 * 4 * 3), generator=g, dtype=torch.uint8),
        "inpaint_latent": lambda: torch.randn(n, 2 * c * h * w, generator=g).half(),
        "inpaint_mask": lambda: torch.randint(0, 2, (n, 2 * h * w), generator=g, dtype=torch.uint8),
        "label_map": lambda: torch.randint(0, 11, (n, 16 * 16), generator=g, dtype=torch.uint8),
        "layout": lambda: torch.tensor([[3, 2, 2, 8, 8, -1, -1, -1, -1, -1]] * n, dtype=torch.int16),
        "caption": lambda: [f"a photo of item {i % 3}" for i in range(n)],
        "text_emb": lambda: torch.randn(n, 16 * 384, generator=g).half(),
        "text_pooled": lambda: torch.randn(n, 384, generator=g).half(),
        "orig_h": lambda: torch.randint(16, 64, (n,), generator=g), "orig_w": lambda: torch.randint(16, 64, (n,)),
        "crop_top": lambda: torch.zeros(n, dtype=torch.long), "crop_left": lambda: torch.zeros(n, dtype=torch.long),
    }
    unknown = set(columns) - set(make)
    assert not unknown, f"tests/kinds.py knows no cache column {sorted(unknown)}: add how to draw it to cache_batch"
    return {k: make[k]() for k in ("latent_mean", "latent_std", *columns)}
