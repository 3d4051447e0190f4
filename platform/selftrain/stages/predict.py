"""`selftrain predict`: label new images with a trained model, through the scoring path.

The same Ray Data pipeline as the teacher's pass over the pool (`score`: listed and read in
tasks, decoded per file, an actor pool on the GPUs when present), then one row per image with
its class name, confidence and class probabilities. Unreadable files keep their row and reason.

MODEL is a model folder (`<output_dir>/iter<i>/model`: `model.pt` + `model.json`), an MLflow run
id of a trained model (its logged model `model`), `runs:/<run id>/model`, or a registered model:
`models:/<name>@<alias>` (`models:/<name>@best`: the best final model so far) or
`models:/<name>/<version>`. From MLflow only the model's `model.pt` + `model.json` are downloaded.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain.config import ScoringConfig
from selftrain.console import end_task, progress_task
from selftrain.data.pool import read_pool
from selftrain.errors import ConfigError, raised_in_tasks
from selftrain.stages.score import check_scores, score
from selftrain.training.loop import SPEC_FILE

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model(model: str, download_root: str) -> str:
    """A local model folder for MODEL (a folder, an MLflow run id, `runs:/<id>/<name>`,
    `models:/<name>@<alias>` or `models:/<name>/<version>`)."""
    if Path(model).is_dir():
        if not (Path(model) / SPEC_FILE).exists():
            raise ConfigError(f"MODEL {model}: no {SPEC_FILE} in this folder; point at a model folder "
                              "such as <output_dir>/iter1/model")
        return str(Path(model).resolve())  # Ray's workers run in other directories
    uri = f"runs:/{model}/model" if _RUN_ID.match(model) else model
    if not uri.startswith(("runs:/", "models:/")):
        raise ConfigError(f"MODEL {model}: not a model folder, an MLflow run id, runs:/<run id>/model, "
                          "models:/<name>@<alias> or models:/<name>/<version>")
    from selftrain.tracking import check_tracking_store, download_model_files

    check_tracking_store()  # a dead store fails in seconds, naming it
    Path(download_root).mkdir(parents=True, exist_ok=True)
    return download_model_files(uri, download_root, f"MODEL {model}")


def _probabilities(batch: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    logits = np.stack(batch["logits"].to_numpy()).astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    ok = (batch["error"] == "").to_numpy()
    names = np.array(classes, dtype=object)
    return pd.DataFrame({
        "path": batch["path"],
        "class": np.where(ok, names[np.clip(batch["prediction"].to_numpy(), 0, None)], None),
        "class_index": np.where(ok, batch["prediction"].to_numpy(), -1),
        "confidence": np.where(ok, probs.max(axis=1), 0.0).astype(np.float32),
        "probabilities": [list(p.astype(np.float32)) if good else [] for p, good in zip(probs, ok)],
        "error": batch["error"],
    })


def predict(model: str, data: str, out: str, cfg: ScoringConfig, parquet_column: str = "image") -> dict[str, Any]:
    """Write `{path, class, class_index, confidence, probabilities, error}` for every file of
    `data` to the Parquet folder `out`; returns counts."""
    with tempfile.TemporaryDirectory(prefix="selftrain-predict-") as tmp:
        model_dir = resolve_model(model, tmp)
        spec = json.loads((Path(model_dir) / SPEC_FILE).read_text())  # the actors build the model
        classes = spec.get("classes") or [str(c) for c in range(spec["num_classes"])]
        rows = read_pool(data, parquet_column, None)
        progress = progress_task(f"predicting {data}")  # under the CLI: images done, img/s, unreadable
        scored = score(rows, model_dir, cfg, spec["image_size"], from_paths=False, progress=progress)
        try:
            with raised_in_tasks():  # a Parquet file that cannot be read: a DataError naming it
                scored.map_batches(_probabilities, fn_kwargs={"classes": classes}, batch_format="pandas",
                                   num_cpus=0.5).write_parquet(out, ray_remote_args={"num_cpus": 0.5})
        finally:
            end_task(progress)
    images, rejected = check_scores(out, cfg.max_rejected_fraction, f"DATA {data}")
    return {"out": out, "files": images, "unreadable": rejected, "classes": classes}
