"""diffusers' UNet2DConditionModel built to match one of our UNets, holding the same weights (converted by
diffusers' own CompVis converter), so that the two are timed on identical work; and our UNet moved off its zero init,
so that two runs of it can be compared."""
from __future__ import annotations


def seeded_unet(unet_cfg, seed: int = 0):
    """Our UNet of `unet_cfg`, every weight nudged by 0.01 noise: off the zero init of the output convs, whose
    outputs would otherwise be zero and compare as equal whatever the computation."""
    import torch

    from ldm.unet import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(unet_cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def diffusers_twin(unet, sample_size: int, context_dim: int):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    u = unet.cfg
    types = ["CrossAttnDownBlock2D" if 2 ** i in u.attention_resolutions else "DownBlock2D"
             for i in range(len(u.channel_mult))]
    dcfg = dict(sample_size=sample_size, in_channels=u.in_channels, out_channels=u.out_channels,
                block_out_channels=[u.model_channels * k for k in u.channel_mult], layers_per_block=u.num_res_blocks,
                down_block_types=types, up_block_types=[t.replace("Down", "Up") for t in reversed(types)],
                cross_attention_dim=context_dim, attention_head_dim=u.num_heads, norm_num_groups=u.norm_groups)
    theirs = diffusers.UNet2DConditionModel(**dcfg)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, dcfg), strict=True)
    return theirs
