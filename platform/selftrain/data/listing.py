"""Where a pool lives, and listing its files inside Ray tasks, never on the driver.

`ray.data.read_binary_files` (Ray 2.60, `FileBasedDatasource.__init__`) expands every path on
the driver and `ray.put`s the list: a pool of millions of files costs the driver memory in
proportion to the pool. Here the driver only resolves the location (a local path, a glob, or a
URI that `pyarrow.fs.FileSystem.from_uri` understands: `file://`, `s3://`, `gs://`, ...) and
looks at a bounded number of entries to tell images from Parquet and to fail early on an empty
folder. The listing itself is a Ray Data pipeline: one task lists the root's top level, then
one task per sub-directory lists its tree (so listing runs in parallel on object stores, where
a listing is a sequence of paged requests).

A local pool is walked with `os.scandir`, not pyarrow: pyarrow's recursive listing follows a
symlink loop forever and fails a whole folder on one name that is not UTF-8. Every entry that is
not read is named with its reason (`list_below`): a symlink back to a folder above it (a loop:
named, not followed; other folder links are followed), a dangling symlink, a folder that cannot
be listed, a FIFO or device, a hidden file, an unsupported extension. A name that is not UTF-8
travels as a file URI (`decode.local_id`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.fs as pafs

from selftrain.data.decode import IMAGE_EXTENSIONS, local_id, local_path
from selftrain.errors import DataError

PARQUET = "parquet"
PROBE_LIMIT = 10_000  # entries the driver may look at to find the first pool file (bounded, not O(pool))
FILES_PER_ROW = 512  # top-level files travel in chunks (at least this many names), so a flat folder is not one row per file
MAX_SHARDS = 64  # listing units per sub-folder at most: each lists the whole tree (`list_top_level`)
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


class DataRoots(NamedTuple):
    labeled: str
    pool: str


def data_roots(data: Any) -> DataRoots:
    """The labeled and pool roots of a `DataConfig`: the folders that rows' keys are taken
    relative to (`seeds.relative_key`), as the rows' paths name them (the labeled root resolved,
    the pool's folder or URI as written, a glob's fixed part). A built-in dataset's folders lie
    in its cache."""
    if data.builtin:
        cache = str(Path(data.cache_dir).expanduser().resolve())
        return DataRoots(cache, cache)
    is_uri = "://" in data.unlabeled
    fixed, _ = _split_glob(data.unlabeled if is_uri else os.path.expanduser(data.unlabeled))
    return DataRoots(str(Path(data.labeled).expanduser().resolve()), fixed if is_uri else os.path.abspath(fixed))


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
    if local and info.type == pafs.FileType.Directory:
        try:  # the pool's own folder unreadable: said now, not "no image files" after the probe
            os.scandir(root).close()
        except OSError as exc:
            raise DataError(f"data.unlabeled: cannot list {spec}: {exc.strerror or exc}") from None
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


def os_path(file_id: str) -> str:
    """A local file's path as `os` functions take it, from its `local_id`."""
    path = local_path(file_id)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def folder_identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _broken(path: str, exc: OSError) -> str:
    """Why a local entry that `stat` cannot follow is not read."""
    target = os.readlink(path) if os.path.islink(path) else None
    if target is not None and exc.errno == errno.ENOENT:
        return f"unreadable file: dangling symlink to {target}"
    if exc.errno == errno.ELOOP:
        return f"unreadable file: symlink loop ({os.path.basename(path)} -> {target})"
    return f"unreadable file: {exc.strerror or exc}"


def _local_folder(folder: str, keep: Callable[[str], bool] = lambda path: True,
                  ) -> tuple[list[tuple[str, tuple[int, int]]], list[tuple[str, str]]]:
    """One local folder: its sub-folders with their (device, inode) (a symlink to a folder is
    followed), and its other entries as (path, reason): "" for a regular file, else why it is
    not read (a dangling symlink, a symlink loop, a FIFO or device that a read would block on).
    A folder that cannot be listed is one entry, named, with its reason. An entry that is not a
    folder and that `keep` rejects (another shard's file) is left out before its `stat`."""
    try:
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda e: e.name)
    except OSError as exc:
        return [], [(folder, f"{SKIPPED}unreadable folder, its files are not listed: {exc.strerror or exc}")]
    folders, files = [], []
    for entry in entries:
        if not keep(entry.path) and not _may_be_folder(entry):
            continue
        try:
            info = entry.stat()  # follows a symlink
        except OSError as exc:
            files.append((entry.path, _broken(entry.path, exc)))
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append((entry.path, folder_identity(info)))
        elif stat.S_ISREG(info.st_mode):
            files.append((entry.path, ""))
        else:
            files.append((entry.path, f"{SKIPPED}not a regular file (a FIFO, socket or device; a read could block)"))
    return folders, files


def _may_be_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder, or a link to one, mostly without a `stat` (the listing's
    entry type); False for a link that cannot be followed (the shard that keeps it names why)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _loop(path: str, identity: tuple[int, int], above: dict[tuple[int, int], str]) -> str:
    """The reason a folder is not listed when it is one of the folders above it ("" if not)."""
    if identity not in above:
        return ""
    return f"{SKIPPED}symlink loop: {path} leads back to {above[identity]}, which is listed already"


def walk_local(folder: str, above: dict[tuple[int, int], str],
               keep: Callable[[str], bool] = lambda path: True) -> Iterator[tuple[str, str]]:
    """(path, reason) of every entry below `folder`, depth-first. `above` maps the (device,
    inode) of each folder on the way down to its path: a symlink back to one of them is named as
    a loop, not followed (the walk ends however the links run); a symlink to any other folder is
    followed (a pool may be assembled from links). Files that `keep` rejects are passed over
    unread (every folder is still walked); the caller filters what else it yields."""
    stack = [(folder, above)]
    while stack:
        current, ancestors = stack.pop()
        folders, files = _local_folder(current, keep)
        yield from files
        below = []
        for path, identity in folders:
            loop = _loop(path, identity, ancestors)
            if loop:
                yield path, loop
            else:
                below.append((path, {**ancestors, identity: path}))
        stack += reversed(below)


def _root_above(location: PoolLocation) -> dict[tuple[int, int], str]:
    return {folder_identity(os.stat(location.root)): location.root}


def _walk(location: PoolLocation) -> Iterator[str]:
    """Files below the root, lazily, depth-first: the probe below stops after a bounded count.
    The local filesystem is walked by `walk_local`; pyarrow lists one folder at a time."""
    if isinstance(location.filesystem, pafs.LocalFileSystem):
        yield from (path for path, reason in walk_local(location.root, _root_above(location)) if not reason)
        return
    stack = [location.root]
    while stack:
        folder = stack.pop()
        listing = location.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        stack += sorted((i.path for i in listing if i.type == pafs.FileType.Directory), reverse=True)
        yield from sorted(i.path for i in listing if i.type != pafs.FileType.Directory)


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


def list_top_level(row: dict[str, Any], location: PoolLocation, units: int) -> list[dict[str, Any]]:
    """Ray task: the pool cut into at most about 2 x `units` listing units, the rows that
    `list_below` takes; their number, not the pool's size, sets what the pass holds per unit.
    The root's sub-folders are shared out in `units` groups; when there are fewer sub-folders
    than `units`, each is cut into `shards` units instead (each lists the whole tree and keeps
    its own share of the files: `in_shard`), so one big sub-folder is still read in parallel.
    The root's other entries travel in at most `units` chunks of names, each entry with the
    reason it cannot be read ("" when it can). Local paths travel as `local_id`s (a name that is
    not UTF-8 cannot be an Arrow string)."""
    if location.is_file:
        return [_unit([], [(_id(location, location.root), "")])]
    if isinstance(location.filesystem, pafs.LocalFileSystem):
        found, entries = _local_folder(location.root)
        above = _root_above(location)
        folders = []
        for path, identity in found:
            loop = _loop(path, identity, above)
            if loop:
                entries.append((path, loop))
            else:
                folders.append(local_id(path))
    else:
        listing = location.filesystem.get_file_info(pafs.FileSelector(row["root"]))
        folders = sorted(i.path for i in listing if i.type == pafs.FileType.Directory)
        entries = sorted((i.path, "") for i in listing if i.type != pafs.FileType.Directory)
    entries = [(_id(location, p), reason) for p, reason in entries]
    size = max(FILES_PER_ROW, -(-len(entries) // units))  # at most `units` chunks
    chunks = [_unit([], entries[i:i + size]) for i in range(0, len(entries), size)]
    if len(folders) >= units:
        group = -(-len(folders) // units)
        return [_unit(folders[i:i + group], []) for i in range(0, len(folders), group)] + chunks
    shards = min(MAX_SHARDS, -(-units // len(folders))) if folders else 1
    return [_unit([f], [], shard, shards) for f in folders for shard in range(shards)] + chunks


def _unit(folders: list[str], entries: list[tuple[str, str]], shard: int = 0, shards: int = 1) -> dict[str, Any]:
    return {"folders": folders, "files": [p for p, _ in entries], "reasons": [r for _, r in entries],
            "shard": shard, "shards": shards}


def in_shard(path: str, shard: int, shards: int) -> bool:
    """Whether `path` (an `os` or pyarrow path) is in shard `shard` of `shards`: by a hash of
    the path, the same in every task, so each file of a sharded folder is in exactly one."""
    return shards == 1 or zlib.crc32(os.fsencode(path)) % shards == shard


def _id(location: PoolLocation, path: str) -> str:
    return local_id(path) if isinstance(location.filesystem, pafs.LocalFileSystem) else path


def skip_reason(path: str) -> str:
    """Why a listed file is not read ("" when it is: an image or a Parquet file; a pool may mix
    both, and both are read)."""
    if kind_of(path):
        return ""
    name = path.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):
        return SKIPPED + "hidden or marker file"
    extension = f"'.{name.rsplit('.', 1)[-1]}'" if "." in name else "none"
    return f"{SKIPPED}unsupported extension {extension} (images: {', '.join(IMAGE_EXTENSIONS)}; or parquet)"


def _below(row: dict[str, Any], location: PoolLocation) -> Iterator[tuple[str, str]]:
    """(path, reason) of the entries of one listing unit, as `os`/pyarrow paths: a chunk's
    entries, or the trees of its folders (their entries `in_shard`), a folder at a time."""
    local = isinstance(location.filesystem, pafs.LocalFileSystem)
    yield from ((os_path(p) if local else p, r) for p, r in zip(row["files"], row["reasons"]))
    shard, shards = int(row["shard"]), int(row["shards"])
    for folder in row["folders"]:
        if local:
            folder = os_path(folder)
            above = {**_root_above(location), folder_identity(os.stat(folder)): folder}
            found = walk_local(folder, above, keep=lambda path: in_shard(path, shard, shards))
        else:
            selector = pafs.FileSelector(folder, recursive=True)
            found = sorted((i.path, "") for i in location.filesystem.get_file_info(selector)
                           if i.type != pafs.FileType.Directory)
        yield from ((path, reason) for path, reason in found if in_shard(path, shard, shards))


def list_below(row: dict[str, Any], location: PoolLocation) -> list[dict[str, Any]]:
    """Every wanted entry of a listing unit (sub-folders' trees, a sub-folder's shard, or a
    chunk of top-level entries) as `{file, skip}`; `skip` says why an entry is not read, so
    that every file the user pointed at is either read or counted and named. A reason of the
    entry itself (a folder that cannot be listed, a symlink loop) is kept; for a file, what it
    is (hidden, not an image) comes before why it cannot be read (a dangling symlink to a
    `.txt` is an unsupported extension)."""
    out = []
    for path, reason in _below(row, location):
        if wanted(location, path):
            skip = reason if reason.startswith(SKIPPED) else (skip_reason(path) or reason)
            out.append({"file": _id(location, path), "skip": skip})
    return out
