"""CLIP text encoders between OpenCLIP's names (SD 2.x's and SDXL's single-file checkpoints) and Hugging Face's
CLIPTextModel / CLIPTextModelWithProjection (diffusers folders), both ways, and a CLIPTextConfig read off the
weights' shapes.

SD 2.x conditions on OpenCLIP ViT-H's penultimate layer, then its final norm: diffusers keeps a 23-layer model of the
24 and takes its last hidden states; the way back writes the 24th layer as an identity block (its attention and MLP
outputs zero), so the penultimate layer of the file is the diffusers model's last.
"""
from __future__ import annotations

import re

import torch

HF = "text_model."
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
         "attn.out_proj": "self_attn.out_proj"}  # a transformer block's parts: OpenCLIP's name, Hugging Face's


def config_from_hf(sd: dict[str, torch.Tensor], act: str, head_dim: int = 64) -> dict:
    """A CLIPTextConfig (as a dict) for Hugging Face CLIP text weights; the head count is not in the weights: heads
    of `head_dim` channels, as every Stable Diffusion text encoder has."""
    vocab, hidden = sd[f"{HF}embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{HF}encoder\.layers\.(\d+)\.", k)))
    cfg = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
           "intermediate_size": sd[f"{HF}encoder.layers.0.mlp.fc1.weight"].shape[0],
           "num_attention_heads": max(1, hidden // head_dim), "hidden_act": act,
           "max_position_embeddings": sd[f"{HF}embeddings.position_embedding.weight"].shape[0]}
    if "text_projection.weight" in sd:
        cfg["projection_dim"] = sd["text_projection.weight"].shape[0]
    return cfg


def openclip_to_hf(sd: dict[str, torch.Tensor], layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP text weights (token_embedding, positional_embedding, transformer.resblocks.N, ln_final,
    text_projection) -> CLIPTextModel(WithProjection) names; only the first `layers` blocks (SD 2.x: all but the
    last)."""
    out = {f"{HF}embeddings.token_embedding.weight": sd["token_embedding.weight"],
           f"{HF}embeddings.position_embedding.weight": sd["positional_embedding"],
           f"{HF}final_layer_norm.weight": sd["ln_final.weight"], f"{HF}final_layer_norm.bias": sd["ln_final.bias"]}
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    return out | blocks_to_hf(sd, "transformer.resblocks.", f"{HF}encoder.layers.", layers)


def blocks_to_hf(sd: dict[str, torch.Tensor], src: str, dst: str, layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP's residual attention blocks `{src}N.*` -> Hugging Face's CLIP encoder layers `{dst}N.*` (the first
    `layers` of them), for a text or a vision tower."""
    out = {}
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(src) + r"(\d+)\.", k)))
    for i in range(n if layers is None else layers):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[f"{a}attn.in_proj_{part}"].chunk(3)  # one fused projection -> three
            out.update({f"{b}self_attn.q_proj.{part}": q, f"{b}self_attn.k_proj.{part}": k,
                        f"{b}self_attn.v_proj.{part}": v})
            out.update({f"{b}{h}.{part}": sd[f"{a}{o}.{part}"] for o, h in BLOCK.items()})
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor], identity_layer: bool = False) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) names -> OpenCLIP's; `identity_layer` appends a block whose attention and MLP
    outputs are zero (SD 2.x: the penultimate layer of the file is the model's last)."""
    out = {"token_embedding.weight": sd[f"{HF}embeddings.token_embedding.weight"],
           "positional_embedding": sd[f"{HF}embeddings.position_embedding.weight"],
           "ln_final.weight": sd[f"{HF}final_layer_norm.weight"], "ln_final.bias": sd[f"{HF}final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{HF}encoder\.layers\.(\d+)\.", k)))
    for i in range(n):
        a, b = f"transformer.resblocks.{i}.", f"{HF}encoder.layers.{i}."
        for part in ("weight", "bias"):
            out[f"{a}attn.in_proj_{part}"] = torch.cat([sd[f"{b}self_attn.{x}_proj.{part}"] for x in "qkv"])
            out.update({f"{a}{o}.{part}": sd[f"{b}{h}.{part}"] for o, h in BLOCK.items()})
    if identity_layer:  # the last block again, with zero outputs: x + 0 + 0
        last = f"transformer.resblocks.{n - 1}."
        for k in [k for k in out if k.startswith(last)]:
            v = out[k]
            zero = k.endswith(("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"))
            out[f"transformer.resblocks.{n}." + k[len(last):]] = torch.zeros_like(v) if zero else v.clone()
    return out
