"""Give the driver's freed heap back to the operating system while a long pass runs.

glibc's malloc keeps memory that a process frees, to reuse it, and returns it to the system only
when the free space sits at the top of a heap. Over a pool pass the driver's Ray threads (the
core worker's RPCs, Ray Data's executor) allocate and free per-task state in many small pieces,
so freed pieces stay wedged between live ones and the RSS only climbs: 18-22 MB more over a pass
of 200,000 files after a warm-up pass. At the end of that pass all of it was free memory:
`malloc_trim(0)` brought the RSS back below where the pass began. `returning_freed_memory` calls
it every few seconds from a thread while the pass runs, so the peak stays nearer what is live:
10 MB over 200,000 files, 49 MB over 1,000,000 (against ~60 MB untrimmed; what is left grows
with the pool and is live during the pass, see the README's driver-memory notes).

Only on glibc (Linux); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TRIM_EVERY_S = 2.0  # a trim walks the arenas and madvises free pages: a few ms


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim(pad)`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


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
