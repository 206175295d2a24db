"""The encoder actor's text path: repeated captions are encoded once, with the same embeddings as one by one."""
import numpy as np
import torch

from pipeline.encode.encoder import LatentEncoder


def test_repeated_captions_encoded_once_with_identical_embeddings():
    enc = LatentEncoder("random:tiny", "", "", 16, True, 16)
    captions = ["a photo of a coat", "a dress", "a photo of a coat", "A dress", "a photo of a coat"]
    ids, mask = enc.text.tokenize(captions)
    seen = []
    encode = enc.text.encode
    enc.text.encode = lambda i, m: seen.append(len(i)) or encode(i, m)
    got = enc.embed(ids, mask)
    assert seen == [2]  # two distinct token rows: the MiniLM tokenizer is uncased, so "A dress" is "a dress"
    with torch.no_grad():
        one_by_one = np.concatenate([encode(ids[i:i + 1], mask[i:i + 1]).float().numpy() for i in range(len(captions))])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[0], got[4])
