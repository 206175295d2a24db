"""Layout-to-image (ldm/kinds/layout.py): its condition, its null and its config checks."""
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConfigError, apply_overrides
from ldm.model import LatentDiffusion
from pipeline.presets import get_preset


def test_conditioner_drops_a_layout_to_no_boxes_and_refuses_bad_prompts():
    net = LatentDiffusion(get_preset("demo-layout"))
    cond = Conditioner.build(net)
    rows = torch.tensor([[3, 0, 0, 28, 28] + [-1] * 15] * 2, dtype=torch.int16)
    out = cond.batch({"layout": rows, "latent_mean": torch.zeros(2, 4 * 16 * 16)}, torch.tensor([False, True]))
    assert out["tokens"][0, 0].tolist() == [3, 0, 0, 13, 13]  # 64x64 canvas = the 16x16 latent x f=4, grid 32
    c, u = cond.prompts([{"size": [64, 64], "boxes": [[3, 0, 0, 28, 28]]}])
    assert torch.equal(c["tokens"], out["tokens"][:1]) and torch.equal(u["tokens"], out["tokens"][1:])
    assert (u["tokens"][..., 0] == 10).all()  # the null: padding only
    # hybrid: the box drawn on its class's channel at the 16x16 latent (7x7 cells), nothing for the null
    assert torch.equal(c["concat"], out["concat"][:1]) and c["concat"].shape == (1, 10, 16, 16)
    assert float(c["concat"][0, 3].sum()) == 49 and float(c["concat"].sum()) == 49 and not out["concat"][1].any()
    with pytest.raises(ValueError, match="at most 4"):
        cond.prompts([{"size": [64, 64], "boxes": [[1, 0, 0, 8, 8]] * 5}])
    with pytest.raises(ValueError, match="class in 0..9"):
        cond.prompts([{"size": [64, 64], "boxes": [[10, 0, 0, 8, 8]]}])
    with pytest.raises(ValueError, match='"size"'):
        cond.prompts([[[1, 0, 0, 8, 8]]])
    x = torch.randn(1, 4, 16, 16)
    assert net(x, torch.tensor([10]), **c).shape == x.shape


def test_layout_config_names_each_contradiction():
    lay = get_preset("demo-layout")
    assert lay.validate() and lay.unet.context_dim == lay.conditioning.n_embed and lay.unet.in_channels == 14
    with pytest.raises(ConfigError, match="set conditioning.concat_channels=0"):
        apply_overrides(lay, ["conditioning.layout_concat=false"]).validate()
    assert apply_overrides(lay, ["conditioning.layout_concat=false", "conditioning.concat_channels=0",
                                 "unet.in_channels=4"]).validate()  # the paper's: cross-attention alone
    with pytest.raises(ConfigError, match="set unet.context_dim=conditioning.n_embed=128"):
        apply_overrides(lay, ["unet.context_dim=64"]).validate()
    with pytest.raises(ConfigError, match="needs conditioning.num_classes=N"):
        apply_overrides(lay, ["conditioning.num_classes=0"]).validate()
    with pytest.raises(ConfigError, match="set unet.num_classes=null"):
        apply_overrides(lay, ["unet.num_classes=3"]).validate()
