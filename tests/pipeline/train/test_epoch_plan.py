"""The planned epoch order: each rank an equal, disjoint share of whole batches, a restart that seeks (the same
rows in the same order as an uninterrupted run, re-reading one window), and Ray Data reading whole parts back in
the order asked."""
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.common.errors import DataError
from pipeline.train.epoch_plan import (BucketedBatches, PlannedBatches, RayDataParts, Streams, rank_slices, seek,
                                       windows)

ROWS = [37, 50, 13, 64, 41, 29, 50, 8]  # uneven parts, as a real cache's are


def part_tables(rows=ROWS):
    """Part p's row i has key p * 1000 + i."""
    return [pa.table({"key": np.arange(n, dtype=np.int64) + p * 1000,
                      "latent_mean": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.arange(n * 4, dtype=np.float16)), 4)}) for p, n in enumerate(rows)]


class CountingReader:
    def __init__(self, tables):
        self.tables, self.parts_read = tables, 0

    def __call__(self, parts):
        for p in parts:
            self.parts_read += 1
            yield self.tables[p]


def keys(batches, n):
    return [b["key"].tolist() for b in itertools.islice(batches, n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_gives_every_rank_an_equal_disjoint_share(world):
    b = 8
    seen = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sl = rank_slices(ROWS, world, rank, epoch, seed=3, batch_size=b)
            per_rank.append([(s.part, r) for s in sl for r in range(s.start, s.stop)])
        assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) % b == 0
        every = [x for r in per_rank for x in r]
        assert len(every) == len(set(every)) > sum(ROWS) - world * b  # disjoint; only a partial batch per rank left
        seen.append(per_rank)
    assert seen[0] != seen[1]  # a new order every epoch ...
    assert rank_slices(ROWS, world, 0, 1, 3, b) == rank_slices(ROWS, world, 0, 1, 3, b)  # ... decided by the seed


def test_windows_hold_whole_slices_and_seek_finds_the_row():
    sl = rank_slices(ROWS, 1, 0, 0, seed=0, batch_size=4)
    plan = windows(sl, 60)
    assert [s for w in plan for s in w] == sl
    assert all(sum(s.rows for s in w) >= 60 for w in plan[:-1])
    n0 = sum(s.rows for s in plan[0])
    assert seek(plan, 0) == (0, 0) and seek(plan, n0 + 5) == (1, 5)
    with pytest.raises(DataError, match="past this epoch"):
        seek(plan, sum(ROWS) + 1)


@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_the_same_rows_in_the_same_order_reading_one_window(world):
    tables = part_tables()
    for stop in (3, 11, 17, 18):  # mid-window, across an epoch boundary, at it (36 batches of 8 per epoch / world)
        for rank in range(world):
            straight = keys(PlannedBatches(CountingReader(tables), ROWS, world, rank, 8, 40, seed=5)(
                {"epoch": 0, "batch_in_epoch": 0}), 40)
            state = {"epoch": 0, "batch_in_epoch": 0}
            first = keys(PlannedBatches(CountingReader(tables), ROWS, world, rank, 8, 40, seed=5)(state), stop)
            saved = dict(state)  # the position a checkpoint after `stop` batches holds
            reader = CountingReader(tables)
            rest = PlannedBatches(reader, ROWS, world, rank, 8, 40, seed=5)(saved)
            after = keys(rest, 1)
            assert first + after == straight[:stop + 1]
            assert reader.parts_read <= 3  # the window it stopped in (>= 40 rows of whole parts), not the epoch
            assert first + after + keys(rest, 40 - stop - 1) == straight
    # each of two epochs holds every row at most once, all but a partial batch of them, reshuffled
    e = keys(PlannedBatches(CountingReader(tables), ROWS, 1, 0, 8, 40, seed=5)({"epoch": 0, "batch_in_epoch": 0}),
             2 * (sum(ROWS) // 8))
    half = len(e) // 2
    a, b = sum(e[:half], []), sum(e[half:], [])
    assert len(set(a)) == len(a) == len(set(b)) > sum(ROWS) - 8
    assert len(set(a) & set(b)) > sum(ROWS) - 16 and a != b


def test_ray_data_reads_whole_parts_in_the_order_asked(ray_local, tmp_path):
    tables = part_tables()
    files = []
    for p, t in enumerate(tables):
        files.append(str(tmp_path / f"part-{p}.parquet"))
        pq.write_table(t, files[-1], row_group_size=16)  # several row groups: blocks do not match parts
    order = [5, 0, 7, 3, 1]
    reader = RayDataParts(files, ROWS, ["key", "latent_mean"], keep=True)
    got = list(reader(order))
    assert [t["key"].to_pylist() for t in got] == [tables[p]["key"].to_pylist() for p in order]
    assert reader.parts_read == 5
    again = list(reader([1, 2, 5]))  # kept parts are not read again
    assert [t["key"].to_pylist() for t in again] == [tables[p]["key"].to_pylist() for p in (1, 2, 5)]
    assert reader.parts_read == 6
    short = RayDataParts(files, [n + 1 if p == 3 else n for p, n in enumerate(ROWS)], ["key"])
    with pytest.raises(DataError, match="part-3.parquet holds fewer rows"):
        list(short([3]))


BUCKETS = [(16, 16), (12, 20), (16, 16), (20, 12), (12, 20), (16, 16), (20, 12), (12, 20)]  # one per part


@pytest.mark.parametrize("world", [1, 2])
def test_bucketed_epochs_draw_each_batch_from_one_bucket_the_same_on_every_rank(world):
    tables = part_tables()
    b = 4

    def run(rank, state, n):
        got = []
        for batch in itertools.islice(BucketedBatches(CountingReader(tables), ROWS, BUCKETS, world, rank, b, 20,
                                                      seed=2)(state), n):
            parts = {k // 1000 for k in batch["key"].tolist()}
            assert len({BUCKETS[p] for p in parts}) == 1  # one bucket per batch ...
            assert {(batch["target_h"][0].item(), batch["target_w"][0].item())} == {BUCKETS[min(parts)]}
            got.append(batch["key"].tolist())
        return got

    per_epoch = sum(sum(ROWS[p] for p in range(8) if BUCKETS[p] == k) // world // b for k in set(BUCKETS))
    epochs = {r: run(r, {"epoch": 0, "batch_in_epoch": 0}, 2 * per_epoch) for r in range(world)}
    for r in range(world):  # ... the same bucket at every step on every rank
        assert [BUCKETS[e[0] // 1000] for e in epochs[r]] == [BUCKETS[e[0] // 1000] for e in epochs[0]]
    for half in (slice(0, per_epoch), slice(per_epoch, 2 * per_epoch)):  # an epoch sees each row at most once,
        rows = [k for r in range(world) for e in epochs[r][half] for k in e]  # all but < a batch per rank and bucket
        assert len(rows) == len(set(rows)) > sum(ROWS) - world * b * len(set(BUCKETS))
    assert epochs[0][:per_epoch] != epochs[0][per_epoch:]
    for stop in (1, 7, per_epoch - 1, per_epoch, per_epoch + 3):  # a restart seeks, the same batches follow
        state = {"epoch": 0, "batch_in_epoch": 0}
        run(0, state, stop)
        assert run(0, dict(state), 5) == epochs[0][stop:stop + 5]


def test_a_bucket_without_a_batch_per_worker_sits_out():
    lines = []
    bb = BucketedBatches(CountingReader(part_tables()), ROWS, BUCKETS, 2, 0, 40, 20, seed=0, log=lines.append)
    assert bb.active == [(12, 20), (20, 12)] and "16x16 hold less than a batch per worker" in lines[0]  # 79 rows
    with pytest.raises(DataError, match="no aspect bucket holds a batch of 90"):
        BucketedBatches(CountingReader(part_tables()), ROWS, BUCKETS, 2, 0, 90, 20, seed=0)


@pytest.mark.parametrize("bucketed", [False, True])
def test_four_streams_give_the_same_global_batches_on_four_two_or_one_workers(bucketed):
    """Each micro-step's (stream, rows) over all workers are the same whatever the number of workers hosting the
    streams, and so is the data position a checkpoint keeps; a restart on another number of workers goes on alike."""
    tables, streams = part_tables(), 4

    def make(stream):
        if bucketed:
            return BucketedBatches(CountingReader(tables), ROWS, BUCKETS, streams, stream, 4, 20, seed=1)
        return PlannedBatches(CountingReader(tables), ROWS, streams, stream, 4, 20, seed=1)

    def global_steps(world, state, n):
        per_rank = []
        for rank in range(world):
            st = dict(state)
            got = list(itertools.islice(Streams(make, streams, world, rank)(st), n))
            per_rank.append(got)
        state.update(st)  # every rank's position is the same
        return [sorted((s, b["key"].tolist()) for r in per_rank for s, b in r[i]) for i in range(n)]

    straight = global_steps(4, {"epoch": 0, "batch_in_epoch": 0}, 30)
    assert [len(step) for step in straight] == [4] * 30
    for world in (2, 1):
        assert global_steps(world, {"epoch": 0, "batch_in_epoch": 0}, 30) == straight
    state = {"epoch": 0, "batch_in_epoch": 0}
    first = global_steps(4, state, 11)  # 4 workers, then the run continues on 1
    assert first + global_steps(1, dict(state), 19) == straight
    with pytest.raises(DataError, match="3 worker.s. cannot share 4 data stream"):
        Streams(make, streams, 3, 0)


def test_two_encodes_cut_into_other_parts_train_on_the_same_rows_in_the_same_order(tiny_cache, tmp_path):
    """The plan orders key-ordered shards, not parts: a second encode of the same shards written in 16-row parts
    (the first wrote one part per shard) gives every rank the same rows in the same order, epoch after epoch."""
    from pathlib import Path
    from types import SimpleNamespace

    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    from pipeline.cache.reader import part_files, part_rows, part_units, read_manifest
    from pipeline.train.ldm_driver import units_of
    from pipeline.train.ldm_loop import TrainData
    other = str(tmp_path / "latents")
    run_encode(EncodeOptions(input=str(Path(tiny_cache).parent / "shards"), output=other, autoencoder="random:tiny",
                             preprocess=PreprocessConfig(resolution=16), max_length=16, batch_size=16,
                             write_batch_size=16))

    def order(cache, by_unit=True):
        m = read_manifest(cache)
        td = TrainData(tuple(part_files(cache, m)), tuple(part_rows(cache, m)), ("key", "label"), False,
                       units=units_of(part_units(m)) if by_unit else ())
        out = []
        for rank in (0, 1):
            data = td.batches(SimpleNamespace(batch_size=8, shuffle_buffer=100, seed=5, data_streams=2),
                              SimpleNamespace(world=2, rank=rank, say=lambda _m: None))
            (stream,) = data.sources  # two workers, two streams: one each
            out.append([t.column("key").to_pylist() for t in itertools.islice(stream.tables(
                {"epoch": 0, "batch_in_epoch": 0}), 45)])  # 20 batches an epoch: into the third
        return out, len(td.files)

    (a, parts_a), (b, parts_b) = order(tiny_cache), order(other)
    assert parts_b > parts_a == 4  # other cuts: 16-row parts against one part per shard
    assert a == b and a[0] != a[1]
    assert order(tiny_cache, by_unit=False)[0] != order(other, by_unit=False)[0]  # a plan over parts differs
