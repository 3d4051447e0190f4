"""Test-set evaluation: accuracy and confusion matrix, through the same scorer as the pool."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray.data

from selftrain.config import ScoringConfig
from selftrain.stages.score import score


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    confusion: np.ndarray  # rows: true class, columns: predicted class
    count: int


def evaluate(test: pd.DataFrame, model_dir: str, cfg: ScoringConfig, image_size: int, num_classes: int) -> Evaluation:
    """`test` is the validated test index (`path`, `label`); small, so results come back whole."""
    rows = ray.data.from_pandas(test[["path", "label"]])
    scored = score(rows, model_dir, cfg, image_size, from_paths=True)
    result = scored.select_columns(["label", "prediction", "error"]).to_pandas()
    result = result[result["error"] == ""]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (result["label"].to_numpy(), result["prediction"].to_numpy()), 1)
    count = int(confusion.sum())
    return Evaluation(float(np.trace(confusion) / count) if count else 0.0, confusion, count)
