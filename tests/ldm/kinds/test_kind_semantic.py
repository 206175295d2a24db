"""Semantic synthesis (ldm/kinds/semantic.py): its config checks and its condition."""
import numpy as np
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConditioningConfig, ConfigError, apply_overrides
from pipeline.presets import get_preset


def test_semantic_conditioning_names_each_contradiction():
    sem = get_preset("demo-semantic")
    assert sem.validate() and sem.unet.in_channels == 15
    with pytest.raises(ConfigError, match="set conditioning.num_classes=N"):
        apply_overrides(sem, ["conditioning.concat_channels=3", "unet.in_channels=7"]).validate()
    with pytest.raises(ConfigError, match="set unet.num_classes=null and unet.context_dim=null"):
        apply_overrides(sem, ["unet.context_dim=32"]).validate()


def test_semantic_condition_is_the_share_of_each_class_per_latent_cell():
    cfg = ConditioningConfig(kind="semantic", num_classes=3, concat_channels=3, cond_drop_prob=0.0)
    c = Conditioner(cfg, downsample_factor=2)
    m = np.zeros((4, 4), np.uint8)
    m[0, 0], m[0, 1], m[2:, 2:] = 1, 2, 2
    cond, uncond = c.prompts([m])
    assert uncond is None and cond["concat"].shape == (1, 3, 2, 2)  # never dropped in training: no null
    assert cond["concat"][0, :, 0, 0].tolist() == [0.5, 0.25, 0.25] and cond["concat"][0, 2, 1, 1] == 1
    assert torch.allclose(cond["concat"].sum(1), torch.ones(1, 2, 2))
    batch = c.batch({"label_map": torch.from_numpy(np.stack([m, m])).reshape(2, -1)}, torch.tensor([False, True]))
    assert torch.equal(batch["concat"][0], cond["concat"][0]) and not batch["concat"][1].any()  # dropped: zeros
    with pytest.raises(ValueError, match="holds id 5 but the model knows ids 0..2"):
        c.prompts([np.full((4, 4), 5, np.uint8)])
    guided = Conditioner(ConditioningConfig(kind="semantic", num_classes=3, concat_channels=3), downsample_factor=2)
    cond, uncond = guided.prompts([m])  # trained with dropout (zeros): zeros are its null for guidance
    assert torch.equal(uncond["concat"], torch.zeros_like(cond["concat"]))
