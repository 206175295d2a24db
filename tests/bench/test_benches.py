"""Every benchmark runs at its tiny size (--tiny) and ends with its figures as name=value lines, so none rots unseen;
the figures of a tiny run say nothing, only that every part of the bench runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {  # each bench and the figures it must print
    "autocast_step": ("autocast_over_fp32", "forward_relative_difference"),
    "buckets": ("buckets_over_square", "phase2_samples_per_s"),
    "encode_scale": ("commit_ms_1000_shards", "commit_ms_50000_shards", "driver_side_us_per_row"),
    "objective_study": ("fd_eps", "fd_flow", "agreement_flow", "posthoc_best_sigma_rel"),
    "encode_throughput": ("job_over_loop_1x", "job_memory_2x_over_1x"),
    "inpaint_cost": ("encode_time_ratio", "train_time_encoding_step_share"),
    "memory_plan": ("tiny_total_gib", "plan_over_measured"),
    "mfu": ("samples_per_s", "images_per_s"),
    "train_throughput": ("kept_over_in_memory", "worker_over_bare", "ours_over_diffusers"),
    "unet_step": ("ours_over_diffusers", "forward_relative_difference"),
    "zero3_ema": ("ema_step_ratio", "ema_memory_ratio", "ckpt_step_ratio", "ckpt_memory_ratio"),
}


def test_every_bench_is_run_here():
    assert {p.stem for p in (ROOT / "bench").glob("*.py")} - {"matched"} == set(FIGURES)


@pytest.mark.parametrize("bench", sorted(FIGURES))
def test_bench_runs_at_its_tiny_size(bench):
    before = {p.name for p in ROOT.iterdir()}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), "--tiny"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in FIGURES[bench]:
        assert re.search(rf"(^|\s){name}=[-\d.e+x']", r.stdout, re.M), f"{bench} printed no {name}=: {r.stdout[-2000:]}"
    # nothing left in the checkout (a later `ray job submit --working-dir` would upload it)
    assert {p.name for p in ROOT.iterdir()} <= before, {p.name for p in ROOT.iterdir()} - before
