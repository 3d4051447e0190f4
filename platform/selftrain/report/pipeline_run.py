"""A pipeline run's output directory read back for the report: `summary.json` when the run
finished, else the same shape rebuilt from `state.json` (the stages that finished) with a list of
what is missing; per-iteration pseudo-label statistics and the resolved config always come from
`state.json`, the confusion matrices from each model's `evaluation/` folder. Nothing here is
recomputed: every number is one the run wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from selftrain.config import PipelineConfig
from selftrain.evaluation.test_predictions import evaluation_dir, read_confusion

SUMMARY_FILE = "summary.json"
STATE_FILE = "state.json"


@dataclass
class PipelineRun:
    out: Path
    summary: dict[str, Any]  # summary.json, or the same keys from the finished stages
    records: dict[str, Any]  # state.json's records (empty when state.json is gone)
    config: dict[str, Any] | None  # the resolved config as the ledger stored it (credentials masked)
    finished: bool
    missing: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.summary["classes"]

    @property
    def threshold(self) -> float | None:
        return (self.config or {}).get("pseudo_label", {}).get("threshold")

    def models(self) -> list[tuple[str, dict[str, Any]]]:
        """(stage key, result record) of every evaluated model: baseline, teacher, students."""
        found = [("baseline", self.summary["baseline"])] if self.summary.get("baseline") else []
        return found + [(f"iter{r['iteration']}", r) for r in self.summary["iterations"]]

    def pseudo_labels(self) -> list[tuple[int, dict[str, Any]]]:
        """(iteration, the pseudo-label stage's record) of every iteration that has one."""
        found = ((i, self.records.get(f"iter{i}/pseudo_labels")) for i in range(1, self.iterations + 1))
        return [(i, record) for i, record in found if record]

    @property
    def iterations(self) -> int:
        configured = (self.config or {}).get("iterations")
        return configured if configured is not None else len(self.summary["iterations"]) - 1

    def confusion(self, key: str) -> dict[str, Any] | None:
        return read_confusion(evaluation_dir(self.out, key))


def read_pipeline_run(out: Path, state: dict[str, Any] | None, summary: dict[str, Any] | None) -> PipelineRun:
    records = (state or {}).get("records", {})
    config = (state or {}).get("config")
    if summary is not None:
        return PipelineRun(out, summary, records, config, finished=True,
                           missing=[] if state else [f"{STATE_FILE} is gone: no pseudo-label statistics or config"])
    return PipelineRun(out, _partial_summary(out, records), records, config, finished=False,
                       missing=_missing(out, records, config))


def _partial_summary(out: Path, records: dict[str, Any]) -> dict[str, Any]:
    """What `_summarize` (self_training) would write, from the stages that finished."""
    results = []
    while f"iter{len(results)}/result" in records:
        results.append(records[f"iter{len(results)}/result"])
    baseline = records.get("baseline/result")
    rejected: dict[str, str] = {}
    pool_rejected = 0
    for key, record in records.items():
        if key == "pool_index" or (key.endswith("/pseudo_labels") and not key.startswith("seconds/")):
            pool_rejected = max(pool_rejected, record.get("rejected_count", len(record["rejected"])))
            rejected.update({r["path"]: r["reason"] for r in record["rejected"]})
    return {
        "mlflow_run_id": records.get("mlflow_run_id"), "tracking_uri": records.get("tracking_uri"),
        "experiment": None, "classes": _classes(out, records),
        "teacher_test_accuracy": results[0]["test_accuracy"] if results else None,
        "final_test_accuracy": results[-1]["test_accuracy"] if results else None,
        "baseline_test_accuracy": baseline["test_accuracy"] if baseline else None,
        "baseline": baseline, "pretrain": records.get("pretrain/result"),
        "stage_seconds": {k.split("/", 1)[1]: v for k, v in records.items() if k.startswith("seconds/")},
        "iterations": results,
        "rejected": [{"path": p, "reason": r} for p, r in sorted(rejected.items())],
        "tracking_errors": [], "rejected_count": pool_rejected,
    }


def _classes(out: Path, records: dict[str, Any]) -> list[str]:
    """The class names: from a recorded confusion matrix, else from a saved model's spec."""
    for key in ("iter0", "baseline"):
        confusion = read_confusion(evaluation_dir(out, key))
        if confusion:
            return confusion["classes"]
    for key in ("iter0/result", "baseline/result", "pretrain/result"):
        spec = Path(records[key]["model_dir"]) / "model.json" if key in records else None
        if spec and spec.is_file():
            return json.loads(spec.read_text())["classes"]
    return []


def _missing(out: Path, records: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    """What an unfinished run has yet to do, in the order the pipeline does it."""
    missing = [f"{SUMMARY_FILE}: the run has not finished (re-run the same `selftrain run` command to resume it)"]
    cfg = _validated(out, config)
    if cfg is None:
        return missing
    if cfg.pretrain and "pretrain/result" not in records:
        missing.append(f"pretraining ({cfg.pretrain.method})")
    if "iter0/result" not in records:
        missing.append(f"teacher ({cfg.model.teacher})")
    if cfg.baseline and (cfg.teacher.online or cfg.teacher_init != "none") and "baseline/result" not in records:
        missing.append("baseline (supervised on the labeled images alone)")
    names = {"scores": "teacher scoring", "pseudo_labels": "pseudo-labels", "result": "student"}
    for i in range(1, cfg.iterations + 1):
        todo = [name for stage, name in names.items() if f"iter{i}/{stage}" not in records]
        if todo:
            missing.append(f"iteration {i} ({cfg.model.student(i)}): {', '.join(todo)}")
    return missing


def _validated(out: Path, config: dict[str, Any] | None) -> PipelineConfig | None:
    """The stored config as a PipelineConfig, or None (no state.json, or written by another version)."""
    if config is None:
        return None
    try:
        return PipelineConfig.model_validate({**config, "output_dir": str(out)})
    except ValidationError:  # an old or hand-edited ledger: report what is there, expect nothing
        return None
