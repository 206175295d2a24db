"""The preset registry and the model presets: the unit tests' `tiny`, the CPU `demo`, the paper's LDM-KL-8 and the
Stable Diffusion shapes. The demo's task presets are registered by the demo's tasks (pipeline/demo/tasks/)."""
from __future__ import annotations

from dataclasses import replace  # noqa: F401 - presets derive from one another (replace(base, ...))
from typing import Callable

from ldm.config.schema import (AutoencoderConfig, ConditioningConfig, ConfigError, DiffusionConfig,
                               FirstStageLossConfig, LDMConfig, UNetConfig)


PRESETS: dict[str, Callable[[], LDMConfig]] = {}


def register_preset(name: str):
    def deco(fn: Callable[[], LDMConfig]):
        if name in PRESETS:
            raise ConfigError(f"preset {name!r} is registered twice")
        PRESETS[name] = fn
        return fn
    return deco


def get_preset(name: str) -> LDMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


@register_preset("tiny")
def _tiny() -> LDMConfig:
    """Unit tests: 16x16 images, f=2, a UNet of ~0.3M params; seconds on a CPU."""
    return LDMConfig(
        name="tiny",
        autoencoder=AutoencoderConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                      z_channels=4, embed_dim=4, n_embed=64),
        loss=FirstStageLossConfig(disc_start=0, disc_ndf=16, disc_num_layers=2),
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_heads=2, context_dim=32),
        # T=100 with betas x10 reaches the same terminal alpha_bar (~0.005) as the paper's T=1000 schedule
        diffusion=DiffusionConfig(timesteps=100, linear_start=0.0085, linear_end=0.12),
        conditioning=ConditioningConfig(kind="text", text_encoder="transformer", n_embed=32, n_layer=2, n_head=2,
                                        max_length=16),
    )


@register_preset("demo")
def _demo() -> LDMConfig:
    """The CPU demo: 32x32 Fashion-MNIST, KL f=4 (8x8x4 latents), a ~5M-param UNet, frozen MiniLM text."""
    return LDMConfig(
        name="demo",
        autoencoder=AutoencoderConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                      z_channels=4, embed_dim=4, n_embed=512),
        # CPU-sized stage 1: L1 + KL (the perceptual net doubles the step cost at 32 px; the GAN starts late).
        # Turn them on with loss.perceptual_weight=1.0 loss.disc_start=2001 for sharper reconstructions.
        loss=FirstStageLossConfig(disc_start=50001, disc_ndf=32, disc_num_layers=2, perceptual_weight=0.0),
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=2,
                        attention_resolutions=(1, 2), num_heads=4, context_dim=384),
        diffusion=DiffusionConfig(timesteps=1000),
        conditioning=ConditioningConfig(kind="text", text_encoder="hf", max_length=16),
    )


def kl_f8(resolution: int) -> AutoencoderConfig:
    """The KL-f8 first stage of the paper's LDM-KL-8 and of Stable Diffusion 1.x / 2.x / XL (4 latent channels)."""
    return AutoencoderConfig(resolution=resolution, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                             embed_dim=4)


@register_preset("ldm-kl-8")
def _ldm_kl_8() -> LDMConfig:
    """The paper's LAION text-to-image LDM-KL-8 (txt2img-1p4B): 256px, f=8, a 32-layer transformer over BERT tokens
    trained with the UNet; the latent scale measured on the cache (scale_factor 0, §4.3.2)."""
    return LDMConfig(name="ldm-kl-8", autoencoder=kl_f8(256),
                     unet=UNetConfig(context_dim=1280, num_heads=8),
                     conditioning=ConditioningConfig(kind="text", text_encoder="transformer", n_embed=1280,
                                                     n_layer=32, max_length=77))


def stable_diffusion(name: str, resolution: int, unet: UNetConfig, conditioning: ConditioningConfig,
                     parameterization: str = "eps") -> LDMConfig:
    """A Stable Diffusion shape: KL-f8, the scaled-linear schedule (0.00085..0.012), frozen CLIP text encoders (their
    folder given at encode time); the published latent scale comes with the imported autoencoder."""
    return LDMConfig(name=name, autoencoder=kl_f8(resolution), unet=unet, conditioning=conditioning,
                     diffusion=DiffusionConfig(timesteps=1000, linear_start=0.00085, linear_end=0.012,
                                               parameterization=parameterization))


@register_preset("sd15")
def _sd15() -> LDMConfig:
    """Stable Diffusion 1.x (Rombach et al.): 512 px, an 860M UNet with 8 heads, CLIP ViT-L/14's last layer (768-d)."""
    return stable_diffusion("sd15", 512, UNetConfig(num_heads=8, context_dim=768),
                            ConditioningConfig(kind="text", text_encoder="hf", max_length=77, mask_padding=False))


@register_preset("sd21")
def _sd21() -> LDMConfig:
    """Stable Diffusion 2.1 (768-v): v-prediction, 64-wide heads, linear projections in the transformers, attention
    upcast to fp32, OpenCLIP ViT-H/14's penultimate layer (1024-d; a 23-layer text encoder in diffusers' layout)."""
    return stable_diffusion("sd21", 768, UNetConfig(num_head_channels=64, context_dim=1024,
                                                    use_linear_projection=True, upcast_attention=True),
                            ConditioningConfig(kind="text", text_encoder="hf", max_length=77, mask_padding=False),
                            parameterization="v")


@register_preset("sdxl-base")
def _sdxl_base() -> LDMConfig:
    """SDXL base (Podell et al. 2023): 1024 px, three levels with no / 2 / 10 transformer blocks (10 in the middle),
    CLIP ViT-L and OpenCLIP ViT-bigG penultimate layers concatenated (2048-d), and the vector y: bigG's pooled
    projection (1280) and Fourier features of the original size, crop and target size (6 x 256) -> 2816."""
    return stable_diffusion("sdxl-base", 1024,
                            UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=64,
                                       transformer_depth=(1, 2, 10), context_dim=2048, use_linear_projection=True,
                                       adm_in_channels=2816),
                            ConditioningConfig(kind="text_pooled", text_encoder="hf", max_length=77,
                                               mask_padding=False, text_layer="penultimate", pooled_dim=1280))
