"""`selftrain protocol`: one pipeline over label counts x seeds, the reporting convention of the
semi-supervised literature (FixMatch Table 2, USB): mean ± std of test accuracy per label count,
for the teacher, each student, the final model (and the labeled-only baseline, when run).

Each (labels per class, seed) is an ordinary run in `<output_dir>/labels<n>-seed<s>`, so a
re-run skips the runs that finished (their `summary.json` is read back) and resumes an
interrupted one where it stopped. In MLflow every run's pipeline run is a child of one protocol
run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import PipelineConfig, with_params
from selftrain.console import LOGGER
from selftrain.errors import ConfigError
from selftrain.fsio import atomic_write_json, atomic_write_text
from selftrain.ledger import Ledger
from selftrain.self_training import open_tracking, run_pipeline


def run_dir(out: Path, labels: int, seed: int) -> Path:
    return out / f"labels{labels}-seed{seed}"


def _models(summary: dict[str, Any]) -> dict[str, float]:
    """The test accuracies of one run, by model: baseline, teacher, student_<i>, final."""
    accuracies = {"teacher": summary["teacher_test_accuracy"]}
    for entry in summary["iterations"][1:]:
        accuracies[f"student_{entry['iteration']}"] = entry["test_accuracy"]
    accuracies["final"] = summary["final_test_accuracy"]
    if summary.get("baseline_test_accuracy") is not None:
        accuracies = {"baseline": summary["baseline_test_accuracy"], **accuracies}
    if summary.get("pretrain"):
        accuracies["pretrain_knn"] = summary["pretrain"]["knn_accuracy"]
    return accuracies


def run_protocol(cfg: PipelineConfig, labels_per_class: list[int], seeds: int,
                 say: Callable[[str], None] = LOGGER.info) -> dict[str, Any]:
    """Every (labels, seed) run of `cfg`, then the table of mean ± std per label count."""
    if not cfg.data.builtin:
        raise ConfigError("selftrain protocol varies data.labels_per_class, which applies to a built-in dataset "
                          f"(data.builtin); this pipeline reads labeled folders ({cfg.data.labeled})")
    if not labels_per_class or min(labels_per_class) < 1 or seeds < 1:
        raise ConfigError(f"--labels-per-class needs positive counts and --seeds at least 1 "
                          f"(got {labels_per_class}, {seeds})")
    out = Path(cfg.output_dir).expanduser().resolve()
    settings = {"pipeline": cfg.model_dump(), "labels_per_class": labels_per_class, "seeds": seeds}
    settings["pipeline"].pop("output_dir")
    ledger = Ledger(out, settings, kind="protocol")
    tracker, parent_id = open_tracking(cfg.name, out, ledger, say, {"selftrain.role": "protocol"})
    rows = []
    with tracker.terminating([parent_id]):
        tracker.log_params(parent_id, {"labels_per_class": ",".join(map(str, labels_per_class)), "seeds": seeds,
                                       **cfg.model_dump()})
        for labels in labels_per_class:
            for seed in range(cfg.seed, cfg.seed + seeds):
                key = f"runs/labels{labels}-seed{seed}"
                summary = ledger.get(key)
                if summary is None:
                    say(f"[protocol] {labels} labels per class, seed {seed}")
                    run_cfg = with_params(cfg, {"data.labels_per_class": labels, "seed": seed,
                                                "output_dir": str(run_dir(out, labels, seed))})
                    summary = run_pipeline(run_cfg, say=say, parent_id=parent_id)
                    summary = {"models": _models(summary), "mlflow_run_id": summary["mlflow_run_id"]}
                    ledger.put(key, summary)
                else:
                    say(f"[protocol] {labels} labels per class, seed {seed}: done before, read back")
                rows += [{"labels_per_class": labels, "seed": seed, "model": model, "test_accuracy": accuracy}
                         for model, accuracy in summary["models"].items()]
        runs = pd.DataFrame(rows)
        table = protocol_table(runs)
        atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
        atomic_write_text(out / "protocol.csv", table.to_csv())
        atomic_write_text(out / "protocol.md", table.to_markdown() + "\n")
        for labels, group in runs.groupby("labels_per_class"):
            means = group.groupby("model")["test_accuracy"].mean()
            tracker.log_metrics(parent_id, {f"protocol/{model}_accuracy_mean": value for model, value in means.items()},
                                step=int(labels))
        tracker.log_artifact(parent_id, out / "protocol.md")
        tracker.finish(parent_id)
    result = {"mlflow_run_id": parent_id, "table": table, "runs": runs, "out": str(out)}
    atomic_write_json(out / "summary.json", {"mlflow_run_id": parent_id, "runs": rows}, indent=2)
    return result


def protocol_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows: label counts; columns: models, each "mean ± std (n)" in percent (std over seeds,
    0 for one seed)."""
    order = list(dict.fromkeys(runs["model"]))

    def cell(values: pd.Series) -> str:
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean() * 100:.1f} ± {std * 100:.1f} ({len(values)})"

    table = runs.groupby(["labels_per_class", "model"])["test_accuracy"].apply(cell).unstack("model")
    return table[[m for m in order if m in table.columns]]
