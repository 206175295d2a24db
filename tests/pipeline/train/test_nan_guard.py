"""The non-finite rule of the LDM loop (pipeline/train/ldm_loop.py NanGuard), counted in optimizer steps."""
import math

import pytest
import torch
import torch.distributed as dist

from helpers import free_port
from pipeline.common.errors import NonFiniteLoss
from pipeline.train.ldm_loop import NanGuard


class Log:
    def __init__(self):
        self.lines, self.metrics = [], []

    def say(self, msg):
        self.lines.append(msg)

    def metric(self, key, value, step):
        self.metrics.append((key, value, step))

    def flush(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def guard(tolerance, grad_accum):
    log = Log()
    w = type("W", (), {"say": log.say, "tracker": log})()
    state = {"step": 0, "skipped_steps": 0}
    return NanGuard(tolerance, grad_accum, state, w), state, log


NAN, OK = torch.tensor(math.nan), torch.tensor(1.0)


def test_grad_accum_counts_set_aside_micro_batches_in_optimizer_steps():
    g, state, log = guard(tolerance=3, grad_accum=2)
    # one bad micro-batch in a step: set aside, replaced, the step applied -> one skipped step, not one per batch
    assert [g.finite(x) for x in (NAN, OK, OK)] == [False, True, True] and g.applied(True)
    assert state["skipped_steps"] == 1 and g.in_a_row == 0
    # two bad micro-batches = one step's worth (grad_accum 2) -> one more skipped step
    assert [g.finite(x) for x in (NAN, NAN, OK, OK)] == [False, False, True, True] and g.applied(True)
    assert state["skipped_steps"] == 2
    # a step DeepSpeed does not apply (non-finite gradients) counts one
    assert not g.applied(False) and state["skipped_steps"] == 3 and g.in_a_row == 1
    assert log.metrics[-1] == ("skipped_steps", 3, 0)


def test_the_limit_raises_with_the_way_out():
    g, state, _ = guard(tolerance=2, grad_accum=2)
    g.finite(NAN)
    g.finite(NAN)
    with pytest.raises(NonFiniteLoss, match="2 non-finite losses in a row .*--nan-tolerance 2.*--resume"):
        g.finite(NAN)
    g, state, _ = guard(tolerance=2, grad_accum=1)
    g.applied(False)
    with pytest.raises(NonFiniteLoss, match="non-finite gradient steps in a row"):
        g.applied(False)
