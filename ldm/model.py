"""The trainable part of an LDM (paper §3.3): eps_theta and, for the paper's text model, tau_theta,
optimised jointly (eq. 3's L_LDM). The frozen first stage and frozen text encoders stay outside."""
from __future__ import annotations

import torch
from torch import nn

from ldm.conditioning import TransformerTextEncoder
from ldm.config import LDMConfig
from ldm.layout import LayoutEncoder
from ldm.unet import UNetModel


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        c = cfg.conditioning
        self.cond_stage = None
        if c.kind == "text" and c.text_encoder == "transformer":
            self.cond_stage = TransformerTextEncoder(c.vocab_size, c.max_length, c.n_embed, c.n_layer, c.n_head,
                                                     c.text_encoder_path)
        if c.kind == "layout":  # §4.3.1: the boxes' transformer, trained with the UNet
            self.cond_stage = LayoutEncoder(c.num_classes, c.layout_grid, c.n_embed, c.n_layer, c.n_head)

    def forward(self, zt: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                y: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                layout: torch.Tensor | None = None, micro: torch.Tensor | None = None) -> torch.Tensor:
        if layout is not None:  # tau_theta(boxes), trained with the UNet
            context, mask = self.cond_stage(layout)
        elif self.cond_stage is not None:  # tau_theta(y) trained with the UNet
            context = self.cond_stage.encode(input_ids, mask)
        return self.unet(zt, t, context=context, mask=mask, y=y, concat=concat, micro=micro)
