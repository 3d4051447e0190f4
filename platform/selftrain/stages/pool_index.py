"""The unlabeled pool's index for online methods: `{path, label, index}` Parquet, written once.

Online methods (FixMatch and its successors) read the pool every step, and some keep state per
image (FlexMatch's last confident prediction), so every image needs a stable slot in
`[0, pool_rows)`. Ray Data has no global row number, so one actor numbers the rows as they
stream past (it only adds a column: it never holds more than a batch).

Every file is decoded once here: one that cannot be read or decoded gets no slot and is counted
and named (the first 1,000) like an unreadable file of a scoring pass, instead of vanishing from
every training pass. The index is shuffled before it is numbered and written, because a folder
pool lists class by class and training reads the index in order (a few batches are mixed at a
time, `training/loop.py`): unshuffled, a step would see one or two classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray.data
from ray.data.expressions import col

from selftrain.data.decode import decode_batch
from selftrain.data.parquet import read_parquet_per_file
from selftrain.data.pool import LIST_CPUS, read_pool
from selftrain.errors import DataError, raised_in_tasks

REJECTED_NAMED = 1000


def _check(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """`{path, bytes, error, label}` -> `{path, label, error}`: decoded once to find bad files."""
    decoded = decode_batch(batch, size)
    return {"path": decoded["path"], "label": decoded["label"], "error": decoded["error"]}


class _Numberer:
    """Numbers the readable rows it sees 0, 1, 2, ...; unreadable ones get -1. One actor: the
    numbers are unique (checked after the write: a restarted actor would start again at 0)."""

    def __init__(self):
        self.next = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = np.asarray(batch["error"]) == ""
        index = np.full(len(ok), -1, dtype=np.int64)
        index[ok] = np.arange(self.next, self.next + int(ok.sum()))
        self.next += int(ok.sum())
        return {**batch, "index": index}


def _block_stats(batch: dict[str, Any]) -> dict[str, Any]:
    index = np.asarray(batch["index"])
    index = index[index >= 0]
    big = np.iinfo(np.int64).max
    return {"count": [len(index)], "min": [int(index.min()) if len(index) else big],
            "max": [int(index.max()) if len(index) else -1], "sum": [int(index.sum())]}


def index_pool(spec: str, image_column: str, classes: list[str] | None, image_size: int, out_dir: Path,
               seed: int) -> dict[str, Any]:
    """Write the pool's index under `out_dir/index/`; returns `{dir, rows, rejected, rejected_count}`."""
    pool = read_pool(spec, image_column, classes).map_batches(
        _check, fn_kwargs={"size": image_size}, num_cpus=LIST_CPUS)
    # The same files give the same index, run after run (reproducible training reads it in order):
    # sorted by path whatever order the listing tasks finish in, then shuffled by the seed, and
    # numbered in that order.
    pool.context.execution_options.preserve_order = True
    numbered = pool.sort("path").random_shuffle(seed=seed).map_batches(
        _Numberer, compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, num_cpus=LIST_CPUS)
    directory = out_dir / "index"
    with raised_in_tasks():  # a Parquet pool file that cannot be read: a DataError naming it
        numbered.write_parquet(str(directory), min_rows_per_file=50_000)
    if not directory.exists():
        raise DataError(f"data.unlabeled: the pool {spec} yielded no rows")
    written = read_parquet_per_file(str(directory))
    # One pass, one row of numbers per block (Ray's aggregate() shuffles: 18 s for 10 rows here).
    blocks = written.map_batches(_block_stats, batch_size=None, num_cpus=LIST_CPUS).take_all()
    rows = sum(b["count"] for b in blocks)
    if rows == 0:
        raise DataError(f"data.unlabeled: no readable image in the pool {spec}")
    numbers = (min(b["min"] for b in blocks), max(b["max"] for b in blocks), sum(b["sum"] for b in blocks))
    if numbers != (0, rows - 1, rows * (rows - 1) // 2):
        raise DataError(f"the pool index under {directory} is not numbered 0..{rows - 1} once each "
                        "(a numbering actor restarted?); delete it and run again")
    bad = written.filter(expr=col("index") < 0).select_columns(["path", "error"]).materialize()  # few, by premise
    rejected = bad.take(REJECTED_NAMED)
    return {"dir": str(directory), "rows": rows, "rejected_count": bad.count(),
            "rejected": [{"path": r["path"], "reason": r["error"]} for r in rejected]}
