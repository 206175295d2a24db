"""The training rows' order, decided up front, and a data position that seeks instead of re-reading.

An epoch's plan is a pure function of (seed, epoch, world size, batch size, the units' row counts), a unit being
one source shard's rows in key order (`KeyOrderedUnits`: however the encode job happened to cut them into parts):
- the cache's units in a seeded order, their rows laid end to end and cut into `world` equal ranges of whole
  batches, one per rank (the few rows past the last whole batch sit out this epoch only);
- a rank's range is a list of slices (unit, first row, end row), grouped into windows of whole slices holding at
  least `shuffle_rows` rows; each window's rows are shuffled by a permutation seeded by (seed, epoch, rank, window).
So two encodes of the same shards train on the same rows in the same order: one seed, one model.
The plan's "ranks" are data streams (`Streams`): a run fixes their number once, and a worker hosts an equal share
of them, so a run that continues on another number of workers reads the same rows in the same global batches.
Every stream consumes one batch per micro-step, so the data position, (epoch, batches consumed), is the same for
all streams: a restart finds the window it stopped in and reads from there, the same rows in the same order as an
uninterrupted run, having re-read at most that one window. Ray Data still does the reading (`RayDataParts`); the
plan only decides what it reads and in what order.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.common.errors import DataError


@dataclass(frozen=True)
class Slice:
    part: int                            # what the reader reads whole: a unit of the cache (a shard's parts)
    start: int                           # first row of the part this rank reads
    stop: int                            # one past its last

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_slices(rows: Sequence[int], world: int, rank: int, epoch: int, seed: int, batch_size: int) -> list[Slice]:
    """The slices of the parts that `rank` reads in `epoch`: its equal share of the seeded part order."""
    share = sum(rows) // world
    take = share // batch_size * batch_size
    if take == 0:
        raise DataError(f"the cache's {sum(rows)} rows give each of {world} worker(s) {share} rows, less than one "
                        f"batch of {batch_size}: lower --batch-size or --num-workers, or add data")
    lo, hi = rank * share, rank * share + take
    out, at = [], 0
    for p in np.random.default_rng([seed, epoch]).permutation(len(rows)):
        a, b = max(lo, at), min(hi, at + rows[p])
        if a < b:
            out.append(Slice(int(p), a - at, b - at))
        at += rows[p]
        if at >= hi:
            break
    return out


def windows(slices: list[Slice], shuffle_rows: int) -> list[list[Slice]]:
    """Consecutive slices grouped until each group holds at least `shuffle_rows` rows (the last may hold fewer)."""
    out, cur, n = [], [], 0
    for s in slices:
        cur.append(s)
        n += s.rows
        if n >= shuffle_rows:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def window_order(n: int, seed: int, epoch: int, rank: int, index: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, rank, index]).permutation(n)


def seek(plan: list[list[Slice]], consumed: int) -> tuple[int, int]:
    """(window, row in it) of the `consumed`-th row of a rank's epoch."""
    at = 0
    for i, win in enumerate(plan):
        n = sum(s.rows for s in win)
        if consumed < at + n:
            return i, consumed - at
        at += n
    raise DataError(f"the data position ({consumed} rows into the epoch) is past this epoch's {at} rows: the cache "
                    f"or --batch-size / --num-workers changed since the checkpoint")


def to_tensors(table: pa.Table) -> dict:
    """A pyarrow batch as the (B, D) / (B,) torch tensors a training step takes (fixed-size lists flattened)."""
    import torch
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            arr = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        elif pa.types.is_list(col.type):  # a bucketed cache's latents: one bucket per batch, so rows of one length
            arr = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        else:
            arr = col.to_numpy(zero_copy_only=False)
        out[name] = torch.from_numpy(np.require(arr, requirements=["C", "W"]))
    return out


class RayDataParts:
    """Whole parts, in the order asked, read by Ray Data (a read task per part: pipeline/cache/reader.py
    parts_datasource; order preserved, no progress bars), split back into parts by the manifest's row counts; with
    `keep`, each part read is kept in this process and later epochs read no file again."""

    def __init__(self, files: Sequence[str], rows: Sequence[int], columns: Sequence[str], keep: bool = False,
                 row_filter=None, filtered_rows: Sequence[int] | None = None, rename: dict | None = None,
                 read_cpus: float = 1.0):
        self.files, self.rows, self.columns, self.keep = list(files), list(rows), list(columns), keep
        self.read_cpus = read_cpus       # CPUs each Ray Data read task asks for
        self.rename = rename or {}  # cache column -> the name a step reads it by (another resolution's latents)
        # --filter (pipeline/train/row_filter.py): a part's rows that pass, `filtered_rows[p]` of them
        self.filter, self.filtered_rows = row_filter, list(filtered_rows) if filtered_rows is not None else None
        self.kept: dict[int, pa.Table] = {}
        self.parts_read = 0              # parts this process read from storage (not from `kept`)

    def __call__(self, parts: list[int]) -> Iterator[pa.Table]:
        stream = self._read([p for p in parts if p not in self.kept])
        for p in parts:
            table = self.kept.get(p)
            if table is None:
                table = self._filtered(p, next(stream))
                if self.keep:
                    self.kept[p] = table
            yield table

    def _filtered(self, p: int, table: pa.Table) -> pa.Table:
        if self.filter:
            table = table.filter(pa.array(self.filter.mask(table))).select(self.columns)
        if self.rename:
            table = table.rename_columns([self.rename.get(c, c) for c in table.column_names])
        if not self.filter:
            return table
        if len(table) != self.filtered_rows[p]:
            raise DataError(f"--filter {self.filter} keeps {len(table)} rows of {self.files[p]}, not the "
                            f"{self.filtered_rows[p]} counted before the run: the cache changed under the run; "
                            f"restart it")
        return table

    def _read(self, parts: list[int]) -> Iterator[pa.Table]:
        if not parts:
            return
        import ray.data

        from pipeline.cache.reader import parts_datasource
        from pipeline.common.runtime import training_stream_context
        columns = self.columns + [c for c in (self.filter.columns if self.filter else []) if c not in self.columns]
        with training_stream_context(preserve_order=True):
            ds = ray.data.read_datasource(parts_datasource([self.files[p] for p in parts],
                                                           [self.rows[p] for p in parts], columns),
                                          override_num_blocks=len(parts), ray_remote_args={"num_cpus": self.read_cpus})
        k, pending, have = 0, [], 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            while len(block):
                if k == len(parts):
                    raise DataError(f"the cache's parts hold more rows than its manifest says (past "
                                    f"{self.files[parts[-1]]}): the cache changed under the run; restart it")
                want = self.rows[parts[k]] - have
                pending.append(block.slice(0, want))
                have += min(want, len(block))
                block = block.slice(want)
                if have == self.rows[parts[k]]:
                    self.parts_read += 1
                    yield pa.concat_tables(pending)
                    k, pending, have = k + 1, [], 0
        if k < len(parts):
            raise DataError(f"{self.files[parts[k]]} holds fewer rows than the cache's manifest says "
                            f"({self.rows[parts[k]]}): the cache changed under the run; re-encode it")


class KeyOrderedUnits:
    """Units of parts (a shard's), each read as one table with its rows in key order: what the plan orders, cuts
    and shuffles. How the encode job cut a shard into parts depends on how Ray Data batched its rows (and part
    names carry a run id), so a plan over parts would differ between two encodes of the same shards; over key-ordered
    shards, one seed gives one order of the rows, and one model."""

    def __init__(self, reader, units: Sequence[Sequence[int]], drop_key: bool = True):
        self.reader, self.units, self.drop_key = reader, [list(u) for u in units], drop_key

    @property
    def parts_read(self) -> int:
        return self.reader.parts_read

    def __call__(self, units: list[int]) -> Iterator[pa.Table]:
        import pyarrow.compute as pc
        tables = self.reader([p for u in units for p in self.units[u]])
        for u in units:
            table = pa.concat_tables([next(tables) for _ in self.units[u]])
            table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))  # a stable sort
            yield table.drop_columns(["key"]) if self.drop_key else table


class PlannedBatches:
    """A rank's endless batches, epoch after epoch, in the plan's order; `state["epoch"]` and
    `state["batch_in_epoch"]` are the data position a checkpoint keeps, and a restored one is sought, not
    replayed. `reader(parts)` yields the whole parts' tables in that order (RayDataParts)."""

    def __init__(self, reader, rows: Sequence[int], world: int, rank: int, batch_size: int, shuffle_rows: int,
                 seed: int, log=lambda _msg: None):
        self.reader, self.rows, self.world, self.rank = reader, list(rows), world, rank
        self.batch_size, self.shuffle_rows, self.seed, self.log = batch_size, max(1, shuffle_rows), seed, log
        self.epochs = 0                  # epochs begun (or resumed) by this process

    def plan(self, epoch: int) -> list[list[Slice]]:
        return windows(rank_slices(self.rows, self.world, self.rank, epoch, self.seed, self.batch_size),
                       self.shuffle_rows)

    def tables(self, state: dict) -> Iterator[pa.Table]:
        epoch, skip, b = state["epoch"], state["batch_in_epoch"], self.batch_size
        while True:
            plan = self.plan(epoch)
            if skip and skip * b == sum(s.rows for win in plan for s in win):  # stopped at the epoch's end
                epoch, skip = epoch + 1, 0
                continue
            first, offset = seek(plan, skip * b)
            if skip:
                units = len(plan[first])
                self.log(f"data position: epoch {epoch}, batch {skip}: reading from window {first + 1} of "
                         f"{len(plan)} (its {units} shard(s), {offset} of its rows already trained on)")
            state["epoch"], state["batch_in_epoch"] = epoch, skip
            self.epochs += 1
            todo = plan[first:]
            tables = self.reader([s.part for win in todo for s in win])
            buf = None
            for i, win in enumerate(todo, start=first):
                rows = pa.concat_tables([next(tables).slice(s.start, s.rows) for s in win])
                rows = rows.take(window_order(len(rows), self.seed, epoch, self.rank, i))
                if i == first and offset:
                    rows = rows.slice(offset)
                buf = rows if buf is None else pa.concat_tables([buf, rows])
                while len(buf) >= b:
                    batch, buf = buf.slice(0, b), buf.slice(b)
                    state["batch_in_epoch"] += 1
                    yield batch
            epoch, skip = epoch + 1, 0

    def __call__(self, state: dict) -> Iterator[dict]:
        for table in self.tables(state):
            yield to_tensors(table)


class BucketedBatches:
    """PlannedBatches for a cache of aspect buckets (each part holds one bucket): every batch is drawn from one
    bucket, the same bucket on every rank at every step. An epoch plans each bucket as above (its parts, its equal
    per-rank shares, windows, seeded shuffles; a bucket holding less than a batch per rank sits the epoch out), then
    interleaves the buckets' batches in an order seeded by (seed, epoch): the same on every rank, and the data
    position (epoch, batches consumed) still says where each bucket's stream stands. Windows are read one at a
    time, as a bucket's stream reaches them."""

    def __init__(self, reader, rows: Sequence[int], buckets: Sequence[tuple[int, int]], world: int, rank: int,
                 batch_size: int, shuffle_rows: int, seed: int, log=lambda _msg: None):
        self.reader, self.rows, self.world, self.rank = reader, list(rows), world, rank
        self.batch_size, self.shuffle_rows, self.seed, self.log = batch_size, max(1, shuffle_rows), seed, log
        self.parts: dict[tuple[int, int], list[int]] = {}
        for p, b in enumerate(buckets):
            self.parts.setdefault(tuple(b), []).append(p)
        self.buckets = sorted(self.parts)
        self.epochs = 0
        left_out = [b for b in self.buckets if sum(self.rows[p] for p in self.parts[b]) // world < batch_size]
        if len(left_out) == len(self.buckets):
            raise DataError(f"no aspect bucket holds a batch of {batch_size} for each of {world} worker(s) (rows per "
                            f"bucket: {self.sizes()}): lower --batch-size or --num-workers, or add data")
        if left_out:
            log(f"aspect buckets {', '.join(f'{h}x{w}' for h, w in left_out)} hold less than a batch per worker and "
                f"sit every epoch out")
        self.active = [b for b in self.buckets if b not in left_out]

    def sizes(self) -> dict[str, int]:
        return {f"{h}x{w}": sum(self.rows[p] for p in self.parts[(h, w)]) for h, w in self.buckets}

    def plan(self, epoch: int) -> tuple[list[int], list[list[list[Slice]]]]:
        """(the bucket index of each batch of the epoch, each active bucket's windows of slices into its parts)."""
        plans, order = [], []
        for i, b in enumerate(self.active):
            parts = self.parts[b]
            sl = rank_slices([self.rows[p] for p in parts], self.world, self.rank, epoch, self.seed * 7919 + i,
                             self.batch_size)
            plans.append(windows([Slice(parts[s.part], s.start, s.stop) for s in sl], self.shuffle_rows))
            order += [i] * (sum(s.rows for s in sl) // self.batch_size)
        return list(np.random.default_rng([self.seed, epoch, 1]).permutation(np.array(order, np.int64))), plans

    def _stream(self, plan: list[list[Slice]], skip_rows: int, epoch: int, index: int) -> Iterator[pa.Table]:
        """One bucket's batches in this epoch, after its first `skip_rows` rows."""
        first, offset = seek(plan, skip_rows) if skip_rows < sum(s.rows for w in plan for s in w) else (len(plan), 0)
        buf = None
        for i in range(first, len(plan)):
            win = plan[i]
            tables = list(self.reader([s.part for s in win]))
            rows = pa.concat_tables([t.slice(s.start, s.rows) for t, s in zip(tables, win)])
            rows = rows.take(window_order(len(rows), self.seed, epoch, self.rank, index * 100_003 + i))
            if i == first and offset:
                rows = rows.slice(offset)
            buf = rows if buf is None else pa.concat_tables([buf, rows])
            while len(buf) >= self.batch_size:
                batch, buf = buf.slice(0, self.batch_size), buf.slice(self.batch_size)
                yield batch

    def tables(self, state: dict) -> Iterator[tuple[pa.Table, tuple[int, int]]]:
        epoch, skip = state["epoch"], state["batch_in_epoch"]
        while True:
            order, plans = self.plan(epoch)
            if skip and skip == len(order):  # stopped at the epoch's end
                epoch, skip = epoch + 1, 0
                continue
            if skip > len(order):
                raise DataError(f"the data position (batch {skip} of epoch {epoch}) is past this epoch's {len(order)} "
                                f"batches: the cache or --batch-size / --num-workers changed since the checkpoint")
            done = np.bincount(np.asarray(order[:skip], np.int64), minlength=len(plans))
            if skip:
                self.log(f"data position: epoch {epoch}, batch {skip}: each bucket's stream sought to its own "
                         f"position ({', '.join(f'{h}x{w}: {n}' for (h, w), n in zip(self.active, done))} batches)")
            state["epoch"], state["batch_in_epoch"] = epoch, skip
            self.epochs += 1
            streams = [self._stream(plans[i], int(done[i]) * self.batch_size, epoch, i) for i in range(len(plans))]
            for i in order[skip:]:
                state["batch_in_epoch"] += 1
                yield next(streams[i]), self.active[i]
            epoch, skip = epoch + 1, 0

    def __call__(self, state: dict) -> Iterator[dict]:
        import torch
        for table, (h, w) in self.tables(state):
            batch = to_tensors(table)
            batch["target_h"] = torch.full((len(table),), h, dtype=torch.int32)  # the bucket's size in pixels
            batch["target_w"] = torch.full((len(table),), w, dtype=torch.int32)
            yield batch


def hosted_streams(streams: int, world: int, rank: int) -> list[int]:
    """The data streams worker `rank` of `world` hosts: an equal, consecutive share."""
    if streams % world:
        raise DataError(f"{world} worker(s) cannot share {streams} data stream(s) equally: use a number of "
                        f"workers that divides {streams}")
    k = streams // world
    return list(range(rank * k, rank * k + k))


class Streams:
    """The data streams a worker hosts (rank r of `world` hosts streams r x k .. r x k + k - 1, k = streams / world),
    read together: each micro-step yields one batch of every hosted stream, as (stream, batch) pairs. `make(stream)`
    builds one stream's batches (PlannedBatches or BucketedBatches planned over `streams` ranks)."""

    def __init__(self, make, streams: int, world: int, rank: int):
        self.ids = hosted_streams(streams, world, rank)
        self.sources = [make(s) for s in self.ids]

    @property
    def reader(self):
        return self.sources[0].reader

    @property
    def epochs(self) -> int:
        return self.sources[0].epochs

    def __call__(self, state: dict) -> Iterator[list[tuple[int, dict]]]:
        own = [dict(state) for _ in self.sources]  # each stream moves its own copy; they stay equal
        for batches in zip(*(src(st) for src, st in zip(self.sources, own))):
            state["epoch"], state["batch_in_epoch"] = own[0]["epoch"], own[0]["batch_in_epoch"]
            yield list(zip(self.ids, batches))
