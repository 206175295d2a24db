"""Post-hoc EMA (ldm/posthoc_ema.py) over power-function EMAs (ldm/ema.py)."""
import pytest
import torch

from ldm.ema import EMA, power_decay, sigma_rel_to_gamma
from ldm.posthoc_ema import reconstruct, solve_weights


def test_gamma_gives_back_its_sigma_rel_and_the_power_ema_weighs_updates_as_tau_to_gamma():
    for s in (0.05, 0.10, 0.2):
        g = sigma_rel_to_gamma(s)
        assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(s, rel=1e-9)
    g, n = sigma_rel_to_gamma(0.1), 200
    ema = EMA({"w": torch.zeros(n, dtype=torch.float64)}, sigma_rel=0.1)
    for t in range(1, n + 1):  # update t brings the one-hot e_t: the shadow holds each update's final weight
        ema.update({"w": torch.nn.functional.one_hot(torch.tensor(t - 1), n).double()})
    tau = torch.arange(1, n + 1, dtype=torch.float64)
    want = tau ** g / (tau ** g).sum()
    assert ema.shadow["w"].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(ema.shadow["w"].double(), want, atol=2e-3)  # the discrete profile of tau^gamma
    assert power_decay(g, 1) == 0.0  # the first update replaces the initial weights


def trajectory(steps=400, every=40, tracked=(0.05, 0.15), also=(0.10,)):
    """Snapshots of the tracked profiles along a drifting noisy trajectory, and the EMAs of `also` kept directly."""
    torch.manual_seed(0)
    w = torch.zeros(1000)
    emas = {s: EMA({"w": w}, sigma_rel=s) for s in (*tracked, *also)}
    snaps = []
    for step in range(1, steps + 1):
        w = w + 0.01 * torch.randn(1000) + 0.002
        for e in emas.values():
            e.update({"w": w})
        if step % every == 0:
            snaps += [(step, s, {"w": emas[s].shadow["w"].clone()}) for s in tracked]
    return snaps, emas


def test_reconstructing_a_tracked_profile_gives_it_back():
    snaps, emas = trajectory()
    got = reconstruct(snaps, [0.05, 0.15])
    for s, r in zip((0.05, 0.15), got):
        assert (r["w"] - emas[s].shadow["w"]).abs().max() <= 1e-4


def test_an_untracked_profile_is_recovered_from_the_two_tracked_ones():
    snaps, emas = trajectory()
    direct = emas[0.10].shadow["w"]
    (r,) = reconstruct(snaps, [0.10])
    gap = (emas[0.05].shadow["w"] - direct).abs().max()  # how far the nearest tracked profile is
    assert (r["w"] - direct).abs().max() < 0.02 * gap
    x = solve_weights([t for t, _, _ in snaps], [s for _, s, _ in snaps], 400, 0.10)
    assert x.sum() == pytest.approx(1.0, abs=1e-3)  # an average of averages: the weights sum to one
    with pytest.raises(ValueError, match="saved none"):
        reconstruct([], [0.1])
