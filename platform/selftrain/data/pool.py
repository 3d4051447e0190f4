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

from selftrain.data.decode import PARQUET_ROW, local_id, local_path, read_file_bytes, with_retries
from selftrain.data.listing import PARQUET, PoolLocation, kind_of, list_below, list_top_level, locate, probe
from selftrain.errors import DataError

ROWS_PER_READ_TASK = 256  # files read into one batch (a scoring pass's read tasks are fused with its
# decode tasks, which batch them again: `stages.score.rows_per_task`)
UNITS_PER_CPU = 4  # listing units (sub-folders, their shards, chunks of top-level files) per CPU,
MIN_UNITS = 64  # and at least this many: a cluster may grow after the pass is planned (cluster.yaml's
# head has no CPUs and its workers start at 0), and each unit costs the driver ~5 KB while it waits
LIST_CPUS = 0.5  # every pool task: a whole CPU beside a 1-CPU scoring actor on 2 cores never runs


def _label_from_folder(batch: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    """True label from an image file's parent folder name when the pool keeps class folders,
    else -1 (a Parquet row's too: its file's folder says nothing of its class)."""
    lookup = {name: i for i, name in enumerate(classes or [])}
    batch["label"] = np.array([-1 if PARQUET_ROW in p else lookup.get(Path(p).parent.name, -1)
                               for p in batch["path"]], dtype=np.int64)
    return batch


def _read_bytes(location: PoolLocation, file: str) -> bytes:
    """A listed file's bytes (`file`: a `local_id`, or a path in the pool's filesystem); a
    transient failure is retried (`decode.with_retries`)."""
    if isinstance(location.filesystem, pafs.LocalFileSystem):
        return read_file_bytes(file)  # the builtin open: faster than pyarrow for small files

    def read() -> bytes:
        with location.filesystem.open_input_stream(file) as stream:
            return stream.read()

    return with_retries(read)


def _image_rows(files: list[str], skips: list[str], location: PoolLocation) -> dict[str, Any]:
    """`files` -> `{path, bytes, error}`; a file that cannot be read keeps its row and reason."""
    data = np.empty(len(files), dtype=object)
    errors = np.array(skips, dtype=object)  # files listed but not read: their reason
    for i, file in enumerate(files):
        if errors[i]:
            data[i] = b""
            continue
        try:
            data[i] = _read_bytes(location, file)
        except OSError as exc:
            data[i], errors[i] = b"", f"unreadable file: {exc.strerror or exc}"
    return {"path": np.array([location.pool_id(f) for f in files], dtype=object), "bytes": data, "error": errors}


def _open_parquet(location: PoolLocation, file: str) -> pq.ParquetFile:
    if isinstance(location.filesystem, pafs.LocalFileSystem):
        return pq.ParquetFile(open(local_path(file), "rb"))  # noqa: SIM115 - closed with the ParquetFile
    return pq.ParquetFile(location.filesystem.open_input_file(file))


def _parquet_rows(location: PoolLocation, file: str, column: str) -> Iterator[dict[str, Any]]:
    """One Parquet file's rows, streamed in record batches (never a whole file in memory).

    A Parquet file that cannot be read (cut short, not Parquet, without `column`) stops the pass
    with a DataError naming it, rather than being skipped as one bad image: it holds an unknown
    number of images (a file cut short loses the footer that counts them), so neither the loss
    nor `scoring.max_rejected_fraction` could be told; an unfinished copy or writer is the usual
    cause, and the fix is the user's."""
    pool_id = location.pool_id(file)
    try:
        parquet = with_retries(lambda: _open_parquet(location, file))
        if column not in parquet.schema_arrow.names:
            raise DataError(f"data.unlabeled: Parquet file {pool_id} has no column {column!r} "
                            f"(columns: {', '.join(parquet.schema_arrow.names)}); set data.parquet_image_column")
        offset = 0
        for record_batch in parquet.iter_batches(batch_size=ROWS_PER_READ_TASK, columns=[column]):
            values = record_batch.column(0).to_pylist()
            ids = [f"{pool_id}{PARQUET_ROW}{offset + i}" for i in range(len(values))]
            offset += len(values)
            yield {"path": np.array(ids, dtype=object),
                   "bytes": np.array([v or b"" for v in values], dtype=object),
                   "error": np.full(len(values), "", dtype=object)}
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, I/O an OSError
        raise DataError(f"data.unlabeled: Parquet file {pool_id} cannot be read ({_one_line(exc)}); a file "
                        "cut short loses the footer that counts its images, so it is not skipped: rewrite "
                        "it or move it out of the pool") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_files(batch: dict[str, Any], location: PoolLocation, column: str) -> Iterator[dict[str, Any]]:
    """Ray task: `{file, skip}` -> `{path, bytes, error}` batches. A pool may mix image files and
    Parquet files: the images are read into one batch, each Parquet file is streamed row by row."""
    files, skips = list(batch["file"]), [str(s) for s in batch["skip"]]
    parquet = [not skip and kind_of(file) == PARQUET for file, skip in zip(files, skips)]
    images = [i for i, is_parquet in enumerate(parquet) if not is_parquet]
    if images:
        yield _image_rows([files[i] for i in images], [skips[i] for i in images], location)
    for file, is_parquet in zip(files, parquet):
        if is_parquet:
            yield from _parquet_rows(location, file, column)


def _check_column(location: PoolLocation, parquet_file: str, column: str) -> None:
    """The first Parquet file, on the driver: a wrong `data.parquet_image_column` or a broken
    file is named at once, before any task starts."""
    if isinstance(location.filesystem, pafs.LocalFileSystem):
        parquet_file = local_id(parquet_file)  # as the listing names it (a name may not be UTF-8)
    try:
        schema = with_retries(lambda: _open_parquet(location, parquet_file).schema_arrow)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.unlabeled: Parquet file {location.pool_id(parquet_file)} cannot be read "
                        f"({_one_line(exc)}); rewrite it or move it out of the pool") from None
    if column not in schema.names:
        raise DataError(
            f"data.unlabeled: Parquet file {location.pool_id(parquet_file)} has no column {column!r} "
            f"(columns: {', '.join(schema.names)}); set data.parquet_image_column"
        )


def listing_units(location: PoolLocation) -> ray.data.Dataset:
    """Lazy listing units (`listing.list_top_level`), one per block so that units are listed
    and read in parallel: UNITS_PER_CPU for each CPU of the cluster, MIN_UNITS at least."""
    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    seed = ray.data.from_items([{"root": location.root}])
    top = seed.flat_map(list_top_level, fn_kwargs={"location": location, "units": max(UNITS_PER_CPU * cpus, MIN_UNITS)},
                        num_cpus=LIST_CPUS)
    return top.repartition(target_num_rows_per_block=1)


def list_pool_files(location: PoolLocation) -> ray.data.Dataset:
    """Lazy `{file, skip}` rows: every listing unit listed in its own task."""
    return listing_units(location).flat_map(list_below, fn_kwargs={"location": location}, num_cpus=LIST_CPUS)


def _list_and_read(batch: dict[str, Any], location: PoolLocation, column: str) -> Iterator[dict[str, Any]]:
    """Ray task: one listing unit listed (`list_below`) a folder at a time, and each folder's
    files read ROWS_PER_READ_TASK at a time, in the same task. No names wait between a listing
    and its reads: a listing task that ran ahead of the pass would queue its names (~60 bytes a
    file) in the driver's heap, as task outputs under Ray's 100 KiB inline limit go back to
    their owner rather than to the object store; these blocks carry the files' bytes, which Ray
    Data's backpressure counts."""
    unit = {key: values[0] for key, values in batch.items()}
    parts = [{**unit, "folders": []}] + [{**unit, "files": [], "reasons": [], "folders": [f]} for f in unit["folders"]]
    for part in parts:
        listed = list_below(part, location)
        for first in range(0, len(listed), ROWS_PER_READ_TASK):
            chunk = listed[first:first + ROWS_PER_READ_TASK]
            yield from _read_files({"file": [r["file"] for r in chunk], "skip": [r["skip"] for r in chunk]},
                                   location, column)


def read_pool(spec: str, image_column: str, classes: list[str] | None) -> ray.data.Dataset:
    """`classes` given: derive true labels from parent folder names (for pseudo-label accuracy).

    A pool may mix image files and Parquet files; both are read (the first pool file found only
    sets how files are read: a Parquet file a task, or a listing unit's images in the task that
    lists it, `_list_and_read`).
    Raises DataError at once for a missing path, an unreachable URI, a first Parquet file without
    `image_column`, or a folder with no pool file among its first entries; a pool whose files
    all lie further on is only known to be empty after the pass (`score_pool` checks). A
    Parquet file that cannot be read stops the pass with a DataError naming it (`_parquet_rows`;
    `raised_in_tasks` gives it back as itself).
    """
    location = locate(spec)
    kind, first = probe(location)
    if kind is None and first is None and location.pattern is not None:
        raise DataError(f"data.unlabeled: the glob {spec!r} matches no image files")
    if kind is None and first is None:
        raise DataError(f"data.unlabeled: no image files (or Parquet) under {spec}")
    if kind is None:
        raise DataError(f"data.unlabeled: {spec} is neither an image nor a Parquet file")
    read = {"fn_kwargs": {"location": location, "column": image_column}, "num_cpus": LIST_CPUS}
    if kind == PARQUET:  # a Parquet file a task: a pool of them has few files, each of many rows
        _check_column(location, first, image_column)
        rows = list_pool_files(location).map_batches(_read_files, batch_size=1, **read)
        rows = rows.repartition(target_num_rows_per_block=ROWS_PER_READ_TASK)
    else:
        rows = listing_units(location).map_batches(_list_and_read, batch_size=1, **read)
    return rows.map_batches(_label_from_folder, fn_kwargs={"classes": classes}, num_cpus=LIST_CPUS)
