"""The time-conditional UNet eps_theta(z_t, t, tau(y)) of paper §3.2-3.3 (ADM backbone, Dhariwal & Nichol).

Names follow CompVis `openaimodel.UNetModel` (`input_blocks.N.M`, `middle_block`, `output_blocks`,
`time_embed`, `out`), so Stable-Diffusion-style `model.diffusion_model.*` weights load strictly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import BasicTransformerBlock, SpatialTransformer
from ldm.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the diffusion step t (Transformer positional encoding, cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):  # normalise in fp32 even under bf16/fp16 training (and with bf16 weights)
        w, b = self.weight, self.bias
        return F.group_norm(x.float(), self.num_groups, w.float() if w is not None else None,
                            b.float() if b is not None else None, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """ResNet block whose features are shifted (or scaled+shifted) by the timestep embedding."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, groups: int = 32):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels  # scale and shift, or a shift
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # zero-init the residual branch
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.checkpointed = False

    def forward(self, x, emb):
        if self.checkpointed and torch.is_grad_enabled():  # activations recomputed in backward, not kept
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, *_):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *_):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Routes the timestep embedding to ResBlocks and the context tau(y) to SpatialTransformers."""

    def forward(self, x, emb, context=None, mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


MICRO = 6  # micro-conditioning values: original (h, w), crop (top, left), target (h, w)


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        ted = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        if cfg.adm_in_channels:  # SDXL: the vector y (pooled text, size features) through an MLP (SGM's "sequential")
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(),
                                                         nn.Linear(ted, ted)))
        if cfg.micro_cond:  # SDXL §2.2: each size/crop value's Fourier features, an MLP, added to the time embedding
            self.micro_embed = nn.Sequential(nn.Linear(MICRO * mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def res(ch_in, ch_out):
            return ResBlock(ch_in, ted, ch_out, cfg.dropout, cfg.use_scale_shift_norm, g)

        def attn(ch, depth):
            heads, dim_head = ((ch // cfg.num_head_channels, cfg.num_head_channels) if cfg.num_head_channels > 0
                               else (cfg.num_heads, ch // cfg.num_heads))
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.dropout, cfg.context_dim, g,
                                      cfg.use_linear_projection, cfg.upcast_attention)

        depths = cfg.depths()
        middle = cfg.transformer_depth_middle if cfg.transformer_depth_middle > 0 else depths[-1]

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions and depths[level]:
                    layers.append(attn(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, middle), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions and depths[level]:
                    layers.append(attn(ch, depths[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, on: bool = True) -> "UNetModel":
        """Activation checkpointing: each residual and transformer block keeps only its inputs in forward and
        recomputes the rest in backward (the same gradients, for about one more forward pass)."""
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.checkpointed = on
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                concat: torch.Tensor | None = None, micro: torch.Tensor | None = None) -> torch.Tensor:
        """x: z_t (B,C,h,w); t: (B,) steps; context: tau(y) (B,L,d); y: class labels, or SDXL's vector (B,
        adm_in_channels); concat: dense cond; micro: (B, 6) original height/width, crop top/left, target
        height/width in pixels (zeros: the null)."""
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # dense conditions enter by concatenation (paper §3.3)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        dtype = self.out[-1].weight.dtype  # run in the weights' dtype (bf16 under DeepSpeed, like CompVis)
        x = x.to(dtype)
        context = context.to(dtype) if context is not None else None
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if self.cfg.num_classes or self.cfg.adm_in_channels:
            if y is None:
                raise ValueError("this UNet is class- or vector-conditional: pass y (class labels, or SDXL's vector)")
            emb = emb + self.label_emb(y if self.cfg.num_classes else y.to(dtype))
        if self.cfg.micro_cond:
            if micro is None:
                raise ValueError("this UNet is micro-conditioned: pass micro (original size, crop, target size)")
            feats = timestep_embedding(micro.reshape(-1).float(), self.cfg.model_channels).view(x.shape[0], -1)
            emb = emb + self.micro_embed(feats.to(dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, mask)
            hs.append(h)
        h = self.middle_block(h, emb, context, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, mask)
        return self.out(h)
