import pytest
import torch

from ldm.conditioning import (Conditioner, FrozenHFTextEncoder, TransformerTextEncoder, apply_drop, build_text_encoder,
                              drop_mask)
from ldm.config import ConditioningConfig, ConfigError, apply_overrides, get_preset
from ldm.latent_scale import LatentScale
from ldm.model import LatentDiffusion


@pytest.fixture(scope="module")
def minilm():
    return FrozenHFTextEncoder(max_length=16)


def test_real_minilm_loads_offline_and_separates_captions(minilm):
    caps = ["a photo of a sneaker", "a picture of a sneaker", "a black and white picture of an ankle boot",
            "a red dress on a hanger"]
    emb, mask = minilm(caps)
    assert emb.shape == (4, 16, 384) and mask.shape == (4, 16)
    assert not any(p.requires_grad for p in minilm.parameters())
    pooled = torch.nn.functional.normalize((emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 3] and sim[0, 1] > 0.8  # real semantics, not random weights
    ids, m = minilm.tokenize(caps)
    assert torch.allclose(minilm.encode(ids, m), emb)


def test_hf_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="unet.context_dim=384"):
        build_text_encoder(ConditioningConfig(text_encoder="hf", max_length=8), context_dim=768)


def test_missing_text_encoder_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenHFTextEncoder("/nonexistent/encoder")


def test_trainable_transformer_with_bert_tokenizer():
    enc = TransformerTextEncoder(vocab_size=30522, max_length=12, dim=32, depth=2, heads=2)
    emb, mask = enc(["a photo of a bag", "a shirt"])
    assert emb.shape == (2, 12, 32)
    assert mask[1].sum() < mask[0].sum()  # shorter caption, more padding
    emb.sum().backward()
    assert enc.token_emb.weight.grad is not None


def test_conditioner_gives_training_and_sampling_the_same_condition(minilm):
    cfg = ConditioningConfig(kind="text", text_encoder="hf", max_length=16)
    c = Conditioner(cfg, text=minilm)
    assert c.mode == "frozen" and c.null["context"].shape == (1, 16, 384)
    ids, mask = minilm.tokenize(["a sneaker", "a dress"])
    drop = torch.tensor([False, True])
    from_tokens = c.batch({"input_ids": ids, "attention_mask": mask}, drop)
    cond, uncond = c.prompts(["a sneaker", "a dress"])
    assert torch.allclose(from_tokens["context"][0], cond["context"][0], atol=1e-5)  # same tau(y) either way
    assert torch.allclose(from_tokens["context"][1], uncond["context"][1])          # dropped -> the null caption
    cached = c.batch({"text_emb": cond["context"].half().flatten(1), "attention_mask": mask}, drop)
    assert torch.allclose(cached["context"][0], cond["context"][0], atol=1e-2)      # cached embeddings, same path


def test_conditioner_class_trainable_and_none():
    cls = Conditioner(ConditioningConfig(kind="class", num_classes=10))
    out = cls.batch({"label": torch.tensor([3, 4])}, torch.tensor([False, True]))
    assert out["y"].tolist() == [3, 10]  # index num_classes is the null class
    assert cls.prompts([1, 2])[1]["y"].tolist() == [10, 10]
    cfg = apply_overrides(get_preset("tiny"), ["conditioning.text_encoder=transformer", "conditioning.max_length=8"])
    model = LatentDiffusion(cfg)
    tr = Conditioner.build(model)
    assert tr.mode == "trainable" and tr.prompts(["a bag"])[0]["input_ids"].shape == (1, 8)
    assert Conditioner(ConditioningConfig(kind="none")).prompts(["x"]) == ({}, {})
    with pytest.raises(ValueError, match="FrozenHFTextEncoder"):
        Conditioner(ConditioningConfig(kind="text", text_encoder="hf"))


def test_latent_scale_goes_both_ways():
    s = LatentScale.choose(0.0, [0.5, 1.5], 2.0)
    assert s == LatentScale(2.0, 1.0)
    z = torch.randn(2, 2, 4, 4)
    assert torch.allclose(s.to_latent(s.to_diffusion(z)), z, atol=1e-6)
    assert LatentScale.from_json(s.to_json()) == s
    assert LatentScale.choose(0.18215, [0.5], 0.2) == LatentScale(0.18215, 0.0)  # a fixed scale has no shift
    # SD's 0.18215 on a self-trained autoencoder whose latents have std 0.5 (1/std = 2): std 0.09, refused
    with pytest.raises(ConfigError, match="scale_factor=0.18215 gives these latents a std of 0.0911"):
        LatentScale.choose(0.18215, [0.5], 2.0)
    assert LatentScale.choose(0.18215, [0.0], 0.0) == LatentScale(0.18215, 0.0)  # no measured scale: nothing to check


def test_latent_scale_per_channel_makes_every_channel_zero_mean_unit_variance():
    mean, std = [-6.8, 2.0, 0.3], [4.7, 0.6, 2.0]  # channels far apart, as the demo's first stage gives
    z = torch.randn(4096, 3, 2, 2) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    overall = 1 / float(z.std())
    glob = LatentScale.choose(0.0, mean, overall)
    per = LatentScale.choose(0.0, mean, overall, std, per_channel=True)
    assert per == LatentScale(tuple(1 / s for s in std), tuple(mean))
    g, c = glob.to_diffusion(z), per.to_diffusion(z)
    assert g.mean((0, 2, 3)).abs().max() > 0.5 and g.std((0, 2, 3)).min() < 0.3  # one scale leaves them apart
    assert torch.allclose(c.mean((0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(c.std((0, 2, 3)), torch.ones(3), atol=0.05)
    assert torch.allclose(per.to_latent(c), z, atol=1e-4)
    assert LatentScale.from_json(per.to_json()) == per and "per channel" in per.describe()
    with pytest.raises(ConfigError, match="latent_channel_std"):
        LatentScale.choose(0.0, mean, overall, None, per_channel=True)
    with pytest.raises(ConfigError, match="latent_norm='channel'"):
        apply_overrides(get_preset("tiny"), ["latent_norm=channel", "scale_factor=0.18215"]).validate()


def test_cfg_dropout():
    g = torch.Generator().manual_seed(0)
    drop = drop_mask(10000, 0.1, g)
    assert 0.08 < drop.float().mean() < 0.12
    cond, null = torch.ones(4, 3, 2), torch.zeros(1, 3, 2)
    out = apply_drop(cond, null, torch.tensor([True, False, True, False]))
    assert out[0].abs().sum() == 0 and torch.equal(out[1], cond[1])


def test_lowres_condition_meets_the_latent_noised_to_its_level():
    """SR (§4.4): a 4x4 low-res image becomes an 8x8 concat condition on an f=2 model (the spatial rescaler),
    noised by SD's x4-upscaler augmentation, with the level as y; level 0 is nearly clean (noise std 0.01);
    sampling is seeded."""
    import numpy as np
    cfg = ConditioningConfig(kind="lowres", concat_channels=3, lowres_factor=4, lowres_noise_max=350,
                             lowres_noise_sample=20, cond_drop_prob=0.0)
    c = Conditioner(cfg, downsample_factor=2)
    images = torch.randint(0, 256, (3, 4, 4, 3), dtype=torch.uint8)
    clean = c.lowres(images, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 127.5 - 1, size=(8, 8),
                                          mode="bicubic", align_corners=False)
    assert clean["concat"].shape == (3, 3, 8, 8) and (clean["concat"] - ref).abs().max() < 0.05
    noisy = c.lowres(images, torch.full((3,), 350), torch.Generator().manual_seed(0))["concat"]
    assert (noisy - ref).std() > 0.3 and noisy.shape == ref.shape
    g = torch.Generator().manual_seed(1)
    batch = c.batch({"lowres": images.reshape(3, -1)}, torch.tensor([False, True, False]), g)
    assert batch["y"].min() >= 0 and batch["y"].max() <= 350 and batch["concat"][1].abs().sum() == 0  # dropped
    cond, uncond = c.prompts([np.asarray(im) for im in images])
    again, _ = c.prompts([np.asarray(im) for im in images])
    assert uncond is None and cond["y"].tolist() == [20] * 3 and torch.equal(cond["concat"], again["concat"])
