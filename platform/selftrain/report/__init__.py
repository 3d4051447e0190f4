"""`selftrain report OUTPUT_DIR`: one self-contained HTML page for a pipeline run (finished or
not) or a finished sweep, from what it wrote to OUTPUT_DIR (summary.json, state.json, each
model's evaluation/, best_config.yaml). No Ray, no MLflow: a copied folder reports as well."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selftrain.errors import SelftrainError
from selftrain.fsio import atomic_write_text
from selftrain.report.page import page
from selftrain.report.pipeline_page import pipeline_body, pipeline_meta, pipeline_title
from selftrain.report.pipeline_run import STATE_FILE, SUMMARY_FILE, read_pipeline_run
from selftrain.report.sweep_page import sweep_body, sweep_meta, sweep_title

REPORT_FILE = "report.html"


class ReportError(SelftrainError):
    """OUTPUT_DIR holds nothing to report on."""


def write_report(output_dir: str | Path, target: str | Path | None = None) -> tuple[Path, str]:
    """Write the page (default `<output_dir>/report.html`); return its path and "pipeline run" or "sweep"."""
    out = Path(output_dir).expanduser().resolve()
    html, kind = render_report(out)
    path = Path(target).expanduser().resolve() if target else out / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path, kind


def render_report(out: Path) -> tuple[str, str]:
    if not out.is_dir():
        raise ReportError(f"{out}: no such directory (give the output_dir of a `selftrain run` or `sweep`)")
    summary, state = _read_json(out / SUMMARY_FILE), _read_json(out / STATE_FILE)
    if summary is None and state is None:
        raise ReportError(f"{out} holds no selftrain run or sweep: neither {SUMMARY_FILE} nor {STATE_FILE} is there "
                          "(give the output_dir of a `selftrain run` or `sweep`)")
    config = (state or {}).get("config")
    is_sweep = (summary is not None and "trials" in summary) or (config is not None and "sweep" in config)
    if is_sweep:
        if summary is None:
            raise ReportError(f"{out} holds a sweep that has not finished (no {SUMMARY_FILE}): resume it with "
                              "`selftrain sweep <yaml> output_dir=... --resume`, or follow its trials in MLflow")
        return page(sweep_title(summary), sweep_meta(out, summary), sweep_body(out, summary, config)), "sweep"
    run = read_pipeline_run(out, state, summary)
    return page(pipeline_title(run), pipeline_meta(run), pipeline_body(run)), "pipeline run"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); was it edited by hand?") from None
