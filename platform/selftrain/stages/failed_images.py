"""Images that fail to read or decode while a model trains: counted and named, never dropped
without a word.

Training decodes its images again every pass, in Ray Data tasks (`stages/train.py`,
`stages/pretrain.py`). The files were checked before (the labeled set when it was loaded, the
pool when it was scored or indexed), so a failure here means a file changed or vanished since,
or a read that failed for good after its retries. The row cannot stay in the batch (every batch
must keep its size, `training/loop.py`), so the task drops it and tells one small actor, which
the driver asks after `fit` (`TrainedModel.failed_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

LISTED = 1000  # failed images named per training run: a bounded list, however large the pool


@ray.remote(num_cpus=0)
class FailedImages:
    """Every failure reported by the training data tasks: distinct images, the first LISTED of
    them named with their reason, and how many decodes failed in all (an image fails once per pass)."""

    def __init__(self):
        self.paths: set[str] = set()
        self.named: list[dict[str, str]] = []
        self.failures = 0

    def add(self, failed: Sequence[tuple[str, str]]) -> None:
        for path, reason in failed:
            self.failures += 1
            if path not in self.paths:
                self.paths.add(path)
                if len(self.named) < LISTED:
                    self.named.append({"path": path, "reason": f"failed in training: {reason}"})

    def report(self) -> dict[str, Any]:
        return {"count": len(self.paths), "failures": self.failures, "named": self.named}


def failed_images_actor() -> Any:
    """A new `FailedImages` actor, outside any Tune trial's placement group (a trial's bundle
    holds no CPU for it, `trial._outside_trial_bundle`)."""
    return FailedImages.options(scheduling_strategy="DEFAULT").remote()


def report_failed(failed_images: Any, paths: Any, errors: np.ndarray) -> np.ndarray:
    """The mask of rows that decoded; the others are told to `failed_images` (when given)."""
    ok = np.asarray(errors) == ""
    if failed_images is not None and not ok.all():
        bad = np.flatnonzero(~ok)
        ray.get(failed_images.add.remote([(str(paths[i]), str(errors[i])) for i in bad]))
    return ok


def failed_images_report(failed_images: Any) -> dict[str, Any]:
    """What the actor counted (nothing when there is none)."""
    if failed_images is None:
        return {"count": 0, "failures": 0, "named": []}
    return ray.get(failed_images.report.remote())
