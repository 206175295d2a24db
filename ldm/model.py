"""The trainable part of an LDM (paper §3.3): eps_theta and, where the conditioning kind brings one, tau_theta
(the paper's text transformer, the layout transformer), optimised jointly (eq. 3's L_LDM). The frozen first stage and
frozen text encoders stay outside."""
from __future__ import annotations

import torch
from torch import nn

from ldm.config import LDMConfig
from ldm.kinds import kind_of
from ldm.unet import UNetModel


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        self.cond_stage = kind_of(cfg.conditioning.kind).cond_stage(cfg)

    def forward(self, zt: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                y: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                micro: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is not None:  # tau_theta(y) trained with the UNet: its tokens -> the context it cross-attends to
            context, mask = self.cond_stage.context(tokens, mask)
        return self.unet(zt, t, context=context, mask=mask, y=y, concat=concat, micro=micro)
