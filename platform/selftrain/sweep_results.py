"""The sweep's bookkeeping around Tune: the validation split, and each trial's outcome read
back from Tune's results, its `trial.json` and its MLflow run (whose status is settled here:
Tune kills a trial that ASHA stops, which would leave its MLflow run RUNNING)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import PipelineConfig, SweepConfig, with_params
from selftrain.errors import DataError
from selftrain.training.loop import MODEL_FILE
from selftrain.trial import OUTAGE_FILE, TRIAL_TAG, read_trial_record

OBJECTIVE = "val/accuracy"


def split_validation(labeled: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified: `fraction` of each class (at least one image) held out, at least one kept."""
    counts = labeled["label"].value_counts()
    short = counts[counts < 2]
    if len(short):
        raise DataError(f"a sweep holds out validation images per class, but class(es) "
                        f"{sorted(short.index.tolist())} have fewer than 2 labeled images")
    held = []
    for label, group in labeled.groupby("label", sort=True):
        n = min(max(1, round(len(group) * fraction)), len(group) - 1)
        held.append(group.sample(n=n, random_state=seed + int(label)))
    validation = pd.concat(held)
    train = labeled.drop(index=validation.index)
    return train.reset_index(drop=True), validation.reset_index(drop=True)


def _trial_epochs(cfg: PipelineConfig, params: dict[str, Any]) -> int:
    trial = with_params(cfg, params)
    return trial.train.student_epochs * trial.iterations


def _objective(metrics: dict[str, Any]) -> float | None:
    value = metrics.get(OBJECTIVE)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def collect_trials(results: Any, sweep: SweepConfig, cfg: PipelineConfig, out: Path, tracker: Any,
                   parent_id: str) -> list[dict[str, Any]]:
    """One record per trial: params, objective (last reported), status, error, MLflow run id."""
    trials = []
    for result in results:
        trial_id = Path(result.path).name
        params = {key: result.config.get(key) for key in sweep.space}
        metrics = result.metrics or {}
        record = read_trial_record(out, trial_id)
        planned = _trial_epochs(cfg, params)
        # Tune counts the reports of the trial's last run only: a trial restored after its
        # last epoch (the driver died between that epoch's checkpoint and Tune's own state)
        # reports once more and counts 1. Its final model, written at the last epoch of its
        # last iteration, says it trained to the end.
        epochs = int(metrics.get("training_iteration", 0))
        if result.error is None and epochs < planned and record.get("epochs") == planned and _final_model(record):
            epochs = planned
        if result.error is not None:
            status = "failed"
        elif epochs < planned:
            status = "stopped_early"
        else:
            status = "completed"
        runs = [r for r in tracker.runs(parent_id) if r.data.tags.get(TRIAL_TAG) == trial_id]
        run_id = runs[0].info.run_id if runs else None
        if run_id:
            tracker.set_tags(run_id, {"selftrain.trial_status": status})
            if tracker.status(run_id) == "RUNNING":
                tracker.finish(run_id, "FAILED" if status == "failed" else "FINISHED")
        trials.append({
            "trial_id": trial_id, "params": params, "objective": _objective(metrics), "status": status,
            "epochs": epochs, "error": _first_line(result.error), "mlflow_run_id": run_id,
            "teacher_scoring_passes": record["teacher_scoring_passes"], "model_dir": _final_model(record),
        })
    return sorted(trials, key=lambda t: t["trial_id"])


def _final_model(record: dict[str, Any]) -> str | None:
    """The trial's last model, if it trained to the end (the loop writes it at the last epoch)."""
    directory = record.get("model_dir")
    return directory if directory and (Path(directory) / MODEL_FILE).is_file() else None


def _first_line(error: BaseException | None) -> str | None:
    """The user-facing line of a trial's error (our own errors travel inside Ray's wrappers)."""
    if error is None:
        return None
    text = str(error)
    for marker in ("PseudoLabelError: ", "TrainingError: ", "DataError: ", "ConfigError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def tracking_errors(tracker: Any, out: Path) -> list[dict[str, Any]]:
    """What MLflow did not take during a sweep: from the driver's tracker, and from each trial's
    process and epoch logger (each has its own connection, and its own record on disk)."""
    found = [tracker.outage()] if tracker.outage() else []
    for path in sorted((out / "trials").glob(f"*/**/{OUTAGE_FILE}")):
        try:
            found.append({**json.loads(path.read_text()), "file": str(path)})
        except (OSError, json.JSONDecodeError) as exc:  # written whole (atomic); unreadable is still news
            found.append({"where": str(path), "message": f"{path}: cannot be read ({exc})", "not_logged": {}})
    return found
