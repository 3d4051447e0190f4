"""The unlabeled pool's index for online methods: `{path, label, index}` Parquet, written once.

Online methods (FixMatch and its successors) read the pool every step, and some keep state per
image (FlexMatch's last confident prediction), so every image needs a stable slot in
`[0, pool_rows)`. Ray Data has no global row number, so one actor numbers the rows as they
stream past (it only adds a column: it never holds more than a batch), and the numbered index is
written as Parquet and read back every pass. Files that cannot be read are left out here and
counted; the driver sees only counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from selftrain.data.pool import LIST_CPUS, read_pool
from selftrain.errors import DataError


class _Numberer:
    """Numbers the readable rows it sees 0, 1, 2, ... (one actor: the numbers are unique)."""

    def __init__(self):
        self.next = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = np.asarray(batch["error"]) == ""
        count = int(ok.sum())
        index = np.arange(self.next, self.next + count, dtype=np.int64)
        self.next += count
        return {"path": np.asarray(batch["path"], dtype=object)[ok], "label": np.asarray(batch["label"])[ok],
                "index": index}


def index_pool(spec: str, image_column: str, classes: list[str] | None, out_dir: Path) -> dict[str, Any]:
    """Write the pool's index under `out_dir/index/`; returns `{dir, rows}`."""
    pool = read_pool(spec, image_column, classes).select_columns(["path", "label", "error"])
    numbered = pool.map_batches(_Numberer, compute=ray.data.ActorPoolStrategy(size=1), batch_size=None,
                                num_cpus=LIST_CPUS)
    directory = out_dir / "index"
    numbered.write_parquet(str(directory), min_rows_per_file=50_000)
    rows = ray.data.read_parquet(str(directory)).count() if directory.exists() else 0
    if rows == 0:
        raise DataError(f"data.unlabeled: no readable file in the pool {spec}")
    return {"dir": str(directory), "rows": rows}
