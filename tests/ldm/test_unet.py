from dataclasses import replace

import pytest
import torch

from helpers import perturb_
from ldm.config import PRESETS, UNetConfig, get_preset
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


def _small(cfg: UNetConfig) -> UNetConfig:
    """A preset's UNet structure (levels, attention, depths, conditioning inputs) at a width that runs in a test."""
    return replace(cfg, model_channels=16, norm_groups=8, dropout=0.1,
                   num_head_channels=8 if cfg.num_head_channels > 0 else -1,
                   num_heads=2 if cfg.num_head_channels <= 0 else cfg.num_heads,
                   transformer_depth=tuple(min(d, 2) for d in cfg.transformer_depth),
                   transformer_depth_middle=min(cfg.transformer_depth_middle, 2),
                   context_dim=min(cfg.context_dim, 64) if cfg.context_dim else None,
                   adm_in_channels=min(cfg.adm_in_channels, 24))


def _inputs(cfg: UNetConfig, g: torch.Generator) -> dict:
    side = 2 ** (len(cfg.channel_mult) - 1) * 2
    kw = {"x": torch.randn(2, cfg.in_channels, side, side, generator=g), "t": torch.tensor([3, 700])}
    if cfg.context_dim:
        kw["context"] = torch.randn(2, 5, cfg.context_dim, generator=g)
    if cfg.num_classes:
        kw["y"] = torch.tensor([0, cfg.num_classes - 1])
    elif cfg.adm_in_channels:
        kw["y"] = torch.randn(2, cfg.adm_in_channels, generator=g)
    if cfg.micro_cond:
        kw["micro"] = torch.tensor([[64.0, 48, 0, 8, 64, 64], [32, 32, 4, 0, 64, 64]])
    return kw


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_activation_checkpointing_gives_the_plain_models_gradients(preset):
    cfg = _small(get_preset(preset).unet)
    torch.manual_seed(0)
    plain = perturb_(UNetModel(cfg).train())  # off the zero-init so every block's gradient is non-trivial
    ckpt = UNetModel(replace(cfg, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert sum(m.checkpointed for m in ckpt.modules() if hasattr(m, "checkpointed")) >= 2
    kw = _inputs(cfg, torch.Generator().manual_seed(1))
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(2)  # the same dropout masks: checkpointing replays the RNG in its recomputation
        net(**kw).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    for k, g in grads[0].items():
        assert torch.allclose(g, grads[1][k], atol=1e-5, rtol=1e-5), (preset, k)
    assert any(g.abs().sum() > 0 for g in grads[1].values())
