"""Train-time filters on the cache's LAION columns: the grammar, nulls failing a clause, the driver's counts and
the workers' reads agreeing row for row."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.common.errors import DataError
from pipeline.train.epoch_plan import RayDataParts
from pipeline.train.row_filter import RowFilter, count_kept


def table(p: int, n: int = 20):
    rng = np.random.default_rng(p)
    punsafe = rng.random(n).astype(np.float32)
    aesthetic = pa.array([None if i % 7 == 3 else float(x) for i, x in enumerate(rng.uniform(3, 8, n))],
                         pa.float32())
    return pa.table({"key": np.arange(n) + 1000 * p, "punsafe": punsafe, "aesthetic": aesthetic,
                     "orig_w": rng.integers(100, 600, n).astype(np.int32),
                     "orig_h": rng.integers(100, 600, n).astype(np.int32)})


def test_the_grammar_and_its_errors():
    f = RowFilter.parse(" punsafe<0.1 and aesthetic >= 5 and orig_side>=2.5e2 ")
    assert [str(c) for c in f.clauses] == ["punsafe < 0.1", "aesthetic >= 5", "orig_side >= 250"]
    assert f.columns == ["aesthetic", "orig_h", "orig_w", "punsafe"]
    assert not RowFilter.parse("") and str(RowFilter.parse("label == 3")) == "label == 3"
    with pytest.raises(ValueError, match="no column 'nsfw'.*a filter can use punsafe"):
        RowFilter.parse("nsfw < 0.1")
    with pytest.raises(ValueError, match="cannot read 'punsafe = 0.1'"):
        RowFilter.parse("aesthetic > 5 and punsafe = 0.1")
    with pytest.raises(ValueError, match="cannot read 'aesthetic > 5 or punsafe < 1'"):
        RowFilter.parse("aesthetic > 5 or punsafe < 1")


def test_a_null_fails_its_clause_and_the_mask_is_the_and_of_the_clauses():
    t = table(0)
    f = RowFilter.parse("punsafe < 0.5 and aesthetic >= 5 and orig_side >= 200")
    ps, ae = t["punsafe"].to_numpy(), t["aesthetic"].to_pylist()
    side = np.minimum(t["orig_w"].to_numpy(), t["orig_h"].to_numpy())
    want = [ps[i] < 0.5 and ae[i] is not None and ae[i] >= 5 and side[i] >= 200 for i in range(len(t))]
    assert f.mask(t).tolist() == want
    assert not RowFilter.parse("aesthetic > 0").mask(t)[3]  # the null row


def test_the_driver_counts_what_the_workers_read(ray_local, tmp_path):
    tables = [table(p, n) for p, n in enumerate([20, 33, 7])]
    files = []
    for p, t in enumerate(tables):
        files.append(str(tmp_path / f"part-{p}.parquet"))
        pq.write_table(t, files[-1], row_group_size=8)
    f = RowFilter.parse("punsafe < 0.6 and aesthetic >= 4.5")
    kept, removed = count_kept(f, files, print)
    assert kept == [int(f.mask(t).sum()) for t in tables]
    assert set(removed) == {"punsafe < 0.6", "aesthetic >= 4.5"} and all(v > 0 for v in removed.values())
    reader = RayDataParts(files, [len(t) for t in tables], ["key"], row_filter=f, filtered_rows=kept)
    got = list(reader([2, 0, 1]))
    assert [g.column_names for g in got] == [["key"]] * 3  # the filter's columns are read, not handed on
    assert [g["key"].to_pylist() for g in got] == [t.filter(pa.array(f.mask(t)))["key"].to_pylist()
                                                   for t in (tables[2], tables[0], tables[1])]
    wrong = RayDataParts(files, [len(t) for t in tables], ["key"], row_filter=f, filtered_rows=[k + 1 for k in kept])
    with pytest.raises(DataError, match="part-0.parquet, not the"):
        list(wrong([0]))
    pq.write_table(tables[0].drop(["aesthetic"]), files[0])
    with pytest.raises(DataError, match="part-0.parquet has no column aesthetic"):
        count_kept(f, files, print)
