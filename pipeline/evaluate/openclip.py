"""An OpenCLIP checkpoint (open_clip_pytorch_model.bin / open_clip_model.safetensors, the files open_clip's
`create_model(..., pretrained=...)` loads) as a transformers CLIPModel, for the CLIP score: MLPerf scores with OpenCLIP
ViT-H-14 (laion2b_s32b_b79k), and a team may hold only that file. The standard OpenCLIP ViT layout (OpenAI's key names:
`visual.transformer.resblocks.N.attn.in_proj_weight`, ...) is mapped key by key; anything else in the file is refused
by name, so a tower this mapping does not know (timm or Hugging Face text towers, NormFormer blocks) is never scored
with weights left out.

What the weights cannot tell (the attention head width, GELU or QuickGELU, the normalisation of the pixels) comes from
the `open_clip_config.json` beside the file when there is one (the Hugging Face laion repositories ship it), else from
open_clip's own model configs: head width 64, ViT-H/g/bigG's vision towers 80/88/104, GELU (every LAION-trained model),
OpenAI's pixel mean and std. The tokenizer is OpenAI's BPE, which every such model shares: a CLIP tokenizer
(vocab.json and merges.txt, or tokenizer.json) must sit beside the file, as it does in those repositories.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.convert.clip import blocks_to_hf, config_from_hf, openclip_to_hf
from ldm.convert.single_file import read_single_file

SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}  # open_clip's ViT-H-14, ViT-g-14, ViT-bigG-14 configs; else 64
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def is_openclip_file(path: str) -> bool:
    return Path(path).suffix in SUFFIXES and Path(path).is_file()


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: a bare state dict, or open_clip's training checkpoint ({"state_dict": module.*})."""
    state, _ = read_single_file(path)
    return {k.removeprefix("module."): v for k, v in state.items()}


class _Reads(dict):
    """A state dict that remembers which keys were read, so that what a mapping left out can be named."""

    def __init__(self, state):
        super().__init__(state)
        self.read = {"attn_mask"}  # the text tower's causal mask, rebuilt by the model

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's keys -> CLIPModel's."""
    try:
        return _mapped(_Reads(state))
    except KeyError as e:
        raise ValueError(f"not the standard OpenCLIP ViT layout: it has no {e} (a timm or Hugging Face tower?); use "
                         f"the model's transformers release instead") from None


def _mapped(sd: _Reads) -> dict[str, torch.Tensor]:
    v = "vision_model."
    out = openclip_to_hf(sd) | blocks_to_hf(sd, "visual.transformer.resblocks.", f"{v}encoder.layers.")
    out |= {f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
            f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
            f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
            "visual_projection.weight": sd["visual.proj"].t().contiguous(),  # x @ proj -> Linear(x)
            "logit_scale": sd["logit_scale"]}
    for src, dst in (("visual.ln_pre", f"{v}pre_layrnorm"), ("visual.ln_post", f"{v}post_layernorm")):
        out |= {f"{dst}.{p}": sd[f"{src}.{p}"] for p in ("weight", "bias")}
    if left := sorted(set(sd) - sd.read):
        raise ValueError(f"not the standard OpenCLIP ViT layout: {len(left)} tensors this mapping does not know "
                         f"({', '.join(left[:5])}, ...); use the model's transformers release instead")
    return out


def clip_config(weights: dict[str, torch.Tensor], cfg: dict, eos_token_id: int):
    """transformers' CLIPConfig read off the mapped weights; `cfg` is open_clip_config.json's model_cfg (or {})."""
    from transformers import CLIPConfig
    vcfg, tcfg, v = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {}), "vision_model."
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    text = config_from_hf(weights, act) | {"eos_token_id": eos_token_id}
    text["num_attention_heads"] = tcfg.get("heads", text["num_attention_heads"])
    conv, pos = weights[f"{v}embeddings.patch_embedding.weight"], weights[f"{v}embeddings.position_embedding.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    vision = dict(hidden_size=width, patch_size=patch, image_size=round((pos.shape[0] - 1) ** 0.5) * patch,
                  intermediate_size=weights[f"{v}encoder.layers.0.mlp.fc1.weight"].shape[0], hidden_act=act,
                  num_hidden_layers=sum(k.startswith(v) and k.endswith(".layer_norm1.weight") for k in weights),
                  num_attention_heads=width // vcfg.get("head_width", VISION_HEAD_WIDTH.get(width, 64)))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=text.pop("projection_dim"))


def _tokenizer(path: Path):
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    here = path.parent
    if all((here / f).exists() for f in TOKENIZER_FILES[0]):
        return CLIPTokenizer.from_pretrained(str(here))
    if (here / TOKENIZER_FILES[1][0]).exists():
        return CLIPTokenizerFast.from_pretrained(str(here))
    raise FileNotFoundError(
        f"--clip-model {path}: an OpenCLIP checkpoint needs its tokenizer beside it ({here}/vocab.json and "
        f"merges.txt, or tokenizer.json). OpenCLIP's ViT models use OpenAI's CLIP BPE: copy those files from the "
        f"model's Hugging Face repository (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for MLPerf's) or any "
        f"openai/clip-vit-* one")


def load_openclip(path: str):
    """(CLIPModel, CLIPProcessor) for an OpenCLIP checkpoint file, nothing downloaded."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor
    path = Path(path)
    tokenizer = _tokenizer(path)
    side = path.parent / "open_clip_config.json"
    meta = json.loads(side.read_text()) if side.exists() else {}
    weights = to_transformers(load_state(path))
    config = clip_config(weights, meta.get("model_cfg", {}), tokenizer.eos_token_id)
    # built around the mapped weights (no random initialisation of a model the file then overwrites), strictly
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"{path}: the mapped weights do not fit CLIPModel (missing {sorted(info['missing_keys'])}, "
                         f"unexpected {sorted(info['unexpected_keys'])})")
    pre, size = meta.get("preprocess_cfg", {}), config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(pre.get("mean", OPENAI_MEAN)),
                                image_std=list(pre.get("std", OPENAI_STD)))
    return model.eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)
