"""Post-hoc EMA (Karras et al. 2024, EDM2 §3.2 and App. C.2): training keeps a few power-function EMAs (ldm/ema.py,
`sigma_rel`) and saves snapshots of them now and then; after training, the EMA of any other relative std, at any
snapshot time, is the least-squares combination of those snapshots whose weight profile over the training steps is
closest to the one wanted. Times are counted in EMA updates.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ldm.ema import sigma_rel_to_gamma


def _p_dot_p(t_a, g_a, t_b, g_b):
    """<p_a, p_b>: the inner product of two power-function profiles p(tau) ~ tau^g on [0, t] (EDM2, p_dot_p)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * t_ratio ** t_exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_weights(in_t, in_sigma, out_t, out_sigma) -> np.ndarray:
    """X (snapshots x wanted): snapshot i of profile (in_t_i, in_sigma_i) weighs X_ij in the wanted EMA j, the
    solution of the normal equations A X = B (EDM2, solve_posthoc_coefficients)."""
    in_t, in_sigma = np.broadcast_arrays(np.float64(in_t), np.float64(in_sigma))
    out_t, out_sigma = np.broadcast_arrays(np.float64(out_t), np.float64(out_sigma))
    g_in = np.array([sigma_rel_to_gamma(s) for s in in_sigma.ravel()])
    g_out = np.array([sigma_rel_to_gamma(s) for s in out_sigma.ravel()])
    rows, cols = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
    a = _p_dot_p(rows(in_t.ravel()), rows(g_in), cols(in_t.ravel()), cols(g_in))
    b = _p_dot_p(rows(in_t.ravel()), rows(g_in), cols(out_t.ravel()), cols(g_out))
    return np.nan_to_num(np.linalg.lstsq(a, b, rcond=None)[0])


def combine(states: Iterable[dict[str, torch.Tensor]], weights: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """sum_i weights[i, j] state_i for each column j, in float64, reading the states one at a time (a lazy iterable
    keeps one snapshot of a large model in memory)."""
    out: list[dict] = [{} for _ in range(weights.shape[1])]
    for i, state in enumerate(states):
        for k, v in state.items():
            v = v.double()
            for j, acc in enumerate(out):
                acc[k] = acc[k] + float(weights[i, j]) * v if k in acc else float(weights[i, j]) * v
    return [{k: v.float() for k, v in acc.items()} for acc in out]


def reconstruct(snapshots: list[tuple[int, float, dict[str, torch.Tensor]]], sigma_rels: list[float],
                t_out: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The EMA of each wanted relative std at update t_out (default: the last snapshot's) from `snapshots`, a list
    of (updates, sigma_rel, state dict) of the tracked profiles."""
    if not snapshots:
        raise ValueError("post-hoc EMA needs snapshots of the tracked profiles; the run saved none")
    t_out = max(t for t, _, _ in snapshots) if t_out is None else t_out
    x = solve_weights([t for t, _, _ in snapshots], [s for _, s, _ in snapshots], t_out, list(sigma_rels))
    return combine((state for _, _, state in snapshots), x)
