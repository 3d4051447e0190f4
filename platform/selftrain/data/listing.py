"""Where a pool lives, and listing its files inside Ray tasks, never on the driver.

`ray.data.read_binary_files` (Ray 2.60, `FileBasedDatasource.__init__`) expands every path on
the driver and `ray.put`s the list: a pool of millions of files costs the driver memory in
proportion to the pool. Here the driver only resolves the location (a local path, a glob, or a
URI that `pyarrow.fs.FileSystem.from_uri` understands: `file://`, `s3://`, `gs://`, ...) and
looks at a bounded number of entries to tell images from Parquet and to fail early on an empty
folder. The listing itself is a Ray Data pipeline: one task lists the root's top level, then
one task per sub-directory lists its tree (so listing runs in parallel on object stores, where
a listing is a sequence of paged requests).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from selftrain.data.decode import IMAGE_EXTENSIONS
from selftrain.errors import DataError

PARQUET = "parquet"
PROBE_LIMIT = 10_000  # entries the driver may look at to classify the pool (bounded, not O(pool))
FILES_PER_ROW = 512  # top-level files travel in chunks, so a flat folder is not one row per file
SKIPPED = "skipped: "  # the error of a listed file that is not read (see `skip_reason`)


@dataclass(frozen=True)
class PoolLocation:
    """A pool's filesystem and root; `pattern` (a compiled glob) filters paths below the root."""

    spec: str  # what the user wrote, for messages
    filesystem: pafs.FileSystem
    root: str  # a path inside `filesystem`: a folder, or a single file
    is_file: bool
    pattern: re.Pattern[str] | None
    prefix: str  # "" for the local filesystem, else "s3://" etc.: ids are prefix + path

    def pool_id(self, path: str) -> str:
        return self.prefix + path


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell glob -> regex over '/'-separated relative paths, as `glob.glob(recursive=True)`:
    `**/` matches zero or more folders, `*` and `?` never cross a '/'."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _split_glob(spec: str) -> tuple[str, str | None]:
    """`/data/pool/**/*.jpg` -> (`/data/pool`, `**/*.jpg`): the fixed folder and the rest.
    A relative glob (`**/*.png`, `*.jpg`) is relative to the working directory, as in a shell."""
    if not _is_glob(spec):
        return spec, None
    first = min(spec.index(ch) for ch in "*?[" if ch in spec)
    cut = spec.rfind("/", 0, first)
    return spec[:cut] if cut > 0 else "/" if cut == 0 else ".", spec[cut + 1:]


def locate(spec: str) -> PoolLocation:
    """Resolve `data.unlabeled`; raises DataError naming the spec and pyarrow's reason."""
    is_uri = "://" in spec
    fixed, glob = _split_glob(spec if is_uri else os.path.expanduser(spec))
    try:
        if is_uri:
            filesystem, root = pafs.FileSystem.from_uri(fixed)
        else:
            # abspath, not resolve: ids keep the user's folder names, symlinks included
            filesystem, root = pafs.LocalFileSystem(), os.path.abspath(fixed)
        info = filesystem.get_file_info(root)
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, I/O an OSError
        raise DataError(f"data.unlabeled: cannot reach {spec}: {exc}") from None
    if info.type == pafs.FileType.NotFound and glob:
        raise DataError(f"data.unlabeled: the glob {spec!r} matches no image files ({fixed} does not exist)")
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.unlabeled: path does not exist: {spec}")
    local = isinstance(filesystem, pafs.LocalFileSystem)
    prefix = "" if local else spec.split("://", 1)[0] + "://"
    return PoolLocation(spec, filesystem, root.rstrip("/") or "/", info.type == pafs.FileType.File,
                        glob_regex(glob) if glob else None, prefix)


def kind_of(path: str) -> str | None:
    """'parquet', 'image' or None (not a pool file; hidden and '_' files are skipped, as Ray does)."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith((".", "_")) or "." not in name:
        return None
    extension = name.rsplit(".", 1)[-1].lower()
    return PARQUET if extension == PARQUET else "image" if extension in IMAGE_EXTENSIONS else None


def wanted(location: PoolLocation, path: str) -> bool:
    if location.pattern is None:
        return True
    relative = path[len(location.root):].lstrip("/")
    return location.pattern.match(relative) is not None


def _walk(location: PoolLocation) -> Iterator[str]:
    """Files below the root, lazily, depth-first: the probe below stops after a bounded count.
    The local filesystem uses `os.scandir` (an iterator); pyarrow lists one folder at a time."""
    stack = [location.root]
    while stack:
        folder = stack.pop()
        if isinstance(location.filesystem, pafs.LocalFileSystem):
            try:
                with os.scandir(folder) as entries:
                    children = [(e.path, e.is_dir()) for e in entries]
            except OSError:
                continue
        else:
            listing = location.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            children = [(i.path, i.type == pafs.FileType.Directory) for i in listing]
        stack += sorted((p for p, is_dir in children if is_dir), reverse=True)
        yield from sorted(p for p, is_dir in children if not is_dir)


def probe(location: PoolLocation) -> tuple[str | None, str | None]:
    """(kind, first file) of the first pool file. (None, None): the tree holds none.
    ("image", None): none among the first PROBE_LIMIT entries; the pool may hold images further
    on, so it is read as an image pool and the pass itself finds out (`check_scores`)."""
    if location.is_file:
        return kind_of(location.root), location.root
    for seen, path in enumerate(_walk(location)):
        kind = kind_of(path)
        if kind and wanted(location, path):
            return kind, path
        if seen + 1 >= PROBE_LIMIT:
            return "image", None
    return None, None


def list_top_level(row: dict[str, Any], location: PoolLocation) -> list[dict[str, Any]]:
    """Ray task: the root's sub-folders (one row each) and its files (in chunks)."""
    if location.is_file:
        return [{"folder": "", "files": [location.root]}]
    listing = location.filesystem.get_file_info(pafs.FileSelector(row["root"]))
    folders = sorted(i.path for i in listing if i.type == pafs.FileType.Directory)
    files = sorted(i.path for i in listing if i.type == pafs.FileType.File)
    chunks = [files[i:i + FILES_PER_ROW] for i in range(0, len(files), FILES_PER_ROW)]
    return [{"folder": f, "files": []} for f in folders] + [{"folder": "", "files": c} for c in chunks]


def skip_reason(path: str, kind: str) -> str:
    """Why a listed file is not read into a pool of `kind` ("" when it is read)."""
    found = kind_of(path)
    if found == kind:
        return ""
    name = path.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):
        return SKIPPED + "hidden or marker file"
    if found == PARQUET:
        return SKIPPED + "a Parquet file in a pool of image files (a pool is read as one kind)"
    if found == "image":
        return SKIPPED + "an image file in a pool of Parquet files (a pool is read as one kind)"
    extension = f"'.{name.rsplit('.', 1)[-1]}'" if "." in name else "none"
    return f"{SKIPPED}unsupported extension {extension} (images: {', '.join(IMAGE_EXTENSIONS)}; or parquet)"


def list_below(row: dict[str, Any], location: PoolLocation, kind: str) -> list[dict[str, Any]]:
    """Ray task: every wanted file in a sub-folder's tree, or in a chunk of files, as `{file,
    skip}`; `skip` says why a file that is not of the pool's `kind` is not read, so that every
    file the user pointed at is either read or counted and named."""
    if row["folder"]:
        selector = pafs.FileSelector(row["folder"], recursive=True)
        paths = sorted(i.path for i in location.filesystem.get_file_info(selector)
                       if i.type == pafs.FileType.File)
    else:
        paths = list(row["files"])
    return [{"file": p, "skip": skip_reason(p, kind)} for p in paths if wanted(location, p)]
