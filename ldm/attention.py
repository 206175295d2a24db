"""Cross-attention conditioning (paper §3.3, eq. 3): Attention(Q,K,V) = softmax(QK^T/sqrt(d)) V with
Q = W_Q phi_i(z_t) from the UNet features and K = W_K tau(y), V = W_V tau(y) from the conditioner.

Names follow CompVis `ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock, CrossAttention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim  # self-attention when no context
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)  # W_Q^(i)
        self.to_k = nn.Linear(context_dim, inner, bias=False)  # W_K^(i)
        self.to_v = nn.Linear(context_dim, inner, bias=False)  # W_V^(i)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # mask out padding tokens of y
        if self.upcast:  # SD 2.1: softmax(QK^T) in fp32 under bf16 / fp16
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # eq. 3
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to tau(y), feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpointed = False  # UNetModel.set_grad_checkpointing

    def forward(self, x, context=None, mask=None):
        if self.checkpointed and torch.is_grad_enabled():  # activations recomputed in backward, not kept
            return checkpoint(self._forward, x, context, mask, use_reentrant=False)
        return self._forward(x, context, mask)

    def _forward(self, x, context=None, mask=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, mask if context is not None else None) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Flatten phi_i(z_t) (h*w tokens), run transformer blocks with cross-attention, reshape back. The projections
    in and out are 1x1 convolutions (SD 1.x), or Linear layers on the tokens (`linear`, SD 2.x / SDXL)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, groups: int = 32, linear: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, dropout, context_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero-init: the block starts as identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(y.flatten(2).transpose(1, 2))  # b (h w) c, then the projection
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context, mask)
        if self.linear:
            return x + self.proj_out(y).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, -1, h, w))
