"""Test-set evaluation: accuracy and confusion matrix, through the same scorer as the pool.
Given `out_dir`, the per-image predictions and the matrix are kept there (`evaluation.test_predictions`):
the test set is small, and `selftrain report` draws its confusion matrices from those files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray.data

from selftrain.config import ScoringConfig
from selftrain.evaluation.test_predictions import COLUMNS, confusion_matrix, write_evaluation
from selftrain.stages.score import score


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    confusion: np.ndarray  # rows: true class, columns: predicted class
    count: int


def evaluate(test: pd.DataFrame, model_dir: str, cfg: ScoringConfig, image_size: int, num_classes: int,
             out_dir: Path | None = None, classes: list[str] | None = None) -> Evaluation:
    """`test` is the validated test index (`path`, `label`); small, so results come back whole.
    With `out_dir`, `test_predictions.parquet` and `confusion_matrix.json` are written there."""
    rows = ray.data.from_pandas(test[["path", "label"]])
    scored = score(rows, model_dir, cfg, image_size, from_paths=True)
    result = scored.select_columns(COLUMNS).to_pandas()
    confusion = confusion_matrix(result, num_classes)
    if out_dir is not None:
        write_evaluation(out_dir, result, confusion, classes or [str(i) for i in range(num_classes)])
    count = int(confusion.sum())
    return Evaluation(float(np.trace(confusion) / count) if count else 0.0, confusion, count)
