"""User-facing errors: each names the bad thing (key, path, value) and what to do about it.

The CLI prints these as one clear message without a traceback; anything else is a bug.
"""

import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SelftrainError(Exception):
    """Base class of errors caused by the user's input or data, not by our code."""


class ConfigError(SelftrainError):
    """A pipeline file or override is invalid."""


class DataError(SelftrainError):
    """A data path, folder layout or image set cannot be used."""


class PseudoLabelError(SelftrainError):
    """Pseudo-labelling produced nothing worth training on."""


class TrainingError(SelftrainError):
    """Training diverged (NaN/inf loss) or failed."""


class ClusterError(SelftrainError):
    """The Ray cluster named by RAY_ADDRESS does not answer or lacks the project's dependencies."""


class TrackingError(SelftrainError):
    """The MLflow tracking store does not answer, or has no such experiment."""


class SweepError(SelftrainError):
    """A sweep could not produce a result (every trial failed)."""


class StorageError(SelftrainError):
    """The disk under `output_dir` is full."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, `kill`, a scheduler's preemption), raised in the main thread so
    that cleanup runs as for Ctrl-C; the CLI exits 143 (128 + 15) for it, 130 for Ctrl-C."""


# Set by the handler: Ray (`ray.get`, Ray Train's `fit`) may catch the raised `Terminated` and
# raise a plain KeyboardInterrupt of its own on the way out, so the CLI checks this flag too.
SIGTERM_RECEIVED = threading.Event()


TERMINATED_MESSAGE = "selftrain: terminated (SIGTERM); re-run the same command to resume"


_say_terminated_to: int | None = None  # set by the CLI: see `raise_terminated`


def say_terminated_to(fd: int | None) -> None:
    """Where `raise_terminated` says TERMINATED_MESSAGE (a file descriptor: a copy of the
    terminal's stderr, which the CLI's log redirect leaves alone), or None: not at all."""
    global _say_terminated_to
    _say_terminated_to = fd


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler. It says TERMINATED_MESSAGE at once (`say_terminated_to`), then
    raises: `ray job stop` sends SIGKILL 3 s after SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), and on a
    busy machine the cleanup (MLflow runs marked KILLED, Ray Train stopped) can take that long,
    so a message printed after it could be cut off. `os.write`: a raw write, safe even when the
    signal came in the middle of a print."""
    if _say_terminated_to is not None and not SIGTERM_RECEIVED.is_set():
        try:
            os.write(_say_terminated_to, (TERMINATED_MESSAGE + "\n").encode())
        except OSError:
            pass  # stderr closed: the exit code (143) still says it
    SIGTERM_RECEIVED.set()
    raise Terminated(f"received signal {signum}")


def from_task(exc: BaseException) -> SelftrainError | None:
    """The SelftrainError a Ray task raised, rebuilt from the text of the error Ray gives the
    driver (Ray Data wraps it in `RayTaskError(UserCodeException)`, which keeps the original only
    as text: `selftrain.errors.DataError: <message>`); None for any other error."""
    found = re.search(r"selftrain\.errors\.(\w+): (.+)", str(exc))
    cls = globals().get(found.group(1)) if found else None
    if isinstance(cls, type) and issubclass(cls, SelftrainError):
        return cls(found.group(2).strip())
    return None


@contextmanager
def raised_in_tasks() -> Iterator[None]:
    """Around a Ray Data pass: a SelftrainError from one of its tasks (a Parquet file that cannot
    be read) reaches the caller as itself, one clear message, not Ray's wrapped traceback."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it carries one of ours
        # Ray may also make the wrapper a subclass of the cause (`RayTaskError(DataError)`): an
        # instance of ours whose message is Ray's traceback; it is rebuilt from that text too.
        error = from_task(exc)
        if error is None:
            raise
        raise error from None


def no_space_left(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps, is ENOSPC. Ray passes a worker's or its controller's
    error on as text (`[Errno 28] ... No space left on device`), hence the message too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def full_disk_named(directory: str) -> Iterator[None]:
    """Around a command that writes under `directory`: a full disk (a checkpoint, a Parquet shard,
    state.json) stops it with one message naming the directory, not a traceback. What was
    finished is on disk (checkpoints and state.json are replaced whole, never rewritten in place),
    so the same command resumes once there is room."""
    try:
        yield
    except SelftrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unless the disk is full
        if not no_space_left(exc):
            raise
        try:
            free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise StorageError(
            f"no space left on the device of {directory} ({free}): free space there or set output_dir "
            "elsewhere, then run the same command again: it resumes from the last finished stage, "
            "a model in training from its last checkpoint") from exc
