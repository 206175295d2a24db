import pytest
import torch

from images import real_images
from ldm.autoencoder import build_autoencoder
from ldm.config import FirstStageLossConfig, get_preset
from ldm.losses import FirstStageLoss, NLayerDiscriminator, adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm.metrics import psnr


def test_discriminator_patch_map_and_d_losses():
    d = NLayerDiscriminator(3, ndf=16, n_layers=2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[2] > 1  # a map of patches
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake) == 0  # both beyond the margin
    assert torch.isclose(hinge_d_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(1.0))
    assert torch.isclose(vanilla_d_loss(torch.zeros(4), torch.zeros(4)), torch.log(torch.tensor(2.0)))


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(5, requires_grad=True)
    nll, g = (3 * w).sum(), (0.5 * w).sum()
    lam = adaptive_weight(nll, g, w, disc_weight=1.0)
    assert torch.isclose(lam, torch.tensor(6.0), rtol=1e-3)


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_stage1_overfits_8_real_images(reg):
    """The full stage-1 objective (rec + real EffNet perceptual + PatchGAN from step 60 + KL/codebook)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    ae_cfg = cfg.autoencoder.__class__(**{**cfg.autoencoder.__dict__, "reg": reg})
    model = build_autoencoder(ae_cfg)
    loss_fn = FirstStageLoss(FirstStageLossConfig(disc_start=60, disc_ndf=16, disc_num_layers=2,
                                                  perceptual_weight=0.1), reg)
    x = real_images(8, 16)
    opt = torch.optim.Adam(list(model.parameters()) + [loss_fn.logvar], lr=2e-3)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-3)

    def run(step):
        if reg == "kl":
            xrec, post = model(x)
            kw = {"posterior": post}
        else:
            xrec, qloss, info = model(x)
            kw = {"codebook_loss": qloss}
        return xrec, kw

    with torch.no_grad():
        psnr0 = psnr(run(0)[0], x).mean()
    first = None
    for step in range(120):
        xrec, kw = run(step)
        loss, logs = loss_fn.generator_loss(x, xrec, step, model.decoder.last_layer, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_loss, dlogs = loss_fn.discriminator_loss(x, xrec, step)
        if step >= 60:
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
        first = logs["rec_loss"] if first is None else first
    assert step >= loss_fn.cfg.disc_start and logs["d_weight"] > 0 and torch.isfinite(logs["g_loss"])
    assert logs["rec_loss"] < 0.6 * first
    with torch.no_grad():
        psnr1 = psnr(run(0)[0], x).mean()
    assert psnr1 > psnr0 + 3, (psnr0, psnr1)
    if reg == "kl":
        assert logs["reg_loss"] > 0
