"""The driver hands freed heap memory back to the system during a pool pass (glibc)."""

import sys
import time

import pytest

from selftrain.heap import returning_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")

FREED_MB = 150


def _anon_mb() -> float:
    """This process's private resident memory (RssAnon), MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))


def _allocate_and_free() -> tuple[float, float]:
    """RssAnon holding ~150 MB of 1 KB objects, and 0.3 s after they are freed. A later
    allocation pins the top of the heap, as the driver's long-lived state does, so glibc cannot
    hand the freed space back by itself."""
    blobs = [bytes(1000) + bytes([i % 256]) for i in range(FREED_MB * 1000)]
    pin = bytes(2000)
    held = _anon_mb()
    del blobs
    time.sleep(0.3)
    after = _anon_mb()
    del pin
    return held, after


def test_freed_heap_stays_with_the_process_on_its_own():
    """The control: without trimming, freed small pieces stay resident."""
    held, after = _allocate_and_free()
    assert held - after < 0.2 * FREED_MB, (held, after)


def test_freed_heap_goes_back_to_the_system_while_the_block_runs():
    with returning_freed_memory(every_s=0.05) as trimming:
        assert trimming  # glibc here
        held, after = _allocate_and_free()
    assert held - after > 0.8 * FREED_MB, (held, after)
