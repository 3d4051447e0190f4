"""Decode image bytes into fixed-size RGB arrays, with a reason for every failure.

Our own decoding (rather than `ray.data.read_images`) lets one corrupt file be skipped and
reported by path without aborting the read or dropping the good images in its block.
"""

from __future__ import annotations

import errno
import io
import os
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import quote, unquote_to_bytes

import numpy as np
from PIL import Image, UnidentifiedImageError

PARQUET_ROW = "#row="  # a Parquet pool's row id: `<file>#row=<n>`
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "jfif", "bmp", "gif", "tif", "tiff", "webp", "avif", "ppm", "pgm")
FILE_URI = "file://"  # the id of a local file whose name is not UTF-8 (`local_id`)
# A read that fails is tried READ_ATTEMPTS times in all, RETRY_DELAY_S apart (doubling), before
# its file is called unreadable: a network filesystem's or an object store's passing error
# (EIO, a timeout, a throttled request) must not cost a good image, nor count against
# `scoring.max_rejected_fraction`. Errors that describe the file itself are final at once.
READ_ATTEMPTS = 3
RETRY_DELAY_S = 0.2
FINAL_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP,
                errno.ENAMETOOLONG}
T = TypeVar("T")

# Images over PIL's pixel limit are refused below (`decompression bomb`) before they are decoded;
# PIL's own warning for those between the limit and twice it would only repeat that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message is the reason shown to the user."""


def _to_eight_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16/32-bit or float values -> uint8 on a fixed scale where the format has one:
    16-bit (`I;16*`, and `I` within 0..65535: what 16-bit PNG/TIFF decode to) divides by 257, so
    65535 -> 255 and a flat grey stays that grey; float in 0..1 multiplies by 255. Values with no
    known white point (32-bit integers beyond 16 bits, floats beyond 0..1) are stretched from
    their minimum to their maximum."""
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, as PIL's `convert("RGB")` (torchvision's and Ray Data's
    loaders) gives it: L/LA/I are replicated to three channels, CMYK converted, an alpha channel
    or a palette's transparency dropped (the stored colour is kept, not composited). An animated
    GIF/PNG gives its first frame (what `Image.open` is positioned at)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = Image.fromarray(_to_eight_bit(np.asarray(image, dtype=np.float64), image.mode), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P+transparency -> RGB otherwise
    return image.convert("RGB")


def _check_pixels(image: Image.Image) -> None:
    """PIL refuses more than twice `Image.MAX_IMAGE_PIXELS` at open and only warns above it; an
    image over the limit is refused here before its pixels are decoded (a few KB of PNG can
    expand to gigabytes)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        raise ImageDecodeError(_bomb_reason(f"{width * height} pixels ({width}x{height})", limit))


def _bomb_reason(size: str, limit: int) -> str:
    return f"decompression bomb: {size}, over the limit of {limit} pixels (PIL Image.MAX_IMAGE_PIXELS); not decoded"


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any common format and mode -> `size x size x 3` uint8 array."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image)  # the header only: nothing decoded yet
            image.load()  # forces the full decode: truncated files fail here
            rgb = to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses it at open
        size = str(exc).split("(", 1)[1].split(")", 1)[0] if "(" in str(exc) else "too many pixels"
        raise ImageDecodeError(_bomb_reason(size, Image.MAX_IMAGE_PIXELS)) from None
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


def local_id(path: str) -> str:
    """The id of a local file: its path, or for a name that is not UTF-8 (Linux names are bytes:
    `b'\\xff.png'`, which Python holds as a lone surrogate that Arrow and JSON cannot store) an
    RFC 8089 file URI of the path's bytes, percent-encoded: `file:///pool/%FF.png`. Lossless:
    `read_file_bytes` opens the very file by it."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return FILE_URI + quote(os.fsencode(path), safe="/")


def local_path(file_id: str) -> str | bytes:
    """What `open` takes for a `local_id`: the path itself, or the bytes a file URI encodes."""
    return unquote_to_bytes(file_id[len(FILE_URI):]) if file_id.startswith(FILE_URI) else file_id


def transient(exc: BaseException) -> bool:
    """An error a second try may not see (`READ_ATTEMPTS`): any OSError but those that describe
    the file itself (missing, a folder, no permission, a symlink loop)."""
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) \
        and exc.errno not in FINAL_ERRNOS


def with_retries(read: Callable[[], T]) -> T:
    """`read()`, tried again after a transient error (`transient`), READ_ATTEMPTS times in all;
    the last error is raised with the number of attempts in its message."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except OSError as exc:
            if not transient(exc):
                raise
            if attempt == READ_ATTEMPTS:
                reason = f"{exc.strerror or exc} (after {READ_ATTEMPTS} attempts)"
                raise (OSError(exc.errno, reason) if exc.errno else OSError(reason)) from exc
            time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _read_local(path: str | bytes) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_file_bytes(path: str) -> bytes:
    """A local path or `local_id`, or a URI (`s3://bucket/key`: the pool ids of object-store
    pools); a transient failure is retried (`with_retries`)."""
    if path.startswith(FILE_URI) or "://" not in path:
        return with_retries(lambda: _read_local(local_path(path)))
    filesystem, inner = _filesystem_and_path(path)

    def read() -> bytes:
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()

    return with_retries(read)


def _parquet_file(file: str):
    """A local path or `local_id`, or a URI (the ids of Parquet pools on object stores)."""
    import pyarrow.parquet as pq

    if file.startswith(FILE_URI):
        return pq.ParquetFile(open(local_path(file), "rb"))  # noqa: SIM115 - ParquetFile reads it lazily
    if "://" in file:
        filesystem, inner = _filesystem_and_path(file)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(file)


@lru_cache(maxsize=16)
def _row_group_starts(file: str) -> list[int]:
    metadata = with_retries(lambda: _parquet_file(file).metadata)
    return [0, *np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]).tolist()]


@lru_cache(maxsize=2)
def _row_group_column(file: str, group: int, column: str) -> list[bytes | None]:
    """One row group of one column: a worker never holds a whole Parquet pool file."""
    return with_retries(lambda: _parquet_file(file).read_row_group(group, columns=[column]).column(column).to_pylist())


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
