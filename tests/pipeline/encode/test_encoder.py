"""The encoder actor's text path: repeated captions are encoded once, with the same embeddings as one by one."""
import numpy as np
import pytest
import torch

from pipeline.encode.encoder import LatentEncoder


def test_repeated_captions_encoded_once_with_identical_embeddings():
    enc = LatentEncoder("random:tiny", "", "", 16, True, 16)
    captions = ["a photo of a coat", "a dress", "a photo of a coat", "a dress", "a photo of a coat"]
    seen = []
    embed = enc.text.embed
    enc.text.embed = lambda c: seen.append(list(c)) or embed(c)
    got, _ = enc.embed(captions)
    assert seen == [["a dress", "a photo of a coat"]]  # each distinct caption once
    with torch.no_grad():
        one_by_one = np.concatenate([embed([c])[0].float().numpy() for c in captions])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[0], got[4]) and not np.array_equal(got[0], got[1])


def test_precisions_agree_with_fp32_and_unknown_settings_are_refused():
    """bf16 weights (the GPU default) and autocast give the fp32 latents to bf16 accuracy; typos are refused."""
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    batch = {"key": np.array([f"k{i}" for i in range(4)]), "skip": np.array(["", "", "too_small", ""]),
             "pixels": np.array([p.tobytes() for p in px], dtype=object), "caption": np.array(["a"] * 4)}
    out = {p: LatentEncoder("random:tiny", "", "none", 16, False, 16, precision=p)(batch)["latent_mean"]
           for p in ("fp32", "bf16", "autocast", "auto")}
    ref = out["fp32"].astype(np.float32)
    assert not ref[2].any() and ref[[0, 1, 3]].any()  # the skipped row stays zero
    assert np.array_equal(out["auto"], out["fp32"])  # auto = fp32 on a CPU
    for p in ("bf16", "autocast"):
        assert np.linalg.norm(out[p] - ref) / np.linalg.norm(ref) < 3e-2, p
    with pytest.raises(ValueError, match="precision 'fp16'"):
        LatentEncoder("random:tiny", "", "none", 16, False, 16, precision="fp16")
    with pytest.raises(ValueError, match="compile 'yes'"):
        LatentEncoder("random:tiny", "", "none", 16, False, 16, compile="yes")


def test_without_embeddings_the_actor_loads_the_tokenizer_alone_and_tokenizes_the_same():
    """A cache that keeps no text embeddings needs no text encoder weights in the actor, and the same tokens."""
    lean, full = (LatentEncoder("random:tiny", "", "", 16, keep, 16) for keep in (False, True))
    assert not hasattr(lean.text, "model") and hasattr(full.text, "model")
    captions = ["a photo of a coat", "a dress, " * 20]  # the second one is truncated to max_length
    for a, b in zip(lean.text.tokenize(captions), full.text.tokenize(captions)):
        assert a.shape == (2, 16) and torch.equal(a, b)
