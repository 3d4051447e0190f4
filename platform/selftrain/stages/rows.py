"""What Ray Data runs to make the training streams' rows, and what Ray Train's controller runs
after each epoch: kept free of torch at import.

Ray Train's TrainController, DatasetManager and SplitCoordinator unpickle the datasets (their
functions by reference: this module) and the callbacks, and never run the functions. Importing
torch and torchvision there cost each of them seconds of CPU per `fit` (6 s on a 2-core
machine), in the chain that starts the workers; the tasks that run these import them on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.train import UserCallback

from selftrain.config import NoiseConfig
from selftrain.console import post
from selftrain.data.decode import load_batch
from selftrain.seeds import relative_key
from selftrain.stages.failed_images import report_failed
from selftrain.stages.passes import other_view, row_seeds


def _decoded(batch: dict[str, Any], size: int, parquet_column: str, failed_images: Any, passes: Any,
             stream: str, seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """The batch's images decoded, the mask of those that decoded, and their seeds. A file that
    vanished or broke since it was validated (or indexed) is dropped and reported."""
    loaded = load_batch({"path": batch["path"]}, size, parquet_column)
    ok = report_failed(failed_images, batch["path"], loaded["error"])
    return loaded["image"][ok], ok, row_seeds(passes, stream, seed, batch["key"], keep=ok)


def prepare_rows(batch: dict[str, Any], size: int, noise: NoiseConfig, randaugment: bool,
                 target_column: str, parquet_column: str, failed_images: Any = None,
                 passes: Any = None, seed: int = 0) -> dict[str, Any]:
    """`{path, key, <target_column>}` -> `{image: uint8 NCHW augmented, target: float32 N x C}`;
    each row augmented from its own seed (`stages/passes.py`)."""
    from selftrain.data.augment import augment_images, train_transform

    images, ok, seeds = _decoded(batch, size, parquet_column, failed_images, passes, "train", seed)
    return {"image": augment_images(images, train_transform(size, noise, randaugment), seeds=seeds),
            "target": np.stack(list(batch[target_column]))[ok].astype(np.float32)}


def pool_views(batch: dict[str, Any], size: int, noise: NoiseConfig, parquet_column: str,
               failed_images: Any = None, passes: Any = None, seed: int = 0) -> dict[str, Any]:
    """`{path, key, index, label}` of pool images -> a weak and a strong view of each (uint8
    NCHW), each from a seed of its own (`stages/passes.py`)."""
    from selftrain.data.augment import augment_images, strong_transform, train_transform

    images, ok, seeds = _decoded(batch, size, parquet_column, failed_images, passes, "unlabeled", seed)
    weak = augment_images(images, train_transform(size, noise, randaugment=False), seeds=seeds)
    return {"weak": weak, "strong": augment_images(weak, strong_transform(noise), channels_first=True,
                                                   seeds=other_view(seeds)),
            "index": np.asarray(batch["index"])[ok], "label": np.asarray(batch["label"])[ok]}


def contrastive_views(batch: dict[str, Any], size: int, noise: NoiseConfig, crop_scale_min: float,
                      color_jitter: float, parquet_column: str, failed_images: Any = None,
                      passes: Any = None, seed: int = 0, affine: dict[str, float] | None = None) -> dict[str, Any]:
    """`{path, key, ...}` of pool images -> two independently augmented views of each (uint8
    NCHW), each from a seed of its own (`stages/passes.py`); `affine`: `rotation`, `shear`,
    `translate` of `contrastive_transform`."""
    from selftrain.data.augment import augment_images, contrastive_transform

    images, _, seeds = _decoded(batch, size, parquet_column, failed_images, passes, "train", seed)
    transform = contrastive_transform(size, noise, crop_scale_min, color_jitter, **(affine or {}))
    return {"view0": augment_images(images, transform, seeds=seeds),
            "view1": augment_images(images, transform, seeds=other_view(seeds))}


def keyed(batch: dict[str, Any], repeat: int, root: str) -> dict[str, Any]:
    """A row's key, which seeds its augmentation: its path below the data's `root` (the same
    wherever the data lies) and which repeat of it this is."""
    batch["key"] = np.array([f"{relative_key(path, root)}|{repeat}" for path in batch["path"]], dtype=object)
    return batch


class MlflowEpochs(UserCallback):
    """Logs each epoch's report to an MLflow run as it happens (runs in the Ray Train
    controller), so a trial that Tune stops early keeps the epochs it trained. What the store
    did not take (it stopped answering) is written to `outage_file` after each epoch, for the
    sweep's summary: this process's own record ends with it."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_id: str, step_offset: int = 0,
                 outage_file: str | None = None):
        self.tracking_uri, self.experiment_id, self.run_id = tracking_uri, experiment_id, run_id
        self.step_offset, self.outage_file = step_offset, outage_file
        self._tracker = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from selftrain.fsio import atomic_write_json
        from selftrain.tracking import Tracker

        if self._tracker is None:  # the experiment exists: the store is not asked until the first epoch
            self._tracker = Tracker("", self.tracking_uri, experiment_id=self.experiment_id)
        epoch_metrics = dict(metrics[0])
        step = self.step_offset + int(epoch_metrics.pop("epoch"))
        self._tracker.log_metrics(self.run_id, epoch_metrics, step=step)
        outage = self._tracker.outage()
        if outage and self.outage_file:
            atomic_write_json(self.outage_file, {**outage, "where": "epoch metrics (Ray Train controller)"})


class ProgressEpochs(UserCallback):
    """Posts each epoch's report to the CLI's progress board (runs in the Ray Train controller)."""

    def __init__(self, board: Any, task: str, epochs: int):
        self.board, self.task, self.epochs = board, task, epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        fields = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
        post(self.board, {"task": self.task, "unit": "epoch", "total": self.epochs,
                          "done": int(fields.get("epoch", 0)), "fields": fields})
