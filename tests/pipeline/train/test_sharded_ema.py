"""The sharded EMA of ZeRO-3 (pipeline/train/sharded_ema.py) against the whole-model EMA of the same run, on two
real DeepSpeed ranks (gloo on 127.0.0.1)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port
from ldm.ema import EMA
from pipeline.common.errors import CheckpointError
from pipeline.train.sharded_ema import RankZeroEMA, _whole_from_files, own_part


class Net(torch.nn.Module):
    """Parameters of sizes that do not divide by the world size, and a floating-point buffer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 5)
        self.b = torch.nn.Conv2d(5, 3, 3)
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x):
        self.running.add_(0.1)
        return self.b(self.a(x).permute(0, 3, 1, 2)).mean() + self.running.sum() * 0


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from pipeline.train.ldm_loop import full_state, import_deepspeed
    from pipeline.train.sharded_ema import ShardedEMA, build_ema
    deepspeed = import_deepspeed(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    net = Net()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}})
    sharded = build_ema(engine, 3, rank, world, 0.9, None)
    assert isinstance(sharded, ShardedEMA)
    whole = EMA(full_state(engine, 3), 0.9)  # the reference: today's whole-model EMA of the gathered weights
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        loss = engine(torch.randn(2, 6, 6, 7, generator=g))
        engine.backward(loss)
        engine.step()
        sharded.update()
        whole.update(full_state(engine, 3))
    got = sharded.full()
    sharded.save(out)
    if rank == 0:
        assert set(got) == set(whole.shadow)
        torch.save({"sharded": got, "whole": whole.shadow}, os.path.join(out, "compare.pt"))
    # a restart on the same world size reads its own part back; one from a whole ema.pt cuts the same part
    again = ShardedEMA(engine.module, rank, world, 0.9, None)
    again.load(out)
    assert again.num_updates == 4
    assert all(torch.equal(again.shadow[k], sharded.shadow[k]) for k in sharded.shadow)
    cut = ShardedEMA(engine.module, rank, world, 0.9, whole.shadow)
    for k, part in sharded.shadow.items():  # up to DeepSpeed's padding at the end of the last rank's part
        n = max(0, min(part.numel(), whole.shadow[k].numel() - rank * part.numel()))
        assert torch.allclose(cut.shadow[k][:n], part[:n], atol=1e-6), k


def test_sharded_ema_equals_the_whole_models_and_reads_back_at_any_world_size(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = torch.load(tmp_path / "compare.pt")
    for k, v in r["whole"].items():
        assert torch.allclose(r["sharded"][k], v, atol=1e-6), k
    assert not torch.equal(r["whole"]["a.weight"], torch.zeros_like(r["whole"]["a.weight"]))
    # one process (a restart on 1 worker, or ZeRO 0-2) puts the two ranks' files together
    whole = _whole_from_files(str(tmp_path))
    assert whole["num_updates"] == 4
    assert all(torch.allclose(whole["shadow"][k], v, atol=1e-6) for k, v in r["whole"].items())
    one = RankZeroEMA(Net(), 0, 0.9, None)
    one.load(str(tmp_path))
    assert one.num_updates == 4 and torch.allclose(one.full()["b.weight"], r["whole"]["b.weight"], atol=1e-6)
    # a checkpoint with one rank's part missing is refused, naming what is missing
    os.remove(tmp_path / "ema_rank1.pt")
    with pytest.raises(CheckpointError, match="1 of the 2 ranks"):
        _whole_from_files(str(tmp_path))


def test_own_part_pads_the_last_rank():
    w = torch.arange(5.0)
    assert own_part(w, 0, 3).tolist() == [0, 1, 2] and own_part(w, 1, 3).tolist() == [3, 4, 0]
    assert own_part(w, 3, 2).tolist() == [0, 0]
