"""Layout-to-image conditioning (paper §4.3.1): boxes -> grid tokens -> a transformer the UNet cross-attends to."""
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConfigError, apply_overrides, get_preset
from ldm.layout import LayoutEncoder, layout_tokens
from ldm.model import LatentDiffusion


def test_tokens_put_corners_on_the_grid_and_padding_on_the_pad_class():
    boxes = torch.tensor([[[3, 0, 0, 28, 28], [7, 32, 36, 28, 28], [-1, -1, -1, -1, -1]]])
    tok = layout_tokens(boxes, 64, 64, grid=16, pad_class=10)
    # corners: (0, 0) and (27.99, 27.99) -> cells (0, 0) and (6, 6); (32, 36) and (59.99, 63.99) -> (8, 9), (14, 15)
    assert tok.tolist() == [[[3, 0, 0, 6, 6], [7, 8, 9, 14, 15], [10, 0, 0, 0, 0]]]
    # the same boxes on a canvas twice the size give the same tokens: places are relative to the canvas
    assert torch.equal(layout_tokens(boxes * torch.tensor([1, 2, 2, 2, 2]), 128, 128, 16, 10)[:, :2], tok[:, :2])


def test_encoder_is_a_set_function_and_always_has_its_start_token():
    torch.manual_seed(0)
    enc = LayoutEncoder(num_classes=10, grid=16, dim=32, depth=2, heads=2)
    tok = layout_tokens(torch.tensor([[[3, 0, 0, 28, 28], [7, 32, 36, 28, 28]]]), 64, 64, 16, 10)
    ctx, mask = enc(tok)
    ctx_swapped, _ = enc(tok.flip(1))
    assert ctx.shape == (1, 3, 32) and mask.tolist() == [[1, 1, 1]]
    assert torch.allclose(ctx[:, 0], ctx_swapped[:, 0], atol=1e-5)  # box order does not matter
    assert torch.allclose(ctx[:, 1:], ctx_swapped[:, 1:].flip(1), atol=1e-5)
    empty = torch.tensor([[[10, 0, 0, 0, 0]] * 2])
    ctx0, mask0 = enc(empty)
    assert mask0.tolist() == [[1, 0, 0]] and torch.isfinite(ctx0).all()  # the null layout: only the start token
    moved = layout_tokens(torch.tensor([[[3, 16, 16, 28, 28], [7, 32, 36, 28, 28]]]), 64, 64, 16, 10)
    assert not torch.allclose(enc(moved)[0], ctx)  # a box's place is in its token


def test_encoder_runs_in_its_weights_dtype_like_a_deepspeed_bf16_module():
    """DeepSpeed bf16 casts the module, not its inputs: the fp32 corner features must follow the weights' dtype
    (`--precision bf16` on the layout task crashed at step 1: 'mat1 and mat2 must have the same dtype')."""
    torch.manual_seed(0)
    enc = LayoutEncoder(num_classes=10, grid=16, dim=32, depth=2, heads=2)
    tok = layout_tokens(torch.tensor([[[3, 0, 0, 28, 28], [7, 32, 36, 28, 28]]]), 64, 64, 16, 10)
    with torch.no_grad():
        ref, _ = enc(tok)
        out, _ = enc.to(torch.bfloat16)(tok)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


def test_conditioner_drops_a_layout_to_no_boxes_and_refuses_bad_prompts():
    net = LatentDiffusion(get_preset("demo-layout"))
    cond = Conditioner.build(net)
    rows = torch.tensor([[3, 0, 0, 28, 28] + [-1] * 15] * 2, dtype=torch.int16)
    out = cond.batch({"layout": rows, "latent_mean": torch.zeros(2, 4 * 16 * 16)}, torch.tensor([False, True]))
    assert out["layout"][0, 0].tolist() == [3, 0, 0, 13, 13]  # 64x64 canvas = the 16x16 latent x f=4, grid 32
    c, u = cond.prompts([{"size": [64, 64], "boxes": [[3, 0, 0, 28, 28]]}])
    assert torch.equal(c["layout"], out["layout"][:1]) and torch.equal(u["layout"], out["layout"][1:])
    assert (u["layout"][..., 0] == 10).all()  # the null: padding only
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
