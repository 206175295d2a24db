"""The Conditioner (ldm/conditioning.py): one kind's conditions for training and sampling, and CFG dropout."""
import pytest
import torch

from ldm.conditioning import Conditioner, apply_drop, drop_mask
from ldm.config import ConditioningConfig, apply_overrides, get_preset
from ldm.model import LatentDiffusion


def test_conditioner_class_trainable_and_none():
    cls = Conditioner(ConditioningConfig(kind="class", num_classes=10))
    out = cls.batch({"label": torch.tensor([3, 4])}, torch.tensor([False, True]))
    assert out["y"].tolist() == [3, 10]  # index num_classes is the null class
    assert cls.prompts([1, 2])[1]["y"].tolist() == [10, 10]
    cfg = apply_overrides(get_preset("tiny"), ["conditioning.text_encoder=transformer", "conditioning.max_length=8"])
    model = LatentDiffusion(cfg)
    tr = Conditioner.build(model)
    assert tr.mode == "text" and tr.prompts(["a bag"])[0]["tokens"].shape == (1, 8)
    assert Conditioner(ConditioningConfig(kind="none")).prompts(["x"]) == ({}, {})
    with pytest.raises(ValueError, match="FrozenHFTextEncoder"):
        Conditioner(ConditioningConfig(kind="text", text_encoder="hf"))


def test_cfg_dropout():
    g = torch.Generator().manual_seed(0)
    drop = drop_mask(10000, 0.1, g)
    assert 0.08 < drop.float().mean() < 0.12
    cond, null = torch.ones(4, 3, 2), torch.zeros(1, 3, 2)
    out = apply_drop(cond, null, torch.tensor([True, False, True, False]))
    assert out[0].abs().sum() == 0 and torch.equal(out[1], cond[1])
