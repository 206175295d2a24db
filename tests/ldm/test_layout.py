"""Layout-to-image conditioning (paper §4.3.1): boxes -> grid tokens -> a transformer the UNet cross-attends to."""
import torch

from ldm.layout import LayoutEncoder, layout_tokens


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
