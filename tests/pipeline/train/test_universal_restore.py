"""A DeepSpeed checkpoint written by 2 ranks, loaded on 1 (pipeline/train/checkpoints.py load_deepspeed): the
same weights after the same further steps as the 2-rank run, at ZeRO 1 and 3 (real DeepSpeed, gloo on 127.0.0.1)."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port

STEPS_BEFORE, STEPS_AFTER = 3, 2


def _data(step: int) -> torch.Tensor:
    """The global batch of a step: 4 rows, cut into equal rank slices."""
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + step))


def _engine(stage: int, world: int):
    from pipeline.train.checkpoints import harden_deepspeed
    from pipeline.train.ldm_loop import import_deepspeed
    deepspeed = import_deepspeed(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
        "train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}})
    harden_deepspeed(engine)
    return engine


def _steps(engine, rank: int, world: int, steps: range) -> None:
    n = 4 // world
    for s in steps:
        loss = engine(_data(s)[rank * n:(rank + 1) * n]).square().mean()
        engine.backward(loss)
        engine.step()


def _weights(engine, stage: int) -> dict:
    from pipeline.train.ldm_loop import full_state
    return full_state(engine, stage)


def _run(rank: int, world: int, port: int, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from pipeline.train.checkpoints import load_deepspeed, seal
    engine = _engine(stage, world)
    ckpt = os.path.join(out, "ckpt")
    if world == 2:  # the run that writes the checkpoint, then goes on as the reference
        _steps(engine, rank, world, range(STEPS_BEFORE))
        engine.save_checkpoint(ckpt, tag="ds")
        seal(ckpt, rank, world, own=[])
        _steps(engine, rank, world, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
        weights = _weights(engine, stage)
        if rank == 0:
            torch.save(weights, os.path.join(out, "reference.pt"))
        return
    said = []
    load_deepspeed(engine, ckpt, world, said.append)
    _steps(engine, rank, world, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    torch.save(_weights(engine, stage), os.path.join(out, "continued.pt"))
    with open(os.path.join(out, "said.json"), "w") as f:
        json.dump(said, f)


@pytest.mark.parametrize("stage", [1, 3])
def test_a_two_rank_checkpoint_continues_on_one_rank_exactly(stage, tmp_path):
    mp.spawn(_run, args=(2, free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    mp.spawn(_run, args=(1, free_port(), stage, str(tmp_path)), nprocs=1, join=True)
    ref, got = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "continued.pt")
    assert set(ref) == set(got)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), (k, (ref[k] - got[k]).abs().max())
    assert "partitioned for 2 rank(s)" in json.loads((tmp_path / "said.json").read_text())[0]
