"""Text (ldm/kinds/text.py): a frozen encoder's condition is the same from cached tokens, cached embeddings and
prompts."""
import pytest
import torch

from ldm.conditioning import Conditioner
from ldm.config import ConditioningConfig
from ldm.text_encoders import FrozenHFTextEncoder


@pytest.fixture(scope="module")
def minilm():
    return FrozenHFTextEncoder(max_length=16)


def test_conditioner_gives_training_and_sampling_the_same_condition(minilm):
    cfg = ConditioningConfig(kind="text", text_encoder="hf", max_length=16)
    c = Conditioner(cfg, text=minilm)
    assert c.mode == "text" and c.null["context"].shape == (1, 16, 384)
    ids, mask = minilm.tokenize(["a sneaker", "a dress"])
    drop = torch.tensor([False, True])
    from_tokens = c.batch({"input_ids": ids, "attention_mask": mask}, drop)
    cond, uncond = c.prompts(["a sneaker", "a dress"])
    assert torch.allclose(from_tokens["context"][0], cond["context"][0], atol=1e-5)  # same tau(y) either way
    assert torch.allclose(from_tokens["context"][1], uncond["context"][1])          # dropped -> the null caption
    cached = c.batch({"text_emb": cond["context"].half().flatten(1), "attention_mask": mask}, drop)
    assert torch.allclose(cached["context"][0], cond["context"][0], atol=1e-2)      # cached embeddings, same path
