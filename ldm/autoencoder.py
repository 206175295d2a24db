"""First-stage autoencoders (paper §3.1): E(x) -> z, D(z) -> x~, KL- or VQ-regularised, any f = 2^k.

Module and parameter names follow CompVis/latent-diffusion (`encoder.down.0.block.0.norm1.weight`,
`quant_conv`, `post_quant_conv`, `quantize.embedding.weight`), so their checkpoints load strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import AutoencoderConfig


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as CompVis/taming


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the autoencoder's mid attention)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


def run_level(level: nn.Module, h: torch.Tensor, resample: str) -> torch.Tensor:
    """One resolution level of the encoder or decoder: its ResNet blocks (each followed by its attention block, where
    the level has them), then its down- or upsampling, if any."""
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, double_z: bool):
        super().__init__()
        ch, g = cfg.ch, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            block_in, block_out = ch * in_mult[i], ch * mult
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.ch, cfg.norm_groups
        block_in = ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        up = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            block_out = ch * cfg.ch_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)  # index = resolution level, consistent with checkpoints
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:  # for the adaptive GAN weight (losses.adaptive_weight)
        return self.conv_out.weight

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = run_level(level, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(std^2)) from the encoder's 2c output channels (paper §3.1)."""

    def __init__(self, parameters: torch.Tensor | None = None, *, mean=None, std=None):
        if parameters is not None:
            mean, logvar = torch.chunk(parameters, 2, dim=1)
            self.logvar = torch.clamp(logvar, -30.0, 20.0)
            self.mean, self.std = mean, torch.exp(0.5 * self.logvar)
        else:  # rebuilt from a cached (mean, std) pair
            self.mean, self.std = mean, std
            self.logvar = 2.0 * torch.log(std.clamp_min(1e-12))
        self.var = self.std ** 2

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:  # KL(q || N(0, I)) per sample, the KL-reg. term
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class FirstStage(nn.Module):
    """E, D and the 1x1 convs between z and the latent (CompVis' quant_conv / post_quant_conv); the encoder gives
    2 z_channels (mean and log-variance) when `double_z`."""

    def __init__(self, cfg: AutoencoderConfig, double_z: bool):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, double_z=double_z)
        self.decoder = Decoder(cfg)
        k = 2 if double_z else 1
        self.quant_conv = nn.Conv2d(k * cfg.z_channels, k * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)


class AutoencoderKL(FirstStage):
    """KL-regularised autoencoder: a slight KL penalty towards N(0, I) on the latent (paper §3.1)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg, double_z=True)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior: bool = True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VectorQuantizer(nn.Module):
    """VQ layer (paper §3.1, van den Oord et al.): nearest codebook entry, straight-through gradient."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor):
        zf = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        w = self.embedding.weight
        d = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ w.t() + w.pow(2).sum(1)[None]
        idx = d.argmin(1)
        zq = self.embedding(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        # codebook + commitment loss: ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (CompVis "legacy" order)
        loss = torch.mean((zq.detach() - z) ** 2) * self.beta + torch.mean((zq - z.detach()) ** 2)
        zq = z + (zq - z).detach()  # straight-through estimator
        usage = torch.bincount(idx, minlength=self.n_embed).float() / idx.numel()
        perplexity = torch.exp(-torch.sum(usage * torch.log(usage + 1e-10)))
        return zq, loss, {"indices": idx.view(z.shape[0], z.shape[2], z.shape[3]), "perplexity": perplexity,
                          "usage": (usage > 0).float().mean()}


class VQModel(FirstStage):
    """VQ-regularised autoencoder: the quantisation layer is absorbed by the decoder (paper §3.1)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg, double_z=False)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # pre-quantisation latent: what the LDM is trained on

    def decode(self, z: torch.Tensor, force_quantize: bool = True) -> torch.Tensor:
        if force_quantize:
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        zq, qloss, info = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(zq)), qloss, info


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return AutoencoderKL(cfg) if cfg.reg == "kl" else VQModel(cfg)


def encode_latent(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the first-stage latent: a posterior for KL, a point (std 0) for VQ."""
    if isinstance(model, AutoencoderKL):
        post = model.encode(x)
        return post.mean, post.std
    z = model.encode(x)
    return z, torch.zeros_like(z)


def pixel_encoder(model: nn.Module):
    """uint8 (B, H, W, 3) pixels -> the latent's posterior mean: how the encode job turns an image into z."""
    def encode(px: torch.Tensor) -> torch.Tensor:
        x = px.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return encode_latent(model, x.to(next(model.parameters()).device))[0]
    return encode


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AutoencoderKL", "VQModel", "DiagonalGaussian", "VectorQuantizer", "build_autoencoder",
           "encode_latent", "pixel_encoder", "Encoder", "Decoder", "num_params"]
