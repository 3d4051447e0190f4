"""What a model's test-set evaluation leaves on disk, beside the model (`<output_dir>/<key>/evaluation/`):
the per-image predictions (`test_predictions.parquet`: path, label, prediction, confidence, error)
and the confusion matrix counted from them (`confusion_matrix.json`). `selftrain report` draws the
matrices from these files, so the page shows the numbers the run computed. No Ray, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain.fsio import atomic_write_json, atomic_write_parquet

EVALUATION_DIR = "evaluation"
PREDICTIONS_FILE = "test_predictions.parquet"
CONFUSION_FILE = "confusion_matrix.json"
COLUMNS = ["path", "label", "prediction", "confidence", "error"]


def evaluation_dir(output_dir: Path | str, key: str) -> Path:
    """Where the evaluation of stage `key` (iter0, iter1, ..., baseline) is written."""
    return Path(output_dir) / key / EVALUATION_DIR


def confusion_matrix(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class, over the readable test images."""
    good = rows[rows["error"] == ""]
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (good["label"].to_numpy(dtype=np.int64), good["prediction"].to_numpy(dtype=np.int64)), 1)
    return matrix


def confusion_record(matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """`confusion_matrix.json` (also the MLflow artifact of the same name)."""
    count = int(matrix.sum())
    return {"classes": list(classes), "matrix": matrix.tolist(), "test_images": count,
            "accuracy": float(np.trace(matrix) / count) if count else 0.0}


def write_evaluation(directory: Path, rows: pd.DataFrame, matrix: np.ndarray, classes: list[str]) -> None:
    """Both files, each written whole or not at all; unreadable test images keep their row."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(directory / PREDICTIONS_FILE, rows[COLUMNS].reset_index(drop=True))
    atomic_write_json(directory / CONFUSION_FILE, confusion_record(matrix, classes), indent=1)


def read_confusion(directory: Path) -> dict[str, Any] | None:
    """The recorded confusion matrix, or None when this evaluation wrote none (a run from before
    evaluations were kept on disk, or one stopped before the model was evaluated)."""
    path = directory / CONFUSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None
