"""Bench part 4, no goal of its own: how much of a fast device's speed the scoring pipeline keeps.

On a CPU the teacher's forward pass dominates every batch, so `scoring_ratio` there says little
about a GPU, where ResNet-50 scores about 9k images/s and every millisecond of per-batch host
work shows. This part runs the real scoring pipeline (`stages.score.infer`: Ray Data's actor
pool, `TeacherScorer.__call__`, the logits streamed back to the driver) over decoded 224 px
images in the object store, with only the device replaced by a stand-in:

- the copy to the device is a copy into a reused host buffer (as into cached pinned memory);
- the forward pass holds the batch for `batch / device_images_per_s` seconds on one device
  (batches take turns, as kernels do on one GPU), and the waiting thread holds no GIL, as a
  thread waiting on a CUDA stream does.

`plumbing_ratio` = the time the stand-in device was busy / the time from the start of its first
batch to the end of its last: the share of the device's speed the pipeline keeps (the device's
own clock: the bursts in which Ray hands results to the driver do not distort it). Measured for
`scoring.concurrent_batches` = 1 and for its GPU default. The default device speed is the bare
ResNet-50 loop measured on an H100 (9,213 images/s at batch 256, bf16, channels_last; that loop
was weaker than today's, so a real H100 may be faster still).

An upper bound for a GPU, not a GPU measurement: a real scoring thread also holds the GIL while
it launches the model's few hundred kernels per batch, which the stand-in leaves out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray.data
import torch

from selftrain.bench.scoring import materialised_images
from selftrain.config import ScoringConfig
from selftrain.stages.score import GPU_CONCURRENT_BATCHES, TeacherScorer, infer, rows_per_task

H100_RESNET50_IMAGES_PER_S = 9213.0  # `selftrain bench --parts scoring` bare loop, README
NUM_CLASSES = 10
DISTINCT = 64  # distinct random images, repeated to the part's image count


class StandInDevice(TeacherScorer):
    """`TeacherScorer` with its model and device replaced; its `__call__` is the real one."""

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool,
                 device_images_per_s: float):
        self.device, self.on_gpu, self.amp, self.channels_last = torch.device("cpu"), False, False, False
        self.spec = {"num_classes": NUM_CLASSES}
        self._thread = threading.local()
        self._busy = threading.Lock()  # one device
        self.seconds_per_image = 1.0 / device_images_per_s

    def to_device(self, images: np.ndarray) -> torch.Tensor:
        buffer = getattr(self._thread, "buffer", None)
        if buffer is None or buffer.shape != images.shape:
            buffer = self._thread.buffer = np.empty_like(images)
        np.copyto(buffer, images)
        return torch.from_numpy(buffer)

    def logits(self, x: torch.Tensor) -> np.ndarray:
        with self._busy:
            began = time.perf_counter()
            nominal = self.seconds_per_image * len(x)
            time.sleep(nominal)
            # The nominal time is what the device needs; `sleep` oversleeps by a scheduler tick,
            # which is the pipeline's wait, not the device's work.
            self._thread.busy = (began, time.perf_counter(), nominal)
        return np.zeros((len(x), NUM_CLASSES), dtype=np.float32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        began, ended, nominal = self._thread.busy
        out["device_began"] = np.full(len(out["prediction"]), began)
        out["device_ended"] = np.full(len(out["prediction"]), ended)
        out["device_nominal"] = np.full(len(out["prediction"]), nominal)
        return out


def device_utilisation(dataset: ray.data.Dataset) -> dict[str, float]:
    """Run the pipeline to the end; the stand-in device's images/s and busy share over its span."""
    calls, images = set(), 0  # a set: one call's output may span blocks
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        images += len(batch["prediction"])
        calls.update(zip(batch["device_began"].tolist(), batch["device_ended"].tolist(),
                         batch["device_nominal"].tolist()))
    span = max(end for _, end, _ in calls) - min(began for began, _, _ in calls)
    busy = sum(nominal for _, _, nominal in calls)
    return {"images": images, "pipeline_images_per_s": images / span, "device_busy_seconds": busy,
            "plumbing_ratio": busy / span}


def run_plumbing(count: int, size: int, cfg: ScoringConfig,
                 device_images_per_s: float = H100_RESNET50_IMAGES_PER_S,
                 settings: tuple[int, ...] = (1, GPU_CONCURRENT_BATCHES)) -> dict[str, Any]:
    """The pipeline into the stand-in device once per `scoring.concurrent_batches` in `settings`."""
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, (DISTINCT, size, size, 3), dtype=np.uint8)
    images = distinct[np.arange(count) % DISTINCT]
    result: dict[str, Any] = {"images": count, "image_size": size, "batch_size": cfg.batch_size,
                              "device_images_per_s": device_images_per_s, "by_concurrent_batches": {}}
    for calls in sorted(set(settings)):
        settings = cfg.model_copy(update={"use_gpu": False, "num_actors": 1, "concurrent_batches": calls})
        rows = materialised_images(images, rows_per_task(settings, size))  # blocks as a pool pass makes them
        result["by_concurrent_batches"][str(calls)] = device_utilisation(
            infer(rows, "", settings, scorer=StandInDevice, device_images_per_s=device_images_per_s))
    result["plumbing_ratio"] = result["by_concurrent_batches"][str(GPU_CONCURRENT_BATCHES)]["plumbing_ratio"]
    return result
