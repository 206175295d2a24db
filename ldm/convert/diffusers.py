"""diffusers' names and configs for our UNet and first stage, both ways (no diffusers import: the product reads and
writes its folders by itself; the tests check the result against diffusers' own classes).

Our modules keep CompVis' names (`input_blocks.N.M`, `encoder.down.N.block.M`), so a map from each of our keys to
diffusers' is all a conversion needs: it is built from our model's own keys (on the meta device, no memory), so the
two directions cannot drift apart.
"""
from __future__ import annotations

import re

import torch

from ldm.config import AutoencoderConfig, UNetConfig

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
        "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "label_emb": "class_embedding", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def has_attention(cfg: UNetConfig, level: int) -> bool:
    """Whether the UNet has transformer blocks at `level` (0 = full resolution)."""
    return 2 ** level in cfg.attention_resolutions and cfg.depths()[level] > 0


def _unet_key(k: str, cfg: UNetConfig) -> str:
    """One of our UNet's keys in diffusers' UNet2DConditionModel."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    m = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.*)", k)
    if m is None:
        base, leaf = k.rsplit(".", 1)
        if base not in _TOP:
            raise ValueError(f"the UNet weight {k!r} has no counterpart in diffusers' UNet2DConditionModel")
        return f"{_TOP[base]}.{leaf}"
    part, a, b, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if part == "middle_block":  # middle_block.0 / .2 are ResBlocks, .1 the transformer
        tail = k.split(".", 2)[2]
        return f"mid_block.attentions.0.{tail}" if a == 1 else f"mid_block.resnets.{a // 2}.{_rename(tail, _RES)}"
    sub = int(b)
    if part == "input_blocks":
        if a == 0:
            return f"conv_in.{rest}"
        level, pos = divmod(a - 1, n + 1)
        if pos == n:
            return f"down_blocks.{level}.downsamplers.0.{rest.replace('op', 'conv', 1)}"
        return (f"down_blocks.{level}.resnets.{pos}.{_rename(rest, _RES)}" if sub == 0
                else f"down_blocks.{level}.attentions.{pos}.{rest}")
    i, j = divmod(a, n + 1)
    attn = has_attention(cfg, levels - 1 - i)
    if sub == 0:
        return f"up_blocks.{i}.resnets.{j}.{_rename(rest, _RES)}"
    if sub == 1 and attn:
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    return f"up_blocks.{i}.upsamplers.0.{rest}"


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """{our key: diffusers' key} for every parameter of a UNet of `cfg`."""
    from ldm.unet import UNetModel
    with torch.device("meta"):
        keys = list(UNetModel(cfg).state_dict())
    return {k: _unet_key(k, cfg) for k in keys}


def _vae_key(k: str, levels: int) -> str:
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(?:(\d+)\.)?(.*)", k)
    if m:
        side, _, i, sub, j, rest = m.groups()
        i = int(i) if side == "encoder" else levels - 1 - int(i)
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if sub == "block":
            return f"{side}.{blocks}.{i}.resnets.{j}.{_rename(rest, _VAE_RES)}"
        if sub == "attn":
            return f"{side}.{blocks}.{i}.attentions.{j}.{_rename(rest, _VAE_ATTN)}"
        return f"{side}.{blocks}.{i}.{sub}rs.0.{rest}"  # downsamplers / upsamplers
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", k)
    if m:
        side, sub, rest = m.groups()
        if sub == "attn_1":
            return f"{side}.mid_block.attentions.0.{_rename(rest, _VAE_ATTN)}"
        return f"{side}.mid_block.resnets.{int(sub[-1]) - 1}.{_rename(rest, _VAE_RES)}"
    return k.replace("norm_out", "conv_norm_out")


def vae_key_map(cfg: AutoencoderConfig) -> dict[str, str]:
    """{our key: diffusers' key} for every parameter of a KL autoencoder of `cfg` (diffusers' AutoencoderKL)."""
    from ldm.autoencoder import AutoencoderKL
    with torch.device("meta"):
        keys = list(AutoencoderKL(cfg).state_dict())
    return {k: _vae_key(k, len(cfg.ch_mult)) for k in keys}


def _convert(sd: dict, key_map: dict[str, str], what: str) -> dict:
    missing = sorted(set(key_map) - set(sd))
    unknown = sorted(set(sd) - set(key_map))
    if missing or unknown:
        raise KeyError(f"{what}: {len(missing)} key(s) missing (e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. "
                       f"{unknown[:3]}): the weights do not fit this config")
    return {key_map[k]: v for k, v in sd.items()}


def _attn_1x1(sd: dict, to_linear: bool) -> dict:
    """The first stage's mid attention: 1x1 convolutions in ours (CompVis), linear layers in diffusers."""
    if to_linear:
        return {k: v[:, :, 0, 0] if ".mid_block.attentions." in k and v.ndim == 4 else v for k, v in sd.items()}
    return {k: v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in sd.items()}


def unet_to_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    return _convert(sd, unet_key_map(cfg), "UNet")


def unet_from_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    return _convert(sd, {v: k for k, v in unet_key_map(cfg).items()}, "diffusers UNet")


def vae_to_diffusers(sd: dict, cfg: AutoencoderConfig) -> dict:
    return _attn_1x1(_convert(sd, vae_key_map(cfg), "autoencoder"), to_linear=True)


def vae_from_diffusers(sd: dict, cfg: AutoencoderConfig) -> dict:
    return _attn_1x1(_convert(sd, {v: k for k, v in vae_key_map(cfg).items()}, "diffusers VAE"), to_linear=False)


# ---------------------------------------------------------------------------------------------- configs


def _per_level(v, levels: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * levels


def unet_config_from_diffusers(d: dict) -> tuple[UNetConfig, dict]:
    """(our UNetConfig, what the UNet's config says of the conditioning: micro_dim) of a UNet2DConditionModel's
    config.json (SD 1.x / 2.x / XL)."""
    boc = list(d["block_out_channels"])
    mc, levels = boc[0], len(boc)
    attn = [t.startswith("CrossAttn") for t in d["down_block_types"]]
    heads = _per_level(d.get("num_attention_heads") or d["attention_head_dim"], levels)  # diffusers' legacy name
    used = [(c, h) for c, h, a in zip(boc, heads, attn) if a] + [(boc[-1], heads[-1])]  # the middle: the last's
    widths, counts = {c // h for c, h in used}, {h for _, h in used}
    depth = _per_level(d.get("transformer_layers_per_block", 1), levels)
    head_kw = ({"num_head_channels": widths.pop()} if len(widths) == 1 else
               {"num_heads": counts.pop()} if len(counts) == 1 else None)
    if head_kw is None:
        raise ValueError(f"a UNet whose levels have {heads} heads of widths {sorted(widths)}: neither one head count "
                         f"nor one head width, which our UNetConfig cannot express")
    adm = d.get("projection_class_embeddings_input_dim") or 0 if d.get("addition_embed_type") == "text_time" else 0
    depths = tuple(depth)  # a level without attention keeps its number, as SGM's configs write it
    cfg = UNetConfig(in_channels=d["in_channels"], out_channels=d["out_channels"], model_channels=mc,
                     channel_mult=tuple(c // mc for c in boc), num_res_blocks=d["layers_per_block"],
                     attention_resolutions=tuple(2 ** i for i, a in reversed(list(enumerate(attn))) if a), **head_kw,
                     transformer_depth=depths[:1] if len(set(depths)) == 1 else depths,
                     use_linear_projection=bool(d.get("use_linear_projection")),
                     upcast_attention=bool(d.get("upcast_attention")), context_dim=d.get("cross_attention_dim"),
                     num_classes=d.get("num_class_embeds"), adm_in_channels=adm,
                     norm_groups=d.get("norm_num_groups", 32))
    return cfg, {"micro_dim": d.get("addition_time_embed_dim") or 256}


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int, micro_dim: int = 256) -> dict:
    """A UNet2DConditionModel config.json for our UNetConfig."""
    levels = len(cfg.channel_mult)
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [has_attention(cfg, i) for i in range(levels)]
    heads = [c // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads for c in boc]
    depths = cfg.depths()
    middle = cfg.transformer_depth_middle if cfg.transformer_depth_middle > 0 else depths[-1]
    if middle != depths[-1]:
        raise ValueError("diffusers' mid block takes the last level's transformer depth")
    out = {"_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": cfg.in_channels,
           "out_channels": cfg.out_channels, "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks,
           "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
           "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
           "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": heads,
           "transformer_layers_per_block": list(depths), "cross_attention_dim": cfg.context_dim,
           "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
           "norm_num_groups": cfg.norm_groups, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True,
           "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1}
    if cfg.num_classes:
        out["num_class_embeds"] = cfg.num_classes
    if cfg.adm_in_channels:
        out.update(addition_embed_type="text_time", addition_time_embed_dim=micro_dim,
                   projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return out


def vae_config_from_diffusers(d: dict) -> AutoencoderConfig:
    boc = list(d["block_out_channels"])
    return AutoencoderConfig(reg="kl", resolution=int(d.get("sample_size", 256)), in_channels=d["in_channels"],
                             out_ch=d["out_channels"], ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
                             num_res_blocks=d["layers_per_block"], attn_resolutions=(),
                             z_channels=d["latent_channels"], embed_dim=d["latent_channels"],
                             norm_groups=d.get("norm_num_groups", 32))


def vae_config_to_diffusers(cfg: AutoencoderConfig, scaling_factor: float) -> dict:
    if cfg.reg != "kl" or cfg.z_channels != cfg.embed_dim or cfg.attn_resolutions:
        raise ValueError("diffusers' AutoencoderKL is a KL first stage with z_channels = embed_dim and attention in "
                         "the middle block only")
    boc = [cfg.ch * m for m in cfg.ch_mult]
    n = len(boc)
    return {"_class_name": "AutoencoderKL", "sample_size": cfg.resolution, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_ch, "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "latent_channels": cfg.embed_dim, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
            "scaling_factor": scaling_factor}
