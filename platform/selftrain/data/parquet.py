"""Reading the platform's own Parquet folders (pool index, scores, pseudo-labels) as Ray Datasets.

Ray 2.60's `ray.data.read_parquet` lists files through its V2 datasource by default: a `ListFiles`
task (one whole CPU, whatever `num_cpus` the read asks for) that starts 32 `FooterReader` actors
for every read, however few files there are, and kills them after. Each actor is a new Python
process, and each needs a free CPU to be placed. On a small node that costs seconds per read
(1.5 s against 3.1 s for three small files on 2 cores, 10-25 s for one scores file on a local Ray
of 16 CPUs), and in the full test suite on 2 CPUs it stalled runs: a `ListFiles` task held one CPU
waiting for footer actors while a Ray Train worker held the other (py-spy on the task).

Ray's V1 Parquet datasource reads the same files in read tasks that honour `num_cpus`, and starts
no actor. These folders are written by the platform itself (plain columns, no row-group pruning
to gain from footers), so nothing of V2 is lost here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.data


def read_parquet(paths: str | list[str], **kwargs: Any) -> ray.data.Dataset:
    """`ray.data.read_parquet(paths, **kwargs)` through Ray's V1 Parquet datasource.

    The switch is `DataContext.use_datasource_v2`, which Ray reads once, when the read is
    planned; it is set back to what it was before this returns, so a user's own reads keep
    theirs."""
    context = ray.data.DataContext.get_current()
    before, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        context.use_datasource_v2 = before


def read_parquet_per_file(directory: str, **kwargs: Any) -> ray.data.Dataset:
    """`read_parquet` of a local folder with one block per file, for passes that do little per row
    (counts, statistics). Ray's default splits even one small file into two blocks per CPU, and
    each block is a task: on a 16-CPU node, 32 tasks to count one 8,192-row scores file, which
    started 16 worker processes (each importing torch) for one second of work."""
    files = sum(1 for _ in Path(directory).glob("*.parquet"))
    return read_parquet(directory, override_num_blocks=max(1, files), **kwargs)
