"""Frozen features of a saved model's backbone, through the scorer's Ray Data path: CPU tasks
decode, an actor pool runs the backbone (`FeatureExtractor`, the scorer with its classifier
split off). Only the images asked for come back to the driver: the labeled and test sets, small
by premise, never the pool.

Used by the representation protocols (`stages/protocols.py`) and to start a fine-tuned
teacher's new classifier from a linear probe (`probed_classifier`, `train.head_init`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data
import torch

from selftrain.config import PipelineConfig, ScoringConfig
from selftrain.errors import DataError
from selftrain.evaluation.linear_probe import as_linear, fit_probe
from selftrain.fsio import atomic_torch_save
from selftrain.models.backbone import strip_classifier
from selftrain.stages.score import TeacherScorer, decoded, infer

CLASSIFIER_INIT_FILE = "classifier_init.pt"  # {"weight", "bias"}: the probe as the classifier's state


class FeatureExtractor(TeacherScorer):
    """The scorer's actor with the model's classifier split off: `features` instead of logits."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        strip_classifier(self.model)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        with self._stream():
            features = self._forward(self.to_device(batch["image"])).cpu().numpy()
        return {**{key: value for key, value in batch.items() if key != "image"}, "features": features}


def extract_features(images: pd.DataFrame, model_dir: str, cfg: ScoringConfig, image_size: int,
                     parquet_column: str = "image") -> pd.DataFrame:
    """`images` (`path`, `label`, any other columns) with `features` (a vector per row), the
    unreadable rows dropped; in one pass through the actor pool."""
    rows = decoded(ray.data.from_pandas(images), image_size, from_paths=True, cfg=cfg, parquet_column=parquet_column)
    out = infer(rows, model_dir, cfg, scorer=FeatureExtractor).to_pandas()
    out = out[out["error"] == ""]
    if out.empty:
        raise DataError(f"none of the {len(images)} images could be read to extract features")
    return out


def probed_classifier(model_dir: str, labeled: pd.DataFrame, cfg: PipelineConfig, num_classes: int,
                      path: Path) -> Path:
    """Fit a linear probe on the frozen features of `model_dir`'s backbone over `labeled`
    (`path`, `label`) and write it to `path` as the state of the model's classifier (`weight`,
    `bias`). Kept when `path` exists: a resumed run starts from the same classifier."""
    if path.exists():
        return path
    out = extract_features(labeled[["path", "label"]], model_dir, cfg.scoring, cfg.data.image_size,
                           cfg.data.parquet_image_column)
    probe = fit_probe(np.stack(out["features"].to_list()).astype(np.float32), out["label"].to_numpy(copy=True),
                      standardise=False)
    weight, bias = as_linear(probe, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}, path)
    return path
