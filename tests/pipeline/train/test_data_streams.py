"""How the LDM driver fixes a run's number of data streams (pipeline/train/ldm_driver.py data_streams)."""
import json

import pytest

from pipeline.common.errors import DataError
from pipeline.train.kit import RunPlan
from pipeline.train.ldm_driver import data_streams
from pipeline.train.options import TrainOptions


def opts(**kw):
    return TrainOptions(latents="x", **kw)


def plan_with(tmp_path, state: dict | None, phase_start=False):
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir(exist_ok=True)
    if state is not None:
        (ckpt / "train_state.json").write_text(json.dumps(state))
    return RunPlan(str(tmp_path), "run", str(tmp_path), resume_from=str(ckpt) if state is not None else "",
                   phase_start=phase_start)


def test_a_new_run_takes_the_workers_or_the_elastic_ranges_lcm(tmp_path):
    said = []
    assert data_streams(opts(num_workers=3), plan_with(tmp_path, None), said.append) == 3
    assert data_streams(opts(num_workers=4, min_workers=2), plan_with(tmp_path, None), said.append) == 12
    assert "elastic: 2-4 workers share 12 data stream(s)" in said[-1]
    with pytest.raises(DataError, match="--num-workers 2-3 cannot share the run's 4 data stream"):
        data_streams(opts(num_workers=3, min_workers=2, data_streams=4), plan_with(tmp_path, None), said.append)
    assert data_streams(opts(num_workers=2, data_streams=6), plan_with(tmp_path, None), said.append) == 6
    with pytest.raises(DataError, match="--num-workers 4 cannot share the run's 6 data stream"):
        data_streams(opts(num_workers=4, data_streams=6), plan_with(tmp_path, None), said.append)


def test_a_continued_run_keeps_its_streams_on_any_worker_count_that_divides_them(tmp_path):
    said = []
    plan = plan_with(tmp_path, {"world": 2, "data_streams": 2})
    assert data_streams(opts(num_workers=1), plan, said.append) == 2
    assert "continuing a run of 2 worker(s) on 1: its 2 data stream(s), 2 per worker" in said[-1]
    with pytest.raises(DataError, match="--num-workers 3 cannot share the run's 2 data stream.*use 1 or 2 worker"):
        data_streams(opts(num_workers=3), plan, said.append)
    with pytest.raises(ValueError, match="reads 2 data stream.*leave --data-streams out or pass 2"):
        data_streams(opts(num_workers=1, data_streams=4), plan, said.append)
    # a new phase (--resume-from) plans its data afresh
    assert data_streams(opts(num_workers=3), plan_with(tmp_path, {"world": 2, "data_streams": 2}, True),
                        said.append) == 3


def test_num_workers_min_max_parses_into_an_elastic_range():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "jobs"))
    import train_ldm
    o = train_ldm.options(train_ldm.parse(["--latents", "x", "--num-workers", "1-4"]))
    assert (o.min_workers, o.num_workers) == (1, 4)
    o = train_ldm.options(train_ldm.parse(["--latents", "x", "--num-workers", "3"]))
    assert (o.min_workers, o.num_workers) == (0, 3)
    for bad in ("4-2", "0-2", "a-b"):
        with pytest.raises(SystemExit):
            train_ldm.parse(["--latents", "x", "--num-workers", bad])
