"""SDXL micro-conditioning (unet.micro_cond): original size, crop and target size enter the time embedding; the
Conditioner takes them from the cache's columns in training (zeros where the condition is dropped) and from the
caller in sampling."""
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import apply_overrides, get_preset
from ldm.model import LatentDiffusion
from ldm.sampling import generate


def model(*extra):
    cfg = apply_overrides(get_preset("tiny"), ["conditioning.kind=class", "conditioning.num_classes=3",
                                               "unet.num_classes=4", "unet.context_dim=null", "unet.micro_cond=true",
                                               "conditioning.cond_drop_prob=0.1", *extra])
    torch.manual_seed(0)
    return LatentDiffusion(cfg).eval()


def test_the_unet_output_depends_on_the_sizes_and_needs_them():
    net = model()
    z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 1])
    for p in net.parameters():  # the zero-initialised layers (each block's output, the UNet's) hide everything
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    a = net(z, t, y=y, micro=torch.tensor([[64., 64, 0, 0, 64, 64]] * 2))
    b = net(z, t, y=y, micro=torch.tensor([[16., 16, 0, 0, 64, 64]] * 2))
    c = net(z, t, y=y, micro=torch.tensor([[64., 64, 0, 0, 64, 64]] * 2))
    assert torch.equal(a, c) and (a - b).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="micro-conditioned: pass micro"):
        net(z, t, y=y)


def test_training_rows_carry_their_sizes_and_dropped_rows_zeros():
    net = model()
    cond = Conditioner.build(net)
    batch = {"label": torch.tensor([0, 1, 2]), "latent_mean": torch.zeros(3, 4 * 8 * 8),
             "orig_h": torch.tensor([300, 50, 64], dtype=torch.int32), "orig_w": torch.tensor([200, 80, 64]),
             "crop_top": torch.tensor([10, 0, 0]), "crop_left": torch.tensor([0, 7, 0])}
    out = cond.batch(batch, torch.tensor([False, False, True]))
    side = 8 * net.cfg.autoencoder.downsample_factor
    assert out["micro"].tolist() == [[300, 200, 10, 0, side, side], [50, 80, 0, 7, side, side], [0] * 6]
    assert out["y"].tolist() == [0, 1, 3]  # the class dropped with them


def test_sampling_sets_the_sizes_and_guides_against_the_null():
    net = model()
    cond = Conditioner.build(net)
    seen = []

    def spy(x, t, **kw):
        seen.append(kw["micro"].clone())
        return net(x, t, **kw)
    decode = lambda z: torch.zeros(z.shape[0], 3, z.shape[2] * 4, z.shape[3] * 4)  # noqa: E731
    from ldm.latent_scale import LatentScale
    generate(spy, cond, LatentScale(1.0, 0.0), decode, ["1", "2"], (4, 8, 16), torch.linspace(0.99, 0.01, 1000),
             steps=2, cfg_scale=3.0, orig_size=(20, 40), crop=(2, 3))
    f = net.cfg.autoencoder.downsample_factor
    assert seen[0].tolist() == [[0] * 6] * 2 + [[20, 40, 2, 3, 8 * f, 16 * f]] * 2  # uncond (zeros), then cond
