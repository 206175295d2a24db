import pytest
import torch

from ldm.autoencoder import AutoencoderKL, DiagonalGaussian, VQModel, build_autoencoder, encode_latent
from ldm.checkpoint import load_first_stage_state_dict, split_compvis_state_dict
from ldm.config import AutoencoderConfig, get_preset


@pytest.mark.parametrize("ch_mult", [(1,), (1, 2), (1, 2, 2), (1, 1, 2, 2), (1, 1, 1, 2, 2)])
@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_any_f_shapes_and_backward(ch_mult, reg):
    cfg = AutoencoderConfig(reg=reg, resolution=32, ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=3,
                            embed_dim=3, n_embed=16, attn_resolutions=(16,))
    model = build_autoencoder(cfg)
    f = cfg.downsample_factor
    assert f == 2 ** (len(ch_mult) - 1)
    x = torch.randn(2, 3, 32, 32)
    if reg == "kl":
        xrec, post = model(x)
        assert post.mean.shape == (2, 3, 32 // f, 32 // f) == post.std.shape
        loss = (xrec - x).abs().mean() + post.kl().mean()
    else:
        xrec, qloss, info = model(x)
        assert info["indices"].shape == (2, 32 // f, 32 // f)
        loss = (xrec - x).abs().mean() + qloss
    assert xrec.shape == x.shape
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    mean, std = encode_latent(model, x)
    assert mean.shape == (2, *cfg.latent_shape[:1], 32 // f, 32 // f)


def test_diagonal_gaussian_kl_closed_form():
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    expect = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), expect, atol=1e-5)
    zero = DiagonalGaussian(torch.zeros(1, 4, 2, 2))
    assert zero.kl().abs().max() < 1e-6  # N(0, I) against N(0, I)
    rebuilt = DiagonalGaussian(mean=post.mean, std=post.std)
    assert torch.allclose(rebuilt.kl(), post.kl(), atol=1e-4)


def test_vq_straight_through_and_codebook():
    vq = VQModel(AutoencoderConfig(reg="vq", resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=8))
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    zq, loss, info = vq.quantize(z)
    codes = vq.quantize.embedding.weight
    assert torch.allclose(zq, codes[info["indices"]].permute(0, 3, 1, 2), atol=1e-6)  # nearest code
    zq.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through
    assert 1.0 <= info["perplexity"] <= 8.0


# Names and shapes of the real CompVis kl-f8 first stage (models/first_stage_models/kl-f8/model.ckpt)
COMPVIS_KL_F8_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.mid.block_2.norm2.weight": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv1.weight": (128, 128, 3, 3),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
}


def test_compvis_kl_f8_layout_loads_strictly(tmp_path):
    cfg = get_preset("ldm-kl-8").autoencoder
    ours = AutoencoderKL(cfg)
    sd = ours.state_dict()
    for k, shape in COMPVIS_KL_F8_KEYS.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    # a full CompVis LDM .ckpt: first_stage_model.* + loss.* (LPIPS/discriminator) + unet keys
    ckpt = {"state_dict": {**{f"first_stage_model.{k}": torch.randn_like(v) for k, v in sd.items()},
                           "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
                           "model.diffusion_model.out.2.bias": torch.zeros(4)}, "global_step": 10}
    torch.save(ckpt, tmp_path / "model.ckpt")
    loaded = load_first_stage_state_dict(str(tmp_path / "model.ckpt"))
    fresh = AutoencoderKL(cfg)
    assert not fresh.load_state_dict(loaded, strict=True).missing_keys
    assert torch.equal(fresh.quant_conv.weight, ckpt["state_dict"]["first_stage_model.quant_conv.weight"])
    # a bare first-stage checkpoint (keys without prefix, with loss.*) too
    bare = {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k: v
            for k, v in ckpt["state_dict"].items() if not k.startswith("model.")}
    parts = split_compvis_state_dict(bare)
    assert set(parts) == {"autoencoder", "loss"}
    AutoencoderKL(cfg).load_state_dict(parts["autoencoder"], strict=True)
