import pytest
import torch
from scipy import linalg

from helpers import tiny_inception
from pipeline.evaluate.scores import SampleScores, frechet_distance, load_feature_net


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d = 4
    a, b = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    s1, s2 = a @ a.T + torch.eye(d), b @ b.T + torch.eye(d)
    mu1, mu2 = torch.zeros(d), torch.tensor([1.0, -2.0, 0.5, 3.0])
    x1 = mu1 + torch.randn(200_000, d, generator=g) @ torch.linalg.cholesky(s1).T
    x2 = mu2 + torch.randn(200_000, d, generator=g) @ torch.linalg.cholesky(s2).T
    s1n, s2n = s1.double().numpy(), s2.double().numpy()
    closed = float(((mu1 - mu2) ** 2).sum()) + float(
        (s1n + s2n - 2 * linalg.sqrtm(s1n @ s2n).real).trace())
    assert frechet_distance(x1, x2) == pytest.approx(closed, rel=0.02)
    assert frechet_distance(x1, x1) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def photos():
    from pipeline.data.make_shards import load_fashion_mnist
    x = torch.tensor(load_fashion_mnist("test")[0][:64], dtype=torch.float32)[:, None] / 127.5 - 1
    return x.expand(-1, 3, -1, -1)  # real Fashion-MNIST images, as the shards' RGB


def test_scores_are_deterministic_and_rank_noise_below_real_images(photos):
    net = load_feature_net()
    scores = SampleScores(net, photos[:32])
    held_out = scores.score(photos[32:], seed=3)
    assert held_out == scores.score(photos[32:], seed=3)  # same images, same seed: the same figures
    noise = scores.score(torch.rand(32, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1, seed=3)
    assert held_out["fd"] < noise["fd"] and held_out["kid"] < noise["kid"]
    assert held_out["recall"] > noise["recall"]
    assert held_out["feature_net"] == "EffNetLite0" and held_out["names"]["fd"] == "FD-EffNetLite0"
    assert held_out["num_samples"] == 32 and held_out["num_real"] == 32


def test_inception_weights_by_path_give_fid_names_and_bad_paths_say_what_to_give(tmp_path, photos):
    path = tiny_inception(tmp_path / "inception.pt")
    net = load_feature_net(str(path))
    r = SampleScores(net, photos[:8]).score(photos[8:16])
    assert r["feature_net"] == "Inception" and r["names"] == {"fd": "FID", "kid": "KID", "is": "IS"}
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        load_feature_net(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript Inception-v3"):
        load_feature_net(str(tmp_path / "junk.pt"))
