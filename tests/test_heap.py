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


FORWARDS_IN_A_THREAD = """
import resource, sys, threading
import torch
from selftrain.heap import reusing_freed_memory

torch.set_num_threads(1)
if sys.argv[1] == "reuse":
    assert reusing_freed_memory()
from torchvision.models import resnet18

model = resnet18(num_classes=10).eval()  # the bench's scoring model; at 32 px and a batch of 128:
x, faults = torch.rand(128, 3, 32, 32), []  # activations of 2-8 MB

def forwards():  # as Ray Data's actor calls the model: from a thread of its own
    with torch.inference_mode():
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=forwards)
thread.start()
thread.join()
print(max(faults[2:]))  # after two forwards: the heap as large as a forward needs
"""


def _faults_per_forward(mode: str) -> int:
    import subprocess

    done = subprocess.run([sys.executable, "-c", FORWARDS_IN_A_THREAD, mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout.split()[-1])


def test_a_thread_calling_a_model_stops_faulting_its_activations_in_again():
    """glibc on its own hands a thread's freed activations back after each forward, and the
    next forward faults them in again (the control: about 6,000 pages, 24 MB, here); with
    `reusing_freed_memory` a forward reuses the heap the one before it had."""
    control, reusing = _faults_per_forward("control"), _faults_per_forward("reuse")
    assert control > 1_000, control
    assert reusing < control / 20, (control, reusing)
