"""Tune glibc's malloc for two kinds of process: the driver over a long pass, and the scoring actor.

`returning_freed_memory`: give the driver's freed heap back to the operating system while a
long pass runs.

glibc's malloc keeps memory that a process frees, to reuse it, and returns it to the system only
when the free space sits at the top of a heap. Over a pool pass the driver's Ray threads (the
core worker's RPCs, Ray Data's executor) allocate and free per-task state in many small pieces,
so freed pieces stay wedged between live ones and the RSS only climbs: 18-22 MB more over a pass
of 200,000 files after a warm-up pass. At the end of that pass all of it was free memory:
`malloc_trim(0)` brought the RSS back below where the pass began. `returning_freed_memory` calls
it every few seconds from a thread while the pass runs, so the peak stays nearer what is live:
10 MB over 200,000 files, 49 MB over 1,000,000 (against ~60 MB untrimmed; what is left grows
with the pool and is live during the pass, see the README's driver-memory notes).

`reusing_freed_memory`: the opposite, for a process that calls a model batch after batch from a
thread other than its main one, as Ray Data's scoring actor does. Each forward pass allocates
and frees tens of MB of activations; in a thread's arena glibc hands that memory back after
each batch (its trim threshold is 32 MB at most unless set), and the next batch faults every
page in again: 9,000 minor faults and 9% of the time per batch of 256 (ResNet-18 at 32 px, one
thread) in the scoring actor, none once freed memory is kept.

Only on glibc (Linux); elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

TRIM_EVERY_S = 2.0  # a trim walks the arenas and madvises free pages: a few ms
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
KEEP_FREED_BYTES = 1 << 30  # free memory at a heap's top that is kept for reuse, not handed back
MMAP_ABOVE_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit: larger blocks get their own mapping


def _libc_function(name: str) -> Any:
    """A glibc function, or None where the C library has none (musl, macOS)."""
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library) if library else None
    except OSError:
        return None
    return getattr(libc, name, None)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim(pad)`, or None."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def reusing_freed_memory() -> bool:
    """From now on, this process keeps up to KEEP_FREED_BYTES of freed heap for reuse (in every
    arena), and serves blocks up to MMAP_ABOVE_BYTES from its heaps, not from a mapping of
    their own that is unmapped when freed. For a process that repeats the same allocations
    batch after batch; it holds at most what its batches already need. Returns whether it
    could (glibc)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


@contextmanager
def returning_freed_memory(every_s: float = TRIM_EVERY_S) -> Iterator[bool]:
    """While the block runs, hand freed heap memory back to the system every `every_s` seconds
    (and once at the end). Yields whether it can (glibc); where it cannot, the block just runs."""
    trim = _malloc_trim()
    if trim is None:
        yield False
        return
    stop = threading.Event()

    def trimming() -> None:
        while not stop.wait(every_s):
            trim(0)

    thread = threading.Thread(target=trimming, name="selftrain-malloc-trim", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()
        trim(0)
