"""The unlabeled pool as a lazy Ray Dataset of `{path, bytes, error, label}` rows.

`data.unlabeled` may be a folder tree (any nesting), a glob, Parquet (a file or a folder of
files) with an image-bytes column, or any of these as a URI (`file://`, `s3://`, `gs://`, read
through pyarrow filesystems). Nothing proportional to the pool is held on the driver: files are
listed in Ray tasks (`listing.py`), read in Ray tasks, and decoded later in `map_batches` with
per-file error handling (`decode.py`). Each row's `path` is its stable pool id: the file path
(a URI for object stores), or `<parquet file>#row=<n>` for Parquet pools.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from selftrain.data.decode import PARQUET_ROW
from selftrain.data.listing import PARQUET, PoolLocation, list_below, list_top_level, locate, probe
from selftrain.errors import DataError

ROWS_PER_READ_TASK = 256  # files per read+decode task: enough tasks to keep every CPU busy
LIST_CPUS = 0.5  # every pool task: a whole CPU beside a 1-CPU scoring actor on 2 cores never runs


def _label_from_folder(batch: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    """True label from the parent folder name when the pool keeps class folders, else -1."""
    lookup = {name: i for i, name in enumerate(classes or [])}
    batch["label"] = np.array([lookup.get(Path(p).parent.name, -1) for p in batch["path"]], dtype=np.int64)
    return batch


def _read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    if isinstance(filesystem, pafs.LocalFileSystem):
        with open(path, "rb") as handle:  # the builtin is faster than pyarrow for small files
            return handle.read()
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _read_files(batch: dict[str, Any], location: PoolLocation) -> dict[str, Any]:
    """`{file}` -> `{path, bytes, error}`; a file that cannot be read keeps its row and reason."""
    paths = list(batch["file"])
    data = np.empty(len(paths), dtype=object)
    errors = np.array(list(batch["skip"]), dtype=object)  # files listed but not read: their reason
    for i, path in enumerate(paths):
        if errors[i]:
            data[i] = b""
            continue
        try:
            data[i] = _read_bytes(location.filesystem, path)
        except OSError as exc:
            data[i], errors[i] = b"", f"unreadable file: {exc}"
    return {"path": np.array([location.pool_id(p) for p in paths], dtype=object), "bytes": data, "error": errors}


def _read_parquet_rows(batch: dict[str, Any], location: PoolLocation, column: str) -> Iterator[dict[str, Any]]:
    """One Parquet file per call, streamed in record batches (never a whole file in memory); a
    listed file that is not Parquet is one row with its reason."""
    for file, skip in zip(batch["file"], batch["skip"]):
        if skip:
            yield {"path": np.array([location.pool_id(file)], dtype=object),
                   "bytes": np.array([b""], dtype=object), "error": np.array([skip], dtype=object)}
            continue
        with location.filesystem.open_input_file(file) as handle:
            offset = 0
            for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=ROWS_PER_READ_TASK, columns=[column]):
                values = record_batch.column(0).to_pylist()
                ids = [f"{location.pool_id(file)}{PARQUET_ROW}{offset + i}" for i in range(len(values))]
                offset += len(values)
                yield {"path": np.array(ids, dtype=object),
                       "bytes": np.array([v or b"" for v in values], dtype=object),
                       "error": np.full(len(values), "", dtype=object)}


def _check_column(location: PoolLocation, parquet_file: str, column: str) -> None:
    schema = pq.read_schema(parquet_file, filesystem=location.filesystem)
    if column not in schema.names:
        raise DataError(
            f"data.unlabeled: Parquet file {location.pool_id(parquet_file)} has no column {column!r} "
            f"(columns: {', '.join(schema.names)}); set data.parquet_image_column"
        )


def list_pool_files(location: PoolLocation, kind: str) -> ray.data.Dataset:
    """Lazy `{file}` rows: the top level listed in one task, each sub-folder's tree in its own."""
    seed = ray.data.from_items([{"root": location.root}])
    top = seed.flat_map(list_top_level, fn_kwargs={"location": location}, num_cpus=LIST_CPUS)
    # One sub-folder (or chunk of top-level files) per block, so sub-trees are listed in parallel.
    return top.repartition(target_num_rows_per_block=1).flat_map(
        list_below, fn_kwargs={"location": location, "kind": kind}, num_cpus=LIST_CPUS)


def read_pool(spec: str, image_column: str, classes: list[str] | None) -> ray.data.Dataset:
    """`classes` given: derive true labels from parent folder names (for pseudo-label accuracy).

    Raises DataError at once for a missing path, an unreachable URI, a Parquet pool without
    `image_column`, or a folder with no pool file among its first entries; a pool whose files
    all lie further on is only known to be empty after the pass (`score_pool` checks).
    """
    location = locate(spec)
    kind, first = probe(location)
    if kind is None and first is None and location.pattern is not None:
        raise DataError(f"data.unlabeled: the glob {spec!r} matches no image files")
    if kind is None and first is None:
        raise DataError(f"data.unlabeled: no image files (or Parquet) under {spec}")
    if kind is None:
        raise DataError(f"data.unlabeled: {spec} is neither an image nor a Parquet file")
    files = list_pool_files(location, kind)
    if kind == PARQUET:
        _check_column(location, first, image_column)
        rows = files.map_batches(_read_parquet_rows, batch_size=1, num_cpus=LIST_CPUS,
                                 fn_kwargs={"location": location, "column": image_column})
        rows = rows.repartition(target_num_rows_per_block=ROWS_PER_READ_TASK)
        return rows.map_batches(_label_from_folder, fn_kwargs={"classes": None}, num_cpus=LIST_CPUS)
    rows = files.repartition(target_num_rows_per_block=ROWS_PER_READ_TASK).map_batches(
        _read_files, fn_kwargs={"location": location}, batch_size=None, num_cpus=LIST_CPUS)
    return rows.map_batches(_label_from_folder, fn_kwargs={"classes": classes}, num_cpus=LIST_CPUS)
