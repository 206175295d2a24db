"""The text encoders (ldm/text_encoders.py): the real offline MiniLM and the paper's trainable transformer."""
import pytest
import torch

from ldm.config import ConditioningConfig
from ldm.text_encoders import FrozenHFTextEncoder, TransformerTextEncoder, build_text_encoder


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
