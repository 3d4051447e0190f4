"""`selftrain compare`: the runs of an experiment, or of one sweep, as one table, best first.

Built from `mlflow.search_runs` (a pandas DataFrame). The table keeps what tells runs apart:
the params that differ between them, the key metrics, duration and status.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from selftrain.errors import ConfigError
from selftrain.tracking import PARENT_TAG, search_runs

KEY_METRICS = ("val/accuracy", "eval/accuracy", "eval/final_accuracy", "sweep/best_val_accuracy",
               "sweep/best_test_accuracy", "pseudo/kept_fraction", "pseudo/accuracy",
               "sweep/teacher_scoring_passes")
DEFAULT_METRICS = ("val/accuracy", "eval/final_accuracy", "eval/accuracy", "sweep/best_val_accuracy")


def sweep_run_id(sweep: str) -> str:
    """A sweep given as its output_dir (summary.json or state.json there) or as its MLflow run id."""
    directory = Path(sweep).expanduser()
    for name in ("summary.json", "state.json"):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            run_id = data.get("mlflow_run_id") or data.get("records", {}).get("mlflow_run_id")
            if run_id:
                return run_id
    if directory.exists():
        raise ConfigError(f"--sweep {sweep}: no summary.json or state.json with an MLflow run id there")
    return sweep


def _varying_params(runs: pd.DataFrame) -> list[str]:
    """Params set on at least two runs that do not all agree (the knobs that were compared)."""
    out = []
    for column in (c for c in runs.columns if c.startswith("params.")):
        present = runs[column].dropna()
        if len(present) >= 2 and present.nunique() > 1:
            out.append(column)
    return out


def compare_runs(experiment: str, sweep: str | None = None, metric: str | None = None,
                 ascending: bool = False, limit: int | None = None) -> pd.DataFrame:
    filter_string = f"tags.`{PARENT_TAG}` = '{sweep_run_id(sweep)}'" if sweep else ""
    runs = search_runs(experiment, filter_string)
    if runs.empty:
        raise ConfigError(f"no runs in experiment {experiment!r}" + (f" under sweep {sweep}" if sweep else ""))
    metrics = [m for m in KEY_METRICS if f"metrics.{m}" in runs.columns]
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if f"metrics.{m}" in runs.columns), None)
    elif f"metrics.{metric}" not in runs.columns:
        found = sorted(c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics."))
        raise ConfigError(f"--metric {metric!r}: no run of {experiment!r} logged it; metrics there: "
                          f"{', '.join(found)}")
    if metric and metric not in metrics:
        metrics.insert(0, metric)
    table = pd.DataFrame({
        "run": runs.get("tags.mlflow.runName"),
        "role": runs.get("tags.selftrain.role"),
        "status": runs["status"],
        "trial_status": runs.get("tags.selftrain.trial_status"),
        "minutes": ((runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60).round(1),
        **{c.removeprefix("params."): runs[c] for c in _varying_params(runs)},
        **{m: runs[f"metrics.{m}"] for m in metrics},
        "run_id": runs["run_id"],
    }).dropna(axis="columns", how="all")
    if metric:
        table = table.sort_values(metric, ascending=ascending, na_position="last")
    return table.head(limit) if limit else table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return table.to_markdown(index=False, floatfmt=".4f")
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
