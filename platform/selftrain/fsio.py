"""Files that a crash cannot leave half-written, and one process per output directory.

`atomic_write_text` / `atomic_write_parquet` / `atomic_torch_save`: write a uniquely named temporary file beside the
target, fsync it, rename it over the target and fsync the directory, so a reader sees the old
file or the new one, never a truncated one, even after a power loss.

`OutputLock`: `fcntl.flock` on `<output_dir>/.selftrain.lock`. The kernel drops the lock when the
holding process dies (SIGKILL and the OOM killer included), so a dead run never blocks the next;
the file records who holds it (pid, host, command) for the message a second run gets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from selftrain.errors import ConfigError

LOG_DIR = "logs"  # the console's log files (`console.py`)
LOCK_FILE = ".selftrain.lock"
_HELD: dict[Path, int] = {}  # directories this process holds, with their nesting depth


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's own blocks)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and platforms) do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path | str, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: Path | str, data: Any, **dump_kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(data, **dump_kwargs))


def atomic_write_parquet(path: Path | str, frame: Any) -> None:
    """A pandas DataFrame as one Parquet file."""
    _atomic_write(Path(path), lambda handle: frame.to_parquet(handle, index=False))


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch  # only where models are saved: the driver's CLI stays light

    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


class OutputLock:
    """Hold `<directory>/.selftrain.lock` for the life of a run or sweep.

    A second holder is refused at once with a `ConfigError` naming the first (pid, host, command).
    Re-entrant within one process: the CLI takes it before starting Ray, the pipeline again inside.
    """

    def __init__(self, directory: Path | str, kind: str = "run"):
        self.directory = Path(directory).expanduser().resolve()
        self.kind = kind
        self._handle: IO[str] | None = None
        self._created = False

    def acquire(self) -> OutputLock:
        if self.directory in _HELD:
            _HELD[self.directory] += 1
            return self
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        handle = open(path, "a+")  # never truncates what the holder wrote before we know we hold it
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise ConfigError(f"{self.directory} is in use by another selftrain {self.kind} ({holder}); "
                              "wait for it to finish, stop it, or use another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}\n")
        handle.flush()
        self._handle = handle
        _HELD[self.directory] = 1
        return self

    def release(self) -> None:
        if _HELD.get(self.directory, 0) > 1:
            _HELD[self.directory] -= 1
            return
        _HELD.pop(self.directory, None)
        if self._handle is not None:
            self._handle.truncate(0)  # a stale holder line would mislead nobody, but keep it clean
            # A run that failed before writing anything (Ray unreachable, bad input) leaves no
            # output_dir behind if it made it: only the lock, and the log of a start whose error
            # was printed (`console.py`), are there then.
            if self._created and {p.name for p in self.directory.iterdir()} <= {LOCK_FILE, LOG_DIR}:
                shutil.rmtree(self.directory / LOG_DIR, ignore_errors=True)
                (self.directory / LOCK_FILE).unlink()
                self.directory.rmdir()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
