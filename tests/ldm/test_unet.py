import torch

from ldm.config import UNetConfig, get_preset
from ldm.unet import UNetModel, timestep_embedding


def test_timestep_embedding_closed_form():
    e = timestep_embedding(torch.tensor([0, 5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.isclose(e[1, 0], torch.cos(torch.tensor(5.0))) and torch.isclose(e[1, 4], torch.sin(torch.tensor(5.0)))


def test_text_conditional_forward_backward_and_mask():
    cfg = get_preset("tiny").unet
    unet = UNetModel(cfg)
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 99])
    ctx = torch.randn(2, 6, 32)
    out = unet(x, t, context=ctx)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters())
    # padding tokens masked out: changing them does not change the output
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0
    with torch.no_grad():
        assert torch.allclose(unet(x, t, context=ctx, mask=mask), unet(x, t, context=ctx2, mask=mask), atol=1e-5)
        assert not torch.allclose(unet(x, t, context=ctx), unet(x, t, context=ctx2))


def test_class_conditional_concat_and_scale_shift():
    cfg = UNetConfig(in_channels=7, out_channels=4, model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=-1, num_head_channels=16, context_dim=None,
                     num_classes=11, use_scale_shift_norm=True)
    unet = UNetModel(cfg)
    for p in unet.parameters():  # off the zero-init so gradients reach every input
        p.data.add_(0.02 * torch.randn_like(p))
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), y=torch.tensor([0, 10]),
               concat=torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 4, 16, 16)
    out.sum().backward()
    assert unet.label_emb.weight.grad.abs().sum() > 0


def test_demo_unet_is_a_few_million_params():
    n = sum(p.numel() for p in UNetModel(get_preset("demo").unet).parameters())
    assert 1e6 < n < 2e7, n


def test_runs_in_its_weights_dtype_like_a_deepspeed_bf16_module():
    """DeepSpeed bf16 casts the module, not the inputs: fp32 latents and context must still go through."""
    torch.manual_seed(0)
    unet = UNetModel(get_preset("tiny").unet)
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 60]), torch.randn(2, 6, 32)
    with torch.no_grad():
        ref = unet(x, t, context=ctx)
        out = unet.to(torch.bfloat16)(x, t, context=ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05
