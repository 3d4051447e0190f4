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
from selftrain.data.pool import LIST_CPUS, read_pool
from selftrain.errors import DataError

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


def index_pool(spec: str, image_column: str, classes: list[str] | None, image_size: int, out_dir: Path,
               seed: int) -> dict[str, Any]:
    """Write the pool's index under `out_dir/index/`; returns `{dir, rows, rejected, rejected_count}`."""
    pool = read_pool(spec, image_column, classes).map_batches(
        _check, fn_kwargs={"size": image_size}, num_cpus=LIST_CPUS)
    numbered = pool.random_shuffle(seed=seed).map_batches(
        _Numberer, compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, num_cpus=LIST_CPUS)
    directory = out_dir / "index"
    numbered.write_parquet(str(directory), min_rows_per_file=50_000)
    if not directory.exists():
        raise DataError(f"data.unlabeled: the pool {spec} yielded no rows")
    written = ray.data.read_parquet(str(directory))
    good = written.filter(expr=col("index") >= 0)
    rows = good.count()
    if rows == 0:
        raise DataError(f"data.unlabeled: no readable image in the pool {spec}")
    if (good.min("index"), good.max("index"), good.sum("index")) != (0, rows - 1, rows * (rows - 1) // 2):
        raise DataError(f"the pool index under {directory} is not numbered 0..{rows - 1} once each "
                        "(a numbering actor restarted?); delete it and run again")
    bad = written.filter(expr=col("index") < 0)
    rejected = bad.select_columns(["path", "error"]).take(REJECTED_NAMED)
    return {"dir": str(directory), "rows": rows, "rejected_count": bad.count(),
            "rejected": [{"path": r["path"], "reason": r["error"]} for r in rejected]}
