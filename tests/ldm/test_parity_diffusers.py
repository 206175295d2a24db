"""Parity with diffusers (a peer nobody here wrote): same weights -> same numbers (fp32, <= 1e-4).

The CompVis -> diffusers key conversion used here is diffusers' own (`single_file_utils`), so these
tests also prove our parameter layout is the CompVis one.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

from helpers import perturb_  # noqa: E402
from ldm.autoencoder import AutoencoderKL  # noqa: E402
from ldm.convert.diffusers import unet_from_diffusers, vae_from_diffusers, vae_to_diffusers  # noqa: E402
from ldm.config import AutoencoderConfig, UNetConfig  # noqa: E402
from ldm.diffusion import make_betas  # noqa: E402
from ldm.sampling import ddim_timesteps, sample_ddim  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402

TOL = 1e-4


def _vae_pair():
    cfg = AutoencoderConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    ours = perturb_(AutoencoderKL(cfg), 0.02).eval()
    dcfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=32)
    theirs = diffusers.AutoencoderKL(**dcfg).eval()
    sd = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}, dcfg)
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs, cfg


def test_autoencoder_kl_matches_diffusers():
    torch.manual_seed(0)
    ours, theirs, _ = _vae_pair()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        dpost = theirs.encode(x).latent_dist
        assert (post.mean - dpost.mean).abs().max() <= TOL
        assert (post.std - dpost.std).abs().max() <= TOL
        z = torch.randn(2, 4, 8, 8)
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() <= TOL


def test_diffusers_vae_folder_imports_into_ours():
    torch.manual_seed(1)
    ours, theirs, cfg = _vae_pair()
    back = vae_from_diffusers(theirs.state_dict(), cfg)
    again = AutoencoderKL(cfg)
    again.load_state_dict(back, strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    theirs.load_state_dict(vae_to_diffusers(again.state_dict(), cfg), strict=True)  # and the way back


def _unet_pair():
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                     attention_resolutions=(1, 2), num_heads=4, context_dim=24, transformer_depth=1)
    ours = perturb_(UNetModel(cfg), 0.02).eval()
    dcfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=24, attention_head_dim=4, norm_num_groups=32)
    theirs = diffusers.UNet2DConditionModel(**dcfg).eval()
    sd = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, dcfg)
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs, cfg


def test_unet_matches_diffusers_unet2dcondition():
    torch.manual_seed(0)
    ours, theirs, _ = _unet_pair()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        diff = (ours(x, t, context=ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max()
    assert diff <= TOL, diff


def test_diffusers_unet_folder_imports_into_ours():
    ours, theirs, cfg = _unet_pair()
    back = unet_from_diffusers(theirs.state_dict(), cfg)
    again = UNetModel(cfg)
    again.load_state_dict(back, strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("eta,prediction", [(0.0, "epsilon"), (0.0, "v_prediction"), (0.7, "epsilon")])
def test_ddim_reproduces_diffusers_ddimscheduler(eta, prediction):
    torch.manual_seed(0)
    ours, theirs, _ = _unet_pair()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, timestep_spacing="leading", prediction_type=prediction)
    steps = 12
    sched.set_timesteps(steps)
    ctx = torch.randn(2, 7, 24)
    x_T = torch.randn(2, 4, 8, 8)
    noises = [torch.randn(2, 4, 8, 8) for _ in range(steps)]
    with torch.no_grad():
        x = x_T.clone()
        for i, t in enumerate(sched.timesteps):
            out = theirs(x, t, encoder_hidden_states=ctx).sample
            x = sched.step(out, t, x, eta=eta, variance_noise=noises[i]).prev_sample
        ts = ddim_timesteps(1000, steps)
        assert torch.equal(ts, sched.timesteps.long())
        ac = torch.cumprod(1 - make_betas("scaled_linear", 1000, 0.00085, 0.012), 0)
        mine = sample_ddim(lambda z, tt: ours(z, tt, context=ctx), x_T.clone(), ts, ac, eta=eta,
                           parameterization={"epsilon": "eps", "v_prediction": "v"}[prediction], noises=noises)
    assert (mine - x).abs().max() <= TOL, (mine - x).abs().max()
