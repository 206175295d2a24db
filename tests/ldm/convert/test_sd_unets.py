"""The Stable Diffusion architectures against diffusers' UNet2DConditionModel (the external truth): each preset's
UNet has exactly the parameter count of diffusers' model from the published config (both counted on the meta device,
no memory), converts both ways, and gives the same forward output: at full width for sd15 and sd21 (small latent,
batch 1), and at SDXL's structure with reduced width."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers import perturb_  # noqa: E402
from ldm.convert.diffusers import (unet_config_from_diffusers, unet_config_to_diffusers, unet_from_diffusers,  # noqa: E402
                                   unet_to_diffusers)
from ldm.config import get_preset  # noqa: E402
from ldm.kinds.text_pooled import size_features  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402

COMMON = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
          "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
          "norm_num_groups": 32, "out_channels": 4}
SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# the published unet/config.json of each (the fields that shape the network)
PUBLISHED = {
    "sd15": {**COMMON, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "cross_attention_dim": 768, "down_block_types": SD_DOWN, "up_block_types": SD_UP, "sample_size": 64},
    "sd21": {**COMMON, "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
             "cross_attention_dim": 1024, "down_block_types": SD_DOWN, "up_block_types": SD_UP, "sample_size": 96,
             "use_linear_projection": True, "upcast_attention": True},
    "sdxl-base": {**COMMON, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                  "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                  "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True},
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_has_diffusers_parameter_count_and_config(preset):
    cfg = get_preset(preset).validate().unet
    with torch.device("meta"):
        ours, theirs = UNetModel(cfg), diffusers.UNet2DConditionModel(**PUBLISHED[preset])
    assert count(ours) == count(theirs) > 8e8
    assert unet_config_from_diffusers(PUBLISHED[preset])[0] == cfg  # the published config reads as the preset
    mine = unet_config_to_diffusers(cfg, PUBLISHED[preset]["sample_size"])
    with torch.device("meta"):
        assert count(diffusers.UNet2DConditionModel(**mine)) == count(ours)


def run_both(dcfg: dict, latent: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' UNet of `dcfg` with random weights, converted into ours; both run on one input: (ours, theirs)."""
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DConditionModel(**dcfg).eval()
    perturb_(theirs, 0.02)
    cfg, extra = unet_config_from_diffusers(dcfg)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), cfg), strict=True)
    del theirs
    again = diffusers.UNet2DConditionModel(**dcfg).eval()  # the way back: ours -> diffusers names, strictly
    again.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, dcfg["cross_attention_dim"], generator=g)
    t = torch.tensor([511])
    kw, y = {}, None
    if cfg.adm_in_channels:
        pooled = torch.randn(1, cfg.adm_in_channels - 6 * extra["micro_dim"], generator=g)
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]])
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        y = torch.cat([pooled, size_features(ids, extra["micro_dim"])], 1)
    with torch.no_grad():
        return ours(x, t, context=ctx, y=y), again(x, t, encoder_hidden_states=ctx, **kw).sample


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_width_forward_matches_diffusers(preset):
    ours, theirs = run_both(PUBLISHED[preset], latent=8)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_sdxl_structure_at_reduced_width_matches_diffusers():
    small = {**PUBLISHED["sdxl-base"], "block_out_channels": [64, 128, 256], "attention_head_dim": [1, 2, 4]}
    cfg = unet_config_from_diffusers(small)[0]
    assert cfg.depths() == (1, 2, 10) and cfg.attention_resolutions == (4, 2)
    assert cfg.num_head_channels == 64 and cfg.adm_in_channels == 2816
    ours, theirs = run_both(small, latent=8)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4
