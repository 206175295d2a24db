"""Train-time filters on the LAION columns a latent cache keeps (mosaicml/diffusion-style): change a threshold
without re-encoding.

  --filter 'punsafe < 0.1 and aesthetic >= 5 and orig_side >= 256'

A filter is clauses `COLUMN OP NUMBER` joined by `and`; OP is one of < <= > >= == !=. A row whose column is null
(the shard had no such score) fails the clause: a filter keeps only what it can vouch for. The driver counts the
rows each part keeps before the workers start (the epoch plan needs them), and the workers apply the same filter
to every part they read.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.common.errors import DataError

# the columns a filter can name: the cache's LAION scores, original size and class label, and orig_side, the
# shorter original side; and latents@R, 1 where a row has a latent at resolution R of a multi-resolution cache
# (0 where its image was smaller): training at R adds `latents@R > 0` by itself
COLUMNS = ("punsafe", "pwatermark", "aesthetic", "similarity", "orig_w", "orig_h", "orig_side", "label")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}
_CLAUSE = re.compile(r"^\s*([a-z_]+(?:@\d+)?)\s*(<=|>=|==|!=|<|>)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Clause:
    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column} {self.op} {self.value:g}"


@dataclass(frozen=True)
class RowFilter:
    clauses: tuple[Clause, ...]

    @classmethod
    def parse(cls, text: str) -> "RowFilter":
        parts = [p for p in re.split(r"\band\b", text.strip()) if p.strip()] if text.strip() else []
        out = []
        for p in parts:
            m = _CLAUSE.match(p)
            if not m:
                raise ValueError(f"--filter {text!r}: cannot read {p.strip()!r}; write COLUMN OP NUMBER clauses joined "
                                 f"by 'and', e.g. 'punsafe < 0.1 and aesthetic >= 5' (OP: {' '.join(OPS)})")
            if m.group(1) not in COLUMNS and not re.fullmatch(r"latents@\d+", m.group(1)):
                raise ValueError(f"--filter {text!r}: no column {m.group(1)!r}; a filter can use {', '.join(COLUMNS)}")
            out.append(Clause(m.group(1), m.group(2), float(m.group(3))))
        return cls(tuple(out))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    def __str__(self) -> str:
        return " and ".join(map(str, self.clauses))

    def requiring(self, resolution: int) -> "RowFilter":
        """This filter and `latents@R > 0`: only rows that have a latent at resolution R (a multi-resolution
        cache leaves an image out of a resolution it is smaller than)."""
        return RowFilter(self.clauses + (Clause(f"latents@{resolution}", ">", 0),))

    @property
    def columns(self) -> list[str]:
        """The cache columns the filter reads."""
        need = {_source(c.column) for c in self.clauses}
        if "orig_side" in need:
            need = (need - {"orig_side"}) | {"orig_w", "orig_h"}
        return sorted(need)

    def masks(self, table: pa.Table) -> list[np.ndarray]:
        """Each clause's pass mask over the table's rows (a null fails)."""
        out = []
        for c in self.clauses:
            if c.column == "orig_side":
                v = np.minimum(_values(table, "orig_w"), _values(table, "orig_h"))
            else:
                v = _values(table, c.column)
            with np.errstate(invalid="ignore"):
                out.append(np.isfinite(v) & OPS[c.op](v, c.value))
        return out

    def mask(self, table: pa.Table) -> np.ndarray:
        keep = np.ones(len(table), bool)
        for m in self.masks(table):
            keep &= m
        return keep


def _source(column: str) -> str:
    """The cache column behind a filter column: latents@R reads has_R (1 where the row has a latent at R)."""
    return f"has_{column.split('@')[1]}" if column.startswith("latents@") else column


def _values(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(_source(name)).combine_chunks()
    return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def count_kept(flt: RowFilter, files: Sequence[str], log) -> tuple[list[int], dict]:
    """The rows of each part the filter keeps (read from the filter's columns only, parts in parallel), and the
    rows each clause removes; a cache without a filter column is a clear error."""
    from pipeline.common import storage

    def read(f: str) -> tuple[int, list[int]]:
        import pyarrow.parquet as pq
        fs, path = storage.fs_and_path(f)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in flt.columns if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"--filter {flt}: the cache part {f} has no column {', '.join(missing)} (a cache "
                                f"encoded before the LAION columns were kept): re-encode it into a new --output, or "
                                f"filter at encode time (--max-punsafe, --min-aesthetic, ...)")
            table = pf.read(columns=flt.columns)
        masks = flt.masks(table)
        keep = np.ones(len(table), bool)
        for m in masks:
            keep &= m
        return int(keep.sum()), [int((~m).sum()) for m in masks]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, files))
    removed = {str(c): sum(g[1][i] for g in got) for i, c in enumerate(flt.clauses)}
    return [g[0] for g in got], removed
