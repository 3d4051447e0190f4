"""The report page of a pipeline run: status, accuracy per model, pretraining, pseudo-labels
per iteration, confusion matrices, time per stage, unreadable files, MLflow runs, config."""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml

from selftrain import plots
from selftrain.report.page import cell, esc, figure, notice, number, pre, section, table, text_cell
from selftrain.report.pipeline_run import PipelineRun

DRAWN_CLASSES = 40  # per-class figures for at most this many classes (beyond: tables and files only)
LISTED_FILES = 10  # unreadable files named on the page


def pipeline_body(run: PipelineRun) -> str:
    return "\n".join(part for part in (
        _status(run), _accuracy(run), _pretrain(run), _pseudo_labels(run), _confusion(run),
        _seconds(run), _unreadable(run), _mlflow(run), _config(run)) if part)


def _status(run: PipelineRun) -> str:
    done = len(run.summary["iterations"])
    if run.finished and not run.missing:
        return notice([f"finished: the teacher and {done - 1} student(s)"], ok=True, status="finished")
    head = "finished, but" if run.finished else f"unfinished: {done} of {run.iterations + 1} models trained so far; missing"
    return notice([f"{esc(head)}:"] + [esc(line) for line in run.missing],
                  status="finished" if run.finished else "unfinished")


def _accuracy(run: PipelineRun) -> str:
    summary, rows = run.summary, []
    for key, r in run.models():
        rows.append([text_cell(key), text_cell("–" if key == "baseline" else r["iteration"]), text_cell(r["role"]),
                     text_cell(r["model"]), text_cell(r.get("method")), cell(r.get("train_rows")),
                     cell(r["pseudo_labels_kept"], metric="pseudo_labels_kept", key=key),
                     cell(r.get("pseudo_label_accuracy"), metric="pseudo_label_accuracy", key=key),
                     cell(r["test_accuracy"], metric="test_accuracy", key=key),
                     text_cell(r.get("mlflow_run_id"))])
    if not rows:
        return section("Test accuracy", "<p>No model has finished training yet.</p>", "accuracy")
    headers = ["model", "iteration", "role", "architecture", "method", "train rows", "pseudo-labels kept",
               "pseudo-label accuracy", "test accuracy", "MLflow run"]
    results = summary["iterations"]
    lines = []
    if len(results) > 1:
        lines.append(f"last student vs teacher: {_points(results[-1]['test_accuracy'] - results[0]['test_accuracy'])}")
    if summary.get("baseline") and results:
        lines.append(f"vs supervised on the labeled images alone: "
                     f"{_points(results[-1]['test_accuracy'] - summary['baseline']['test_accuracy'])}")
    plot = figure(plots.accuracy_per_iteration(
        [r["test_accuracy"] for r in results], [r["model"] for r in results],
        summary["baseline"]["test_accuracy"] if summary.get("baseline") else None),
        "test accuracy per iteration", figure="accuracy") if results else ""
    return section("Test accuracy per model", table(headers, rows, table="accuracy")
                   + (f"<p>{esc('; '.join(lines))}</p>" if lines else "") + plot, "accuracy")


def _points(gain: float) -> str:
    return f"{gain * 100:+.1f} points of test accuracy"


def _pretrain(run: PipelineRun) -> str:
    pretrain = run.summary.get("pretrain")
    if not pretrain:
        return ""
    row = [text_cell(pretrain["method"]), text_cell(pretrain["model"]),
           cell(pretrain["knn_accuracy"], metric="knn_accuracy"),
           cell(pretrain["linear_accuracy"], metric="linear_accuracy"), text_cell(pretrain.get("mlflow_run_id"))]
    return section("Self-supervised pretraining", "<p>Frozen features of the pretrained backbone, labeled → test "
                   "images.</p>" + table(["method", "architecture", "kNN accuracy", "linear probe accuracy",
                                          "MLflow run"], [row], table="pretrain"), "pretrain")


def _pseudo_labels(run: PipelineRun) -> str:
    passes = run.pseudo_labels()
    if not passes:
        return ""
    parts = [f"<p>Pseudo-label policy: threshold τ = {esc(run.threshold)} (images whose teacher confidence "
             "is at least τ are kept), then per-class balancing.</p>"]
    stats_rows = []
    for i, record in passes:
        metrics, stats = record["metrics"], record["stats"]
        stats_rows.append([text_cell(i), cell(stats["scored"]), cell(record["kept"], metric="pseudo_kept", iteration=i),
                           cell(metrics.get("pseudo/kept_fraction")), cell(record["rows"], metric="pseudo_rows", iteration=i),
                           *(cell(metrics.get(f"pseudo/confidence_p{q}"), 2) for q in (10, 50, 90)),
                           cell(metrics.get("pseudo/accuracy"), metric="pseudo_accuracy", iteration=i),
                           cell(record.get("rejected_count", len(record["rejected"])))])
    parts.append(table(["iteration", "pool images scored", "kept (≥ τ)", "kept fraction", "rows after balancing",
                        "confidence p10", "p50", "p90", "pseudo-label accuracy", "unreadable"],
                       stats_rows, table="pseudo-stats"))
    parts.append(_class_table(run, passes))
    for i, record in passes:
        stats = record["stats"]
        figures = [figure(plots.confidence_histogram(
            stats["histogram_kept"], stats["histogram_dropped"], run.threshold,
            f"iteration {i}: teacher confidence over the pool"), f"iteration {i} confidence histogram",
            figure="confidence", iteration=i)]
        if len(run.classes) <= DRAWN_CLASSES:
            figures.append(figure(plots.class_counts(stats["kept_per_class"], run.classes,
                                                     f"iteration {i}: kept pseudo-labels per class"),
                                  f"iteration {i} pseudo-labels per class", figure="class-counts", iteration=i))
        parts.append(f"<h3>Iteration {i}</h3><div class=\"figures\">{''.join(figures)}</div>")
    return section("Pseudo-labels", "\n".join(parts), "pseudo-labels")


def _class_table(run: PipelineRun, passes: list[tuple[int, dict[str, Any]]]) -> str:
    """Kept pseudo-labels (before balancing) per class, one column per iteration."""
    rows = [[text_cell(name)] + [cell(record["stats"]["kept_per_class"][c], metric="pseudo_kept_class", iteration=i,
                                      class_index=c) for i, record in passes]
            for c, name in enumerate(run.classes)]
    rows.append([text_cell("all classes")] + [cell(int(sum(record["stats"]["kept_per_class"])),
                                                   metric="pseudo_kept_total", iteration=i) for i, record in passes])
    return ("<h3>Kept pseudo-labels per class (before balancing)</h3>"
            + table(["class"] + [f"iteration {i}" for i, _ in passes], rows, table="pseudo-per-class"))


def _confusion(run: PipelineRun) -> str:
    parts, absent = [], []
    for key, record in run.models():
        confusion = run.confusion(key)
        if confusion is None:
            absent.append(key)
        else:
            parts.append(f"<div><h3>{esc(key)} ({esc(record['role'])} {esc(record['model'])})</h3>"
                         + _matrix(key, record, confusion) + "</div>")
    parts = [f'<div class="figures">{"".join(parts)}</div>'] if parts else []
    if absent:
        parts.append(notice([f"no confusion matrix on disk for {esc(', '.join(absent))}: "
                             "<code>&lt;stage&gt;/evaluation/confusion_matrix.json</code> is written by runs of "
                             "this selftrain version and later (older runs: the MLflow artifact of each model run)"]))
    return section("Confusion matrices on the test set", "\n".join(parts), "confusion") if parts else ""


def _matrix(key: str, record: dict[str, Any], confusion: dict[str, Any]) -> str:
    """The figure, and the counts as a table, of one recorded matrix (many classes: the file named)."""
    matrix, classes = np.asarray(confusion["matrix"]), confusion["classes"]
    if len(classes) > DRAWN_CLASSES:
        return (f"<p>{len(classes)} classes: too many to draw; the matrix is in <code>{esc(key)}/evaluation/"
                f"confusion_matrix.json</code> (test accuracy {number(confusion['accuracy'])}).</p>")
    title = f"{key}: {record['role']} {record['model']}, test accuracy {confusion['accuracy']:.3f}"
    rows = [[text_cell(name)] + [cell(int(v), metric="confusion", key=key, true=t, predicted=p)
                                 for p, v in enumerate(matrix[t])] for t, name in enumerate(classes)]
    return (figure(plots.confusion_matrix(matrix, classes, title), f"{key} confusion matrix", figure="confusion", key=key)
            + f"<details><summary>as a table (rows: true class, columns: predicted; {confusion['test_images']} "
            "readable test images)</summary>" + table(["true \\ predicted", *classes], rows, table="confusion", key=key)
            + "</details>")


def _seconds(run: PipelineRun) -> str:
    seconds = run.summary.get("stage_seconds") or {}
    if not seconds:
        return ""
    rows = [[text_cell(stage), cell(value, 1, metric="stage_seconds", stage=stage)] for stage, value in seconds.items()]
    rows.append([text_cell("total"), cell(round(sum(seconds.values()), 1), 1)])
    return section("Wall seconds per stage", table(["stage", "seconds"], rows, table="stage-seconds"), "seconds")


def _unreadable(run: PipelineRun) -> str:
    summary = run.summary
    listed, count = summary.get("rejected", []), summary.get("rejected_count", len(summary.get("rejected", [])))
    if not count:
        return section("Unreadable files", '<p data-metric="rejected-count" data-value="0">none</p>', "unreadable")
    rows = [[text_cell(r["path"]), text_cell(r["reason"])] for r in listed[:LISTED_FILES]]
    return section("Unreadable files", f'<p data-metric="rejected-count" data-value="{count}">{count} files could not '
                   f"be read and were skipped; summary.json names {len(listed)} of them, the first {len(rows)} here:</p>"
                   + table(["path", "reason"], rows, table="unreadable"), "unreadable")


def _mlflow(run: PipelineRun) -> str:
    summary = run.summary
    rows = [[text_cell("pipeline (parent run)"), text_cell(summary.get("mlflow_run_id"), metric="mlflow-parent")]]
    if summary.get("pretrain"):
        rows.append([text_cell("pretrain"), text_cell(summary["pretrain"].get("mlflow_run_id"))])
    rows += [[text_cell(key), text_cell(r.get("mlflow_run_id"))] for key, r in run.models()]
    errors = [esc(e.get("message", e)) for e in summary.get("tracking_errors") or []]
    return section("MLflow", f"<p>tracking store <code>{esc(summary.get('tracking_uri'))}</code>, experiment "
                   f"<code>{esc(_experiment(run))}</code></p>" + table(["run", "MLflow run id"], rows, table="mlflow")
                   + (notice(["MLflow stopped answering during the run: " + e for e in errors]) if errors else ""),
                   "mlflow")


def _config(run: PipelineRun) -> str:
    if run.config is None:
        return ""
    resolved = {"output_dir": str(run.out), **run.config}
    return section("Resolved config", "<p>As the run recorded it in state.json, every key with its value "
                   "(credentials masked).</p>" + pre(yaml.safe_dump(resolved, sort_keys=False), config="pipeline"),
                   "config")


def _experiment(run: PipelineRun) -> str:
    return run.summary.get("experiment") or (run.config or {}).get("name") or "?"


def pipeline_title(run: PipelineRun) -> str:
    return f"selftrain report: {_experiment(run)} (pipeline run)"


def pipeline_meta(run: PipelineRun) -> str:
    results = run.summary["iterations"]
    final = number(results[-1]["test_accuracy"]) if results else "–"
    return (f"<code>{esc(run.out)}</code> · {'finished' if run.finished else 'unfinished'} · "
            f"{len(results)} model(s) · latest test accuracy {esc(final)}")
