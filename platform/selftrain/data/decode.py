"""Decode image bytes into fixed-size RGB arrays, with a reason for every failure.

Our own decoding (rather than `ray.data.read_images`) lets one corrupt file be skipped and
reported by path without aborting the read or dropping the good images in its block.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

PARQUET_ROW = "#row="  # a Parquet pool's row id: `<file>#row=<n>`
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "jfif", "bmp", "gif", "tif", "tiff", "webp", "avif", "ppm", "pgm")


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message is the reason shown to the user."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit and float images are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P+transparency -> RGB otherwise
    return image.convert("RGB")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any common format and mode -> `size x size x 3` uint8 array."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # forces the full decode: truncated files fail here
            rgb = to_rgb(image)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ImageDecodeError(f"unreadable image: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_rows(batch: dict[str, Any], size: int, column: str, fetch) -> dict[str, Any]:
    """Decode `fetch(value)` for each value of `column`; failures keep their row.

    A failed row gets a black image and a non-empty `error`, so a later step can report it
    by path and drop it; every other column passes through untouched.
    """
    values = batch[column]
    images = np.zeros((len(values), size, size, 3), dtype=np.uint8)
    # A row that already failed upstream (e.g. the file could not be read) keeps its reason.
    errors = np.array(batch["error"], dtype=object) if "error" in batch else np.full(len(values), "", dtype=object)
    for i, value in enumerate(values):
        if errors[i]:
            continue
        try:
            images[i] = decode_image(fetch(value), size)
        except (OSError, ImageDecodeError) as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must never end the pass
            errors[i] = f"{type(exc).__name__}: {exc}"
    out = {key: value for key, value in batch.items() if key != "bytes"}
    out["image"] = images
    out["error"] = errors
    return out


@lru_cache(maxsize=8)
def _filesystem(uri_root: str):
    """One pyarrow filesystem per scheme and bucket (resolving one, e.g. S3's region, costs)."""
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem() if uri_root == "file://" else pafs.FileSystem.from_uri(uri_root)[0]


def _filesystem_and_path(uri: str):
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return _filesystem("file://"), rest
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def read_file_bytes(path: str) -> bytes:
    """A local path, or a URI (`s3://bucket/key`: the pool ids of object-store pools)."""
    if "://" in path:
        filesystem, inner = _filesystem_and_path(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    with open(path, "rb") as handle:
        return handle.read()


def _parquet_file(file: str):
    """A local path or a URI (the ids of Parquet pools on object stores)."""
    import pyarrow.parquet as pq

    if "://" in file:
        filesystem, inner = _filesystem_and_path(file)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(file)


@lru_cache(maxsize=16)
def _row_group_starts(file: str) -> list[int]:
    metadata = _parquet_file(file).metadata
    return [0, *np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]).tolist()]


@lru_cache(maxsize=2)
def _row_group_column(file: str, group: int, column: str) -> list[bytes | None]:
    """One row group of one column: a worker never holds a whole Parquet pool file."""
    return _parquet_file(file).read_row_group(group, columns=[column]).column(column).to_pylist()


def read_image_ref(ref: str, parquet_column: str = "image") -> bytes:
    """Bytes of a pool row by its id: a file path, or `<parquet file>#row=<n>`."""
    file, sep, row = ref.rpartition(PARQUET_ROW)
    if not sep:
        return read_file_bytes(ref)
    starts = _row_group_starts(file)
    group = int(np.searchsorted(starts, int(row), side="right")) - 1
    return _row_group_column(file, group, parquet_column)[int(row) - starts[group]] or b""


def decode_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Ray Data batch `{bytes, ...}` -> `{image, error, ...}` (the bytes column is dropped)."""
    return _decode_rows(batch, size, "bytes", bytes)


def load_batch(batch: dict[str, Any], size: int, parquet_column: str = "image") -> dict[str, Any]:
    """Ray Data batch `{path, ...}` of pool ids / files -> `{image, error, path, ...}`."""
    return _decode_rows(batch, size, "path", lambda ref: read_image_ref(ref, parquet_column))
