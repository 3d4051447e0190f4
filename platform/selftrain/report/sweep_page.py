"""The report page of a sweep: the best trial and its config, the objective per trial, the
objective against each swept key, the trials ASHA stopped early (and any that failed), MLflow runs
and the sweep's config. Every number is read from the sweep's summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from selftrain import plots
from selftrain.report.page import cell, esc, figure, notice, number, pre, section, table, text_cell

BEST_CONFIG_FILE = "best_config.yaml"


def sweep_body(out: Path, summary: dict[str, Any], config: dict[str, Any] | None) -> str:
    return "\n".join(part for part in (
        _best(summary), _trials(summary), _per_key(summary), _early(summary), _best_config(out),
        _mlflow(summary), _config(config)) if part)


def _keys(summary: dict[str, Any]) -> list[str]:
    return list(summary["best_params"])


def _best(summary: dict[str, Any]) -> str:
    objective, teacher = summary["objective"], summary.get("teacher")
    rows = [[text_cell("best trial"), text_cell(summary["best_trial"], metric="best-trial")],
            *([text_cell(k), text_cell(str(v), metric="best-param", key=k)] for k, v in summary["best_params"].items()),
            [text_cell(f"best {objective}"), cell(summary["best_val_accuracy"], metric="best_val_accuracy")],
            [text_cell("best trial's test accuracy"), cell(summary.get("best_test_accuracy"), metric="best_test_accuracy")]]
    if teacher:
        rows += [[text_cell(f"shared teacher {teacher['model']}: {objective}"), cell(teacher.get("val_accuracy"),
                                                                                   metric="teacher_val_accuracy")],
                 [text_cell(f"shared teacher {teacher['model']}: test accuracy"),
                  cell(teacher.get("test_accuracy"), metric="teacher_test_accuracy")]]
    rows += [[text_cell("teacher-scoring passes"), cell(summary.get("teacher_scoring_passes"))],
             [text_cell("wall seconds"), cell(summary.get("wall_seconds"), 1)]]
    body = table(["", "value"], rows, table="best")
    if summary.get("best_test_accuracy") is None:
        body += notice(["no test accuracy: ASHA stopped every trial early, so no trial left a final model"])
    return section("Best trial", body, "best")


def _best_config(out: Path) -> str:
    """`best_config.yaml`, read from OUTPUT_DIR (where the sweep writes it; also in a copied folder)."""
    path = out / BEST_CONFIG_FILE
    if not path.is_file():
        return section("Best config", notice([f"{BEST_CONFIG_FILE} is not in {esc(out)}"]), "best-config")
    return section("Best config", f"<p><code>{esc(path)}</code>, runnable with <code>selftrain run "
                   f"{esc(path)}</code>:</p>" + pre(path.read_text(), config="best"), "best-config")


def _frame(summary: dict[str, Any]) -> pd.DataFrame:
    objective = summary["objective"]
    return pd.DataFrame([{**t["params"], "trial_id": t["trial_id"], "status": t["status"],
                          objective: t["objective"]} for t in summary["trials"]])


def _trials(summary: dict[str, Any]) -> str:
    objective, keys = summary["objective"], _keys(summary)
    ranked = sorted(summary["trials"], key=lambda t: (t["objective"] is None, -(t["objective"] or 0.0), t["trial_id"]))
    rows = [[text_cell(t["trial_id"]), *(text_cell(str(t["params"].get(k))) for k in keys), text_cell(t["status"]),
             cell(t.get("epochs")), cell(t["objective"], metric="objective", trial=t["trial_id"]),
             text_cell(t.get("error") or ""), text_cell(t.get("mlflow_run_id"))] for t in ranked]
    counts = summary.get("trials_by_status", {})
    line = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items())
    plot = figure(plots.objective_per_trial(_frame(summary), objective, summary["best_trial"]),
                  f"{objective} per trial", figure="objective-per-trial")
    return section(f"{objective} per trial", f"<p>{len(ranked)} trials: {esc(line)}. Best first.</p>"
                   + table(["trial", *keys, "status", "epochs", objective, "error", "MLflow run"], rows, table="trials")
                   + plot, "trials")


def _per_key(summary: dict[str, Any]) -> str:
    objective, frame = summary["objective"], _frame(summary)
    if frame[objective].notna().sum() == 0:
        return ""
    figures = [figure(plots.sweep_objective(frame, [key], objective), f"{objective} against {key}",
                      figure="objective-per-key", key=key) for key in _keys(summary)]
    return section(f"{objective} against each swept key",
                   "<p>Failed trials are left out; hollow points were stopped early (fewer epochs).</p>"
                   f"<div class=\"figures\">{''.join(figures)}</div>", "per-key")


def _early(summary: dict[str, Any]) -> str:
    early = [t for t in summary["trials"] if t["status"] == "stopped_early"]
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    lines = [f"trial {esc(t['trial_id'])} ({esc(_params(t))}): stopped after {t['epochs']} epoch(s) at "
             f"{esc(summary['objective'])} {esc(number(t['objective']))}" for t in early]
    lines += [f"trial {esc(t['trial_id'])} ({esc(_params(t))}) failed: {esc(t.get('error'))}" for t in failed]
    body = (notice(lines, stopped_early=len(early), failed=len(failed)) if lines else
            '<p data-stopped-early="0" data-failed="0">none: every trial trained to the end</p>')
    return section("Trials stopped early or failed", body, "early")


def _params(trial: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial["params"].items())


def _mlflow(summary: dict[str, Any]) -> str:
    rows = [[text_cell("sweep (parent run)"), text_cell(summary.get("mlflow_run_id"), metric="mlflow-parent")]]
    if summary.get("teacher"):
        rows.append([text_cell("shared teacher"), text_cell(summary["teacher"].get("mlflow_run_id"))])
    rows += [[text_cell(f"trial {t['trial_id']}"), text_cell(t.get("mlflow_run_id"))] for t in summary["trials"]]
    errors = [esc(e.get("message", e)) for e in summary.get("tracking_errors") or []]
    return section("MLflow", f"<p>tracking store <code>{esc(summary.get('tracking_uri'))}</code>, experiment "
                   f"<code>{esc(summary.get('experiment'))}</code></p>" + table(["run", "MLflow run id"], rows, table="mlflow")
                   + (notice(["MLflow stopped answering during the sweep: " + e for e in errors]) if errors else ""),
                   "mlflow")


def _config(config: dict[str, Any] | None) -> str:
    if config is None:
        return ""
    sweep, pipeline = config.get("sweep"), config.get("pipeline")
    return section("Sweep config", "<p>The search space and the base pipeline, as the sweep recorded them in "
                   "state.json (credentials masked).</p>" + pre(yaml.safe_dump({"sweep": sweep}, sort_keys=False),
                                                                config="sweep")
                   + "<details><summary>the base pipeline</summary>"
                   + pre(yaml.safe_dump(pipeline, sort_keys=False), config="base-pipeline") + "</details>", "config")


def sweep_title(summary: dict[str, Any]) -> str:
    return f"selftrain report: {summary.get('experiment')} (sweep)"


def sweep_meta(out: Path, summary: dict[str, Any]) -> str:
    return (f"<code>{esc(out)}</code> · {len(summary['trials'])} trials · best {esc(summary['objective'])} "
            f"{esc(number(summary['best_val_accuracy']))} (trial {esc(summary['best_trial'])})")
