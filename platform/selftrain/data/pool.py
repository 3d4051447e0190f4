"""The unlabeled pool as a lazy Ray Dataset of `{path, bytes, label}` rows.

`data.unlabeled` may be a folder tree (any nesting), a glob, or Parquet (a file or a folder of
files) with an image-bytes column. Rows are never collected on the driver; decoding happens
later in `map_batches` with per-file error handling (see `decode.py`). Each row's `path` is
its stable pool id: the file path, or `<parquet file>#row=<n>` for Parquet pools.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.data

from selftrain.data.decode import IMAGE_EXTENSIONS, PARQUET_ROW
from selftrain.errors import DataError


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _parquet_files(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_file() and path.suffix == ".parquet":
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        has_images = any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in path.rglob("*"))
        return files if files and not has_images else []
    return []


def _has_image_file(root: str) -> bool:
    for _, _, files in os.walk(root):  # stops at the first image: cheap on huge trees
        if any(f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def _label_from_folder(batch: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    """True label from the parent folder name when the pool keeps class folders, else -1."""
    lookup = {name: i for i, name in enumerate(classes or [])}
    batch["label"] = np.array([lookup.get(Path(p).parent.name, -1) for p in batch["path"]], dtype=np.int64)
    return batch


def _read_parquet_file(row: dict[str, Any], column: str) -> list[dict[str, Any]]:
    table = pq.read_table(row["file"], columns=[column])
    return [{"path": f"{row['file']}{PARQUET_ROW}{i}", "bytes": value or b""}
            for i, value in enumerate(table.column(column).to_pylist())]


def read_pool(spec: str, image_column: str, classes: list[str] | None) -> ray.data.Dataset:
    """`classes` given: derive true labels from parent folder names (for pseudo-label accuracy)."""
    spec = str(Path(spec).expanduser()) if not _is_glob(spec) else os.path.expanduser(spec)
    parquet = [] if _is_glob(spec) else _parquet_files(spec)
    if parquet:
        schema = pq.read_schema(parquet[0])
        if image_column not in schema.names:
            raise DataError(
                f"data.unlabeled: Parquet file {parquet[0]} has no column {image_column!r} "
                f"(columns: {', '.join(schema.names)}); set data.parquet_image_column"
            )
        files = ray.data.from_items([{"file": f} for f in parquet])
        rows = files.flat_map(_read_parquet_file, fn_kwargs={"column": image_column})
        return rows.map_batches(_label_from_folder, fn_kwargs={"classes": None})
    if _is_glob(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True)
                       if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise DataError(f"data.unlabeled: the glob {spec!r} matches no image files")
    elif not os.path.exists(spec):
        raise DataError(f"data.unlabeled: path does not exist: {spec}")
    elif not _has_image_file(spec):
        raise DataError(f"data.unlabeled: no image files (or Parquet) under {spec}")
    else:
        paths = spec
    extensions = [*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)]
    rows = ray.data.read_binary_files(paths, include_paths=True, file_extensions=extensions)
    return rows.map_batches(_label_from_folder, fn_kwargs={"classes": classes})
