"""The schema of an LDM config: typed, frozen dataclasses for every part (paper §3.1-3.3), the domain of every
field, and the checks across fields. No dotted-path `target:` strings: every component is chosen by a plain field
(`reg="kl"`, `conditioning.kind="text"`) and built by ordinary code in the module that owns it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable


class ConfigError(ValueError):
    """A config value is missing, has the wrong type, or contradicts another value."""


@dataclass(frozen=True)
class AutoencoderConfig:
    """First stage (paper §3.1): image x (H,W,3) -> latent z (H/f, W/f, c)."""
    reg: str = "kl"                      # "kl" (KL-reg., §3.1) or "vq" (VQ-reg., §3.1)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128                        # base width
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    z_channels: int = 4
    embed_dim: int = 4                   # latent channels c after quant_conv
    n_embed: int = 8192                  # VQ codebook size |Z|
    beta: float = 0.25                   # VQ commitment weight (van den Oord et al.)
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:  # f in the paper
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.resolution // self.downsample_factor
        return (self.embed_dim, r, r)


@dataclass(frozen=True)
class FirstStageLossConfig:
    """Stage-1 objective (paper §3.1, App. G): rec + perceptual + patch-GAN + KL or codebook term."""
    rec_loss: str = "l1"                 # "l1" or "l2"
    perceptual_weight: float = 1.0
    perceptual_net: str = "effnet-lite0"  # or "lpips" (needs lpips_vgg_path + lpips_lin_path)
    lpips_vgg_path: str = ""
    lpips_lin_path: str = ""
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"             # "hinge" or "vanilla"
    disc_num_layers: int = 3
    disc_ndf: int = 64
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    logvar_init: float = 0.0


@dataclass(frozen=True)
class UNetConfig:
    """Time-conditional UNet eps_theta(z_t, t, tau(y)) with cross-attention (paper §3.3, eq. 3)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample rates ds with attention
    num_heads: int = 8
    num_head_channels: int = -1          # >0: fixed head width instead of fixed head count
    transformer_depth: tuple[int, ...] = (1,)  # transformer blocks per level (one value: every level; 0: none there)
    transformer_depth_middle: int = -1   # in the middle block; -1 = the last level's
    use_linear_projection: bool = False  # SD 2.x / SDXL: Linear proj_in / proj_out instead of 1x1 convolutions
    upcast_attention: bool = False       # SD 2.1: attention in fp32 under bf16/fp16
    context_dim: int | None = 768        # d_tau; None = no cross-attention (self-attention blocks)
    num_classes: int | None = None       # class-conditional embedding added to the time embedding
    adm_in_channels: int = 0             # SDXL: a vector y (pooled text + size features) -> MLP -> the time embedding
    micro_cond: bool = False             # micro-conditioning: original size, crop, target size -> the time embedding
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    norm_groups: int = 32
    grad_checkpointing: bool = False     # recompute each residual/transformer block in backward: memory for time

    def __post_init__(self):
        if isinstance(self.transformer_depth, int):  # one depth for every level, as CompVis configs write it
            object.__setattr__(self, "transformer_depth", (self.transformer_depth,))

    def depths(self) -> tuple[int, ...]:
        """The transformer depth of each level."""
        d = self.transformer_depth
        return d * len(self.channel_mult) if len(d) == 1 else d


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and objective: the paper's (§3.2, eq. 1-2; DDPM, Ho et al. 2020) or rectified flow (Esser et
    al. 2024, SD 3)."""
    objective: str = "ddpm"              # "ddpm" (the paper's: discrete t, a beta schedule) | "flow" (rectified flow)
    timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" (CompVis "linear") | "cosine"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_terminal_snr: bool = False      # Lin et al. 2024 rescale
    parameterization: str = "eps"        # "eps" | "x0" | "v"
    loss_type: str = "l2"                # "l2" | "l1"
    loss_weighting: str = "simple"       # "simple" (L_simple) | "min_snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    # objective="flow": how t in (0, 1) is drawn: "uniform" or "logit_normal" (sigmoid of N(logit_mean, logit_std^2),
    # Esser et al. 2024 §3.1: the best of the samplings that paper compared, at m=0, s=1)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @property
    def prediction(self) -> str:
        """What the network outputs: "flow" (the velocity noise - data) or the ddpm parameterization."""
        return "flow" if self.objective == "flow" else self.parameterization


@dataclass(frozen=True)
class ConditioningConfig:
    """tau_theta(y) (paper §3.3): what conditions the UNet and how it is dropped for CFG."""
    kind: str = "text"                   # "text" | "class" | "none" | "lowres" (super-resolution, §4.4) |
    #                                      "inpaint" (§4.5: a masked image's latent and its hole, concatenated) |
    #                                      "semantic" (§4.3.2: a per-pixel label map, one-hot, concatenated) |
    #                                      "layout" (§4.3.1: boxes and classes as tokens of a trained transformer)
    text_encoder: str = "hf"             # "hf" (frozen, from a local/s3 path) | "transformer" (trained, paper)
    text_encoder_path: str = ""          # "" = the offline all-MiniLM-L6-v2 when installed
    text_layer: str = "last"             # frozen encoder's "last" hidden states or its "penultimate" layer (SDXL)
    mask_padding: bool = True            # pass the tokens' mask to the encoder and the cross-attention; false: every
    #                                      position attends, as Stable Diffusion does
    pooled_dim: int = 0                  # kind="text_pooled": the last encoder's pooled projection (SDXL: 1280)
    micro_dim: int = 256                 # kind="text_pooled": Fourier features per size / crop value (SDXL: 256)
    max_length: int = 77
    # the paper's trainable transformer over a BERT tokenizer (used when text_encoder="transformer")
    n_embed: int = 1280
    n_layer: int = 32
    n_head: int = 8
    vocab_size: int = 30522
    num_classes: int = 0                 # kind="class"; kind="semantic": the label map's ids 0..N-1 (0: background);
    #                                      kind="layout": the boxes' classes 0..N-1
    concat_channels: int = 0             # dense conditions concatenated to z_t (SR, inpainting, semantic)
    cond_drop_prob: float = 0.1          # classifier-free guidance dropout, applied at train time
    # kind="lowres": the image downscaled by lowres_factor (the cache's 'lowres' column), resized to the latent's
    # size and concatenated to z_t (§4.4). Noise augmentation as in SD's x4 upscaler: the condition is noised to a
    # level in [0, lowres_noise_max] of a 1000-step DDPM schedule, the level given to the UNet as its class y
    # (unet.num_classes = lowres_noise_max + 1); sampling uses lowres_noise_sample.
    lowres_factor: int = 4
    lowres_noise_max: int = 0            # 0 = no augmentation
    lowres_noise_sample: int = 0
    # kind="layout": up to max_boxes boxes per image (the cache's 'layout' column), their corners discretised on a
    # layout_grid x layout_grid grid of the canvas, encoded by the trained transformer (n_embed, n_layer, n_head)
    max_boxes: int = 8
    layout_grid: int = 32
    # hybrid conditioning (concat + cross-attention): the boxes also drawn as one occupancy channel per class and
    # concatenated to z_t (concat_channels = num_classes)
    layout_concat: bool = False


@dataclass(frozen=True)
class LDMConfig:
    name: str = "custom"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: FirstStageLossConfig = field(default_factory=FirstStageLossConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    scale_factor: float = 0.0            # 0 = take 1/std of the latents from the cache manifest (§4.3.2)
    # how the cache's latents are brought to unit variance when scale_factor is 0: "global" (§4.3.2: one 1/std and
    # one mean for the whole latent) or "channel" (EDM2: each channel's own 1/std and mean)
    latent_norm: str = "global"

    def validate(self) -> "LDMConfig":
        check_domains(self)
        ae, un, cond = self.autoencoder, self.unet, self.conditioning
        if self.latent_norm == "channel" and self.scale_factor:
            raise ConfigError(f"latent_norm='channel' takes each channel's mean and std from the cache; "
                              f"scale_factor={self.scale_factor:g} is one fixed scale: set scale_factor=0 or "
                              f"latent_norm='global'")
        if ae.resolution % ae.downsample_factor:
            raise ConfigError(f"autoencoder.resolution={ae.resolution} is not divisible by f={ae.downsample_factor}")
        for name, c in (("autoencoder.ch", ae.ch), ("unet.model_channels", un.model_channels)):
            groups = ae.norm_groups if name.startswith("autoencoder") else un.norm_groups
            if c % groups:
                raise ConfigError(f"{name}={c} must be a multiple of norm_groups={groups}")
        want_in = ae.embed_dim + cond.concat_channels
        if un.in_channels != want_in:
            raise ConfigError(f"unet.in_channels={un.in_channels} but the latent has autoencoder.embed_dim="
                              f"{ae.embed_dim} + conditioning.concat_channels={cond.concat_channels} = {want_in}; "
                              f"set unet.in_channels={want_in}")
        if un.out_channels != ae.embed_dim:
            raise ConfigError(f"unet.out_channels={un.out_channels} must equal autoencoder.embed_dim={ae.embed_dim}")
        if len(un.transformer_depth) not in (1, len(un.channel_mult)):
            raise ConfigError(f"unet.transformer_depth={list(un.transformer_depth)} gives one depth per level of "
                              f"unet.channel_mult={list(un.channel_mult)} (or one for all)")
        if un.adm_in_channels and un.num_classes:
            raise ConfigError("unet.adm_in_channels (a vector y, SDXL) and unet.num_classes (class labels y) both "
                              "set the UNet's y: give one")
        if self.diffusion.zero_terminal_snr and self.diffusion.parameterization == "eps":
            raise ConfigError("diffusion.zero_terminal_snr=true needs diffusion.parameterization=v (or x0): at SNR 0 "
                              "the last step's noise prediction says nothing about x0 and sampling gives NaN "
                              "(Lin et al. 2024, §3.2)")
        _check_objective(self.diffusion)
        from ldm.kinds import kind_of
        kind_of(cond.kind).validate(self)  # the kind's own checks (ldm/kinds/)
        return self


def _check_objective(d: DiffusionConfig) -> None:
    """Fields that belong to one objective only, refused under the other rather than silently ignored."""
    if d.objective == "flow":
        wrong = [(f, v, ok) for f, v, ok in (("parameterization", d.parameterization, "eps"),
                                             ("zero_terminal_snr", d.zero_terminal_snr, False),
                                             ("loss_weighting", d.loss_weighting, "simple")) if v != ok]
        if wrong:
            f, v, ok = wrong[0]
            raise ConfigError(f"diffusion.{f}={v} belongs to objective=ddpm: a flow model predicts the velocity "
                              f"(noise - data) at t in (0, 1), weighted through diffusion.timestep_sampling; "
                              f"leave diffusion.{f} at {ok}")
    elif d.timestep_sampling != "uniform":
        raise ConfigError(f"diffusion.timestep_sampling={d.timestep_sampling} belongs to objective=flow; the ddpm "
                          f"objective draws t uniformly from its {d.timesteps} steps (eq. 2)")


# ---------------------------------------------------------------------------------------------
# the domain of every field, checked in the driver before anything is launched

_pos = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
_prob = (lambda v: 0 <= v < 1, "in [0, 1)")
_unit = (lambda v: 0 < v < 1, "in (0, 1)")
_all_pos = (lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of positive integers")


def _kinds() -> dict:
    from ldm.kinds import KINDS
    return KINDS


def _one_of(*choices):
    return (lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


DOMAINS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "autoencoder.reg": _one_of("kl", "vq"),
    "autoencoder.resolution": _pos, "autoencoder.in_channels": _pos, "autoencoder.out_ch": _pos,
    "autoencoder.ch": _pos, "autoencoder.ch_mult": _all_pos, "autoencoder.num_res_blocks": _pos,
    "autoencoder.attn_resolutions": (lambda v: all(x > 0 for x in v), "positive integers"),
    "autoencoder.dropout": _prob, "autoencoder.z_channels": _pos, "autoencoder.embed_dim": _pos,
    "autoencoder.n_embed": _pos, "autoencoder.beta": _nonneg, "autoencoder.norm_groups": _pos,
    "loss.rec_loss": _one_of("l1", "l2"), "loss.perceptual_weight": _nonneg,
    "loss.perceptual_net": _one_of("effnet-lite0", "lpips"), "loss.disc_start": _nonneg,
    "loss.disc_weight": _nonneg, "loss.disc_factor": _nonneg, "loss.disc_loss": _one_of("hinge", "vanilla"),
    "loss.disc_num_layers": _pos, "loss.disc_ndf": _pos, "loss.kl_weight": _nonneg,
    "loss.codebook_weight": _nonneg,
    "unet.in_channels": _pos, "unet.out_channels": _pos, "unet.model_channels": _pos, "unet.channel_mult": _all_pos,
    "unet.num_res_blocks": _pos, "unet.attention_resolutions": (lambda v: all(x > 0 for x in v), "positive integers"),
    "unet.num_heads": _pos, "unet.num_head_channels": (lambda v: v == -1 or v > 0, "-1 (use num_heads) or > 0"),
    "unet.transformer_depth": (lambda v: len(v) > 0 and all(x >= 0 for x in v), "a non-empty list of integers >= 0"),
    "unet.transformer_depth_middle": (lambda v: v == -1 or v > 0, "-1 (the last level's) or > 0"),
    "unet.adm_in_channels": _nonneg, "unet.context_dim": (lambda v: v is None or v > 0, "null or > 0"),
    "unet.num_classes": (lambda v: v is None or v > 0, "null or > 0"), "unet.dropout": _prob,
    "unet.norm_groups": _pos,
    "diffusion.objective": _one_of("ddpm", "flow"), "diffusion.timesteps": (lambda v: v >= 2, ">= 2"),
    "diffusion.timestep_sampling": _one_of("uniform", "logit_normal"), "diffusion.logit_std": _pos,
    "diffusion.beta_schedule": _one_of("linear", "scaled_linear", "cosine"),
    "diffusion.linear_start": _unit, "diffusion.linear_end": _unit,
    "diffusion.parameterization": _one_of("eps", "x0", "v"), "diffusion.loss_type": _one_of("l2", "l1"),
    "diffusion.loss_weighting": _one_of("simple", "min_snr"), "diffusion.min_snr_gamma": _pos,
    "diffusion.offset_noise": _nonneg,
    "conditioning.kind": (lambda v: v in _kinds(),
                          lambda: "one of the registered kinds (ldm/kinds/): " + ", ".join(map(repr, _kinds()))),
    "conditioning.text_encoder": _one_of("hf", "transformer"),
    "conditioning.text_layer": _one_of("last", "penultimate"), "conditioning.pooled_dim": _nonneg,
    "conditioning.micro_dim": _pos,
    "conditioning.max_length": _pos, "conditioning.n_embed": _pos, "conditioning.n_layer": _pos,
    "conditioning.n_head": _pos, "conditioning.vocab_size": _pos, "conditioning.num_classes": _nonneg,
    "conditioning.concat_channels": _nonneg, "conditioning.cond_drop_prob": _prob,
    "conditioning.lowres_factor": _pos, "conditioning.lowres_noise_max": (lambda v: 0 <= v < 1000, "in [0, 1000)"),
    "conditioning.lowres_noise_sample": _nonneg, "conditioning.max_boxes": _pos,
    "conditioning.layout_grid": (lambda v: v >= 2, ">= 2"),
    "scale_factor": _nonneg, "latent_norm": _one_of("global", "channel"),
}


def check_domains(cfg: Any, prefix: str = "") -> None:
    """Every field against DOMAINS; the first value outside its domain raises, naming the key and the domain."""
    for f in fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_domains(value, f"{key}.")
        elif key in DOMAINS:
            ok, what = DOMAINS[key]
            if not ok(value):
                what = what() if callable(what) else what
                raise ConfigError(f"{key}={value!r} is not valid: it must be {what}")
