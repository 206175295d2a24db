"""The EMA of a DeepSpeed-trained model, kept where its weights are.

ZeRO 0-2 (`RankZeroEMA`): every rank holds the whole model, so rank 0 keeps the whole fp32 average (ldm/ema.py).
ZeRO-3 (`ShardedEMA`): each rank holds one flat partition of every parameter (`p.ds_tensor`) and keeps the fp32
average of that partition only, updated from it with no collective; the whole average is gathered to rank 0 only
when a sample grid, an evaluation or the export needs it. Both save into the checkpoint dir (`ema.pt` from rank 0;
ZeRO-3: `ema_rank{r}.pt` from every rank) and read either form back at any world size. A post-hoc EMA profile
(`sigma_rel`, EDM2) is one more of them under its own file name.
"""
from __future__ import annotations

import glob
import math
import os

import torch
import torch.distributed as dist

from ldm.ema import EMA
from pipeline.common.errors import CheckpointError
from pipeline.train.checkpoints import safe_load

BUCKET = 1 << 24  # fp32 elements per gather (64 MiB): a few collectives for the whole model, bounded memory


def build_ema(engine, zero_stage: int, rank: int, world: int, decay: float, init: dict | None, sigma_rel: float = 0.0):
    """The EMA for this engine: sharded at ZeRO-3, whole on rank 0 below. `init` (a whole state dict) starts the
    average elsewhere than the initial weights (--init-from carries its EMA). `sigma_rel` > 0: a post-hoc EMA
    profile (power function, EDM2), saved as `posthoc_ema_{sigma_rel}`."""
    name = f"posthoc_ema_{sigma_rel:g}" if sigma_rel else "ema"
    if zero_stage == 3:
        return ShardedEMA(engine.module, rank, world, decay, init, sigma_rel, name)
    return RankZeroEMA(engine.module, rank, decay, init, sigma_rel, name)


def _whole_from_files(d: str, name: str = "ema") -> dict:
    """A checkpoint's EMA as one whole EMA state ({'shadow', 'num_updates', ...}), from `ema.pt` or every rank's
    part (`ShardedEMA.save`: the EMA state of its partitions, rank 0's also of the buffers, and each one's shape)."""
    whole = os.path.join(d, f"{name}.pt")
    if os.path.exists(whole):
        return safe_load(whole)
    files = sorted(glob.glob(os.path.join(d, f"{name}_rank*.pt")))
    if not files:
        raise CheckpointError(f"{d} holds no EMA ({name}.pt or {name}_rank*.pt)")
    parts = [safe_load(f) for f in files]
    world = parts[0]["world"]
    if len(parts) != world or sorted(p["rank"] for p in parts) != list(range(world)):
        raise CheckpointError(f"{d} holds {len(parts)} of the {world} ranks' EMA files {name}_rank*.pt: the checkpoint "
                              f"is incomplete; resume from an earlier one")
    parts.sort(key=lambda p: p["rank"])
    shapes = parts[0]["shapes"]
    shadow = {k: torch.cat([p["shadow"][k] for p in parts])[:math.prod(shape)].view(shape)
              for k, shape in shapes.items()}
    shadow.update({k: v for k, v in parts[0]["shadow"].items() if k not in shapes})  # the buffers
    return {**{k: parts[0][k] for k in ("num_updates", "max_decay", "warmup", "sigma_rel") if k in parts[0]},
            "shadow": shadow}


class RankZeroEMA:
    """ZeRO 0-2: rank 0 averages the whole (replicated) model; other ranks hold nothing."""

    def __init__(self, module: torch.nn.Module, rank: int, decay: float, init: dict | None, sigma_rel: float = 0.0,
                 name: str = "ema"):
        self.module, self.rank, self.name = module, rank, name
        self.ema = EMA(init if init is not None else module.state_dict(), decay, sigma_rel=sigma_rel) \
            if rank == 0 else None
        if self.ema is not None:
            self.ema.to(next(module.parameters()).device)

    @property
    def num_updates(self) -> int:
        return self.ema.num_updates if self.ema is not None else 0

    def update(self) -> None:
        if self.ema is not None:
            self.ema.update(self.module.state_dict())

    def full(self) -> dict[str, torch.Tensor] | None:
        """The whole average on rank 0, None elsewhere."""
        return self.ema.shadow if self.ema is not None else None

    def save(self, d: str) -> None:
        if self.ema is not None:
            torch.save(self.ema.state_dict(), os.path.join(d, f"{self.name}.pt"))

    def load(self, d: str) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(_whole_from_files(d, self.name))


class ShardedEMA:
    """ZeRO-3: the EMA (ldm/ema.py) of this rank's partition of every parameter, and on rank 0 of the buffers."""

    def __init__(self, module: torch.nn.Module, rank: int, world: int, decay: float, init: dict | None,
                 sigma_rel: float = 0.0, name: str = "ema"):
        self.rank, self.world, self.name = rank, world, name
        self.params = dict(module.named_parameters())
        # buffers are replicated, not partitioned: rank 0 averages them whole
        self.buffers = ({k: v for k, v in module.state_dict().items() if k not in self.params and v.is_floating_point()}
                        if rank == 0 else {})
        self.ema = EMA(self._own_state(init) if init is not None else self._current(), decay, sigma_rel=sigma_rel)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return self.ema.shadow

    @property
    def num_updates(self) -> int:
        return self.ema.num_updates

    def _current(self) -> dict[str, torch.Tensor]:
        return {**{k: p.ds_tensor for k, p in self.params.items()}, **self.buffers}

    def _own_state(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a whole state dict: each parameter cut as DeepSpeed cuts it (flat, padded to world x
        size), the buffers whole."""
        own = {}
        for k, p in self.params.items():
            part = p.ds_tensor
            own[k] = own_part(whole[k], self.rank, part.numel()).to(part.device)
        return {**own, **{k: whole[k] for k in self.buffers}}

    def update(self) -> None:
        self.ema.update(self._current())  # this rank's partitions only: no collective

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor] | None:
        """The whole average on rank 0 (None elsewhere): a gather every rank joins, in buckets of partitions."""
        names = list(self.params)
        out: dict[str, torch.Tensor] = {}
        i = 0
        while i < len(names):
            bucket, size = [], 0
            while i < len(names) and (not bucket or size + self.shadow[names[i]].numel() <= BUCKET):
                bucket.append(names[i])
                size += self.shadow[names[i]].numel()
                i += 1
            flat = torch.cat([self.shadow[k] for k in bucket])
            got = [torch.empty_like(flat) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(flat, got, dst=0)
            if self.rank == 0:
                self._unpack(bucket, got, out)
        if self.rank != 0:
            return None
        out.update({k: self.shadow[k] for k in self.buffers})
        return out

    def _unpack(self, bucket: list[str], got: list[torch.Tensor], out: dict) -> None:
        offset = 0
        for k in bucket:
            n = self.shadow[k].numel()
            p = self.params[k]
            out[k] = torch.cat([g[offset:offset + n] for g in got])[:p.ds_numel].view(p.ds_shape).cpu()
            offset += n

    def save(self, d: str) -> None:
        torch.save({"rank": self.rank, "world": self.world, **self.ema.state_dict(),
                    "shapes": {k: tuple(p.ds_shape) for k, p in self.params.items()}},
                   os.path.join(d, f"{self.name}_rank{self.rank}.pt"))

    def load(self, d: str) -> None:
        """This rank's part: its own file when the world size is the checkpoint's, else cut from the whole."""
        mine = os.path.join(d, f"{self.name}_rank{self.rank}.pt")
        state = safe_load(mine) if os.path.exists(mine) else None
        if state is None or state["world"] != self.world:
            whole = _whole_from_files(d, self.name)
            _check_keys(set(self.shadow), whole["shadow"], d)
            state = {**whole, "shadow": self._own_state(whole["shadow"])}
        _check_keys(set(self.shadow), state["shadow"], d)
        self.ema.load_state_dict(state)


def _check_keys(wanted: set, got: dict, d: str) -> None:
    missing = wanted - set(got)
    if missing:
        raise CheckpointError(f"the EMA in {d} lacks {sorted(missing)[:5]}: it was written for another model")


def own_part(whole: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Elements [rank x size, (rank + 1) x size) of the flattened tensor, zero-padded past its end."""
    flat = whole.detach().reshape(-1).float()
    part = torch.zeros(size, dtype=torch.float32)
    lo, hi = min(rank * size, flat.numel()), min((rank + 1) * size, flat.numel())
    part[:hi - lo] = flat[lo:hi]
    return part
