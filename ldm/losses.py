"""The stage-1 objective (paper §3.1 and App. G, eq. 25): reconstruction + perceptual + patch-based
adversarial term with the adaptive weight of Esser et al. (taming), plus the KL or codebook regulariser.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import FirstStageLossConfig


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al.): a map of real/fake logits over overlapping patches."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta) on the decoder's last layer."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def build_perceptual(cfg: FirstStageLossConfig) -> nn.Module | None:
    if cfg.perceptual_weight <= 0:
        return None
    if cfg.perceptual_net == "lpips":
        from ldm.features import LPIPS
        return LPIPS(cfg.lpips_vgg_path, cfg.lpips_lin_path)
    if cfg.perceptual_net == "effnet-lite0":
        from ldm.features import EffNetPerceptual
        return EffNetPerceptual()
    raise ValueError(f"loss.perceptual_net must be 'effnet-lite0' or 'lpips', got {cfg.perceptual_net!r}")


class FirstStageLoss(nn.Module):
    """Generator and discriminator losses for AutoencoderKL (reg="kl") and VQModel (reg="vq")."""

    def __init__(self, cfg: FirstStageLossConfig, reg: str, in_channels: int = 3):
        super().__init__()
        self.cfg, self.reg = cfg, reg
        self.perceptual = build_perceptual(cfg)
        self.discriminator = NLayerDiscriminator(in_channels, cfg.disc_ndf, cfg.disc_num_layers)
        self.logvar = nn.Parameter(torch.full((), cfg.logvar_init))  # learned output variance (KL model)
        self.d_loss_fn = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}[cfg.disc_loss]

    def disc_factor(self, step: int) -> float:
        return self.cfg.disc_factor if step >= self.cfg.disc_start else 0.0

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        rec = (x - xrec).abs() if self.cfg.rec_loss == "l1" else (x - xrec) ** 2
        if self.perceptual is not None:
            rec = rec + self.cfg.perceptual_weight * self.perceptual(x, xrec)[:, None, None, None]
        return rec  # per pixel

    def generator_loss(self, x, xrec, step: int, last_layer: torch.Tensor | None, *, posterior=None,
                       codebook_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        rec = self.reconstruction(x, xrec)
        if self.reg == "kl":
            nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / x.shape[0]
            reg_term = self.cfg.kl_weight * posterior.kl().mean()
        else:
            nll = rec.mean()
            reg_term = self.cfg.codebook_weight * codebook_loss.mean()
        factor = self.disc_factor(step)
        g_loss = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        if factor > 0:
            g_loss = -self.discriminator(xrec).mean()
            if self.training and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.cfg.disc_weight)
            else:
                d_weight = torch.tensor(self.cfg.disc_weight, device=x.device)
        loss = nll + reg_term + d_weight * factor * g_loss
        logs = {"rec_loss": (x - xrec).abs().mean().detach(), "nll_loss": nll.detach(), "reg_loss": reg_term.detach(),
                "g_loss": g_loss.detach(), "d_weight": d_weight.detach(), "logvar": self.logvar.detach()}
        return loss, logs

    def discriminator_loss(self, x, xrec, step: int) -> tuple[torch.Tensor, dict]:
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(xrec.detach())
        d_loss = self.disc_factor(step) * self.d_loss_fn(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                        "logits_fake": logits_fake.mean().detach()}
