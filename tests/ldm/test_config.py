import pytest

from ldm.config import ConfigError, LDMConfig, apply_overrides, config_hash, load_yaml, save_yaml
from pipeline.presets import PRESETS, get_preset, load_config


@pytest.mark.parametrize("name", ["tiny", "demo", "ldm-kl-8", "sd15", "sd21", "sdxl-base"])
def test_presets_validate(name):
    cfg = get_preset(name).validate()
    assert cfg.name == name


def test_required_presets_exist_and_shapes():
    assert {"tiny", "demo", "ldm-kl-8", "sd15", "sd21", "sdxl-base"} <= set(PRESETS)
    demo = get_preset("demo")
    assert demo.autoencoder.resolution == 32 and demo.autoencoder.downsample_factor == 4
    assert get_preset("ldm-kl-8").autoencoder.downsample_factor == 8
    assert get_preset("sd15").unet.context_dim == 768 and get_preset("sd21").unet.context_dim == 1024
    assert get_preset("sdxl-base").unet.context_dim == 2048


def test_yaml_roundtrip(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), ["unet.channel_mult=[1,2,2]", "diffusion.parameterization=v"])
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(tmp_path / "c.yaml")
    assert back == cfg and isinstance(back, LDMConfig)
    assert back.unet.channel_mult == (1, 2, 2)
    assert config_hash(back) == config_hash(cfg)


def test_overrides_types_and_errors():
    cfg = apply_overrides(get_preset("tiny"), ["unet.model_channels=64", "diffusion.offset_noise=0.1",
                                               "diffusion.zero_terminal_snr=true", "unet.context_dim=null"])
    assert cfg.unet.model_channels == 64 and cfg.diffusion.offset_noise == 0.1
    assert cfg.diffusion.zero_terminal_snr is True and cfg.unet.context_dim is None
    with pytest.raises(ConfigError, match="no field 'model_chans'"):
        apply_overrides(cfg, ["unet.model_chans=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(cfg, ["unet.model_channels=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["unet.model_channels"])


def test_yaml_file_on_top_of_preset(tmp_path):
    (tmp_path / "o.yaml").write_text("unet:\n  model_channels: 64\ndiffusion:\n  loss_weighting: min_snr\n")
    cfg = load_config("tiny", str(tmp_path / "o.yaml"), ["diffusion.min_snr_gamma=3"])
    assert cfg.unet.model_channels == 64 and cfg.diffusion.loss_weighting == "min_snr"
    assert cfg.diffusion.min_snr_gamma == 3.0 and cfg.autoencoder == get_preset("tiny").autoencoder


def test_validate_names_the_contradiction():
    with pytest.raises(ConfigError, match="unet.in_channels=8 but the latent"):
        load_config("tiny", overrides=["unet.in_channels=8"])
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")
    assert load_config("tiny", overrides=["conditioning.concat_channels=4", "unet.in_channels=8"])
    with pytest.raises(ConfigError, match="kind='none' has no context .* set unet.context_dim=null"):
        load_config("tiny", overrides=["conditioning.kind=none"])
    assert load_config("tiny", overrides=["conditioning.kind=none", "unet.context_dim=null"])
    with pytest.raises(ConfigError, match="zero_terminal_snr=true needs diffusion.parameterization=v"):
        load_config("tiny", overrides=["diffusion.zero_terminal_snr=true"])
    assert load_config("tiny", overrides=["diffusion.zero_terminal_snr=true", "diffusion.parameterization=v"])


def test_config_is_frozen():
    cfg = get_preset("tiny")
    with pytest.raises(Exception):
        cfg.unet.model_channels = 3


@pytest.mark.parametrize("override, key", [
    ("conditioning.kind=cls", "conditioning.kind"), ("conditioning.text_encoder=bert", "conditioning.text_encoder"),
    ("unet.model_channels=0", "unet.model_channels"), ("unet.model_channels=-32", "unet.model_channels"),
    ("unet.num_res_blocks=0", "unet.num_res_blocks"), ("unet.channel_mult=[]", "unet.channel_mult"),
    ("diffusion.timesteps=1", "diffusion.timesteps"), ("conditioning.cond_drop_prob=1.5",
                                                       "conditioning.cond_drop_prob"),
    ("autoencoder.ch_mult=[1,-2]", "autoencoder.ch_mult"), ("diffusion.beta_schedule=sqrt", "diffusion.beta_schedule"),
])
def test_every_field_is_checked_against_its_domain(override, key):
    with pytest.raises(ConfigError, match=f"^{key}=.* is not valid: it must be"):
        load_config("tiny", overrides=[override])
