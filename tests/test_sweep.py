"""A real sweep through the CLI: shared teacher, one teacher pass, two Tune trials, MLflow tree,
best config, `selftrain compare`, and resumes that duplicate nothing.

The sweep's first driver is killed (SIGKILL: no handler runs) while its trials train, and
`selftrain sweep --resume` finishes it: every test below checks that resumed sweep (one sweep
for both stories, the most expensive fixture of the suite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient

from selftrain.cli import main
from selftrain.config import load_config

from conftest import (REPO, digits_overrides, experiment_runs, external_references, page_data, pool_subset,
                      tracking_uri_set)

SWEEP = str(REPO / "pipelines" / "sweep_smoke.yaml")


STARTED_WITHIN_S = 420  # teacher, its scoring pass and a trial's start on 2 busy cores


def _wait_for_a_training_trial(process: subprocess.Popen, out, client: MlflowClient) -> None:
    """Until a trial has reported an epoch to MLflow (its student is mid-training)."""
    deadline = time.monotonic() + STARTED_WITHIN_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended before it could be killed:\n{process.stdout.read()}"
        if client.get_experiment_by_name("sweep_smoke") and (out / "trials").is_dir():
            trials = experiment_runs(client, "sweep_smoke", "tags.`selftrain.role` = 'trial'")
            if any("val/accuracy" in run.data.metrics for run in trials):
                return
        time.sleep(1)
    raise AssertionError(f"no trial reported an epoch within {STARTED_WITHIN_S} s")


@pytest.fixture(scope="module")
def swept(ray_session, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out, uri = root / "sweep", f"sqlite:///{root / 'mlflow.db'}"
    # 500 of the pool's 1,297 images: each trial's students train on every pseudo-label per epoch.
    pool = pool_subset(digits.unlabeled, root / "pool", per_class=50)
    args = [SWEEP, f"output_dir={out}", *digits_overrides(digits, pool)]
    client = MlflowClient(uri)
    # The first driver joins this session's Ray, so killing it leaves the cluster running, as a
    # crashed `ray job` driver would.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "sweep", *args], env=env, cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_a_training_trial(process, out, client)
    finally:
        process.send_signal(signal.SIGKILL)
        first_output = process.communicate(timeout=60)[0]
    killed_before_summary = not (out / "summary.json").exists()
    with tracking_uri_set(uri):
        code = main(["sweep", *args, "--resume"])
        yield {"code": code, "args": args, "root": root, "client": client, "summary": out / "summary.json",
               "first_output": first_output, "killed_before_summary": killed_before_summary}


def _summary(swept):
    return json.loads(swept["summary"].read_text())


def _runs(swept):
    return experiment_runs(swept["client"], "sweep_smoke")


def test_a_killed_sweep_resumes_without_a_second_teacher_or_duplicate_runs(swept):
    assert swept["killed_before_summary"] and "shared teacher" in swept["first_output"]
    assert swept["code"] == 0
    summary = _summary(swept)
    assert summary["teacher_scoring_passes"] == 1
    assert summary["trials_by_status"] == {"completed": 2, "stopped_early": 0, "failed": 0}
    runs = _runs(swept)
    roles = sorted(run.data.tags.get("selftrain.role", "") for run in runs)
    assert roles == ["sweep", "teacher", "trial", "trial"], roles
    trial_ids = [run.data.tags["selftrain.trial_id"] for run in runs if run.data.tags.get("selftrain.role") == "trial"]
    assert sorted(trial_ids) == sorted(t["trial_id"] for t in summary["trials"])
    assert all(run.info.status == "FINISHED" for run in runs), [(r.info.run_name, r.info.status) for r in runs]


def test_every_trial_reuses_the_one_teacher_pass_and_reports_validation_accuracy(swept):
    assert swept["code"] == 0
    summary = _summary(swept)
    assert summary["teacher_scoring_passes"] == 1
    trials = summary["trials"]
    assert sorted(t["params"]["pseudo_label.threshold"] for t in trials) == [0.0, 0.5]
    assert all(t["status"] == "completed" and t["epochs"] == 2 and t["teacher_scoring_passes"] == 0 for t in trials)
    assert all(t["objective"] >= 0.3 for t in trials)  # 10 validation images; chance is 0.1
    best = max(trials, key=lambda t: t["objective"])
    assert summary["best_trial"] == best["trial_id"] and summary["best_val_accuracy"] == best["objective"]
    assert summary["best_test_accuracy"] >= 0.35  # 450 test images; chance is 0.1 (a resumed sweep: 0.47 seen)
    assert summary["labeled_train_images"] == 40  # 5 per class, 1 per class held out for validation


def test_best_config_runs_as_a_pipeline_with_the_best_knobs(swept):
    summary = _summary(swept)
    cfg = load_config(summary["best_config"])
    assert cfg.pseudo_label.threshold == summary["best_params"]["pseudo_label.threshold"]
    assert cfg.train.student_epochs == 2 and cfg.name == "sweep_smoke"


def test_report_shows_each_trials_objective_the_key_it_swept_and_the_best_config(swept, capsys):
    sweep_dir = swept["root"] / "sweep"
    assert main(["report", str(sweep_dir)]) == 0
    html = (sweep_dir / "report.html").read_text()
    assert external_references(html) == [] and "<script" not in html.lower()
    summary, elements = _summary(swept), page_data(html)
    assert {e["trial"]: e["value"] for e in elements if e.get("metric") == "objective"} == {
        t["trial_id"]: repr(t["objective"]) for t in summary["trials"]}
    assert [e["value"] for e in elements if e.get("metric") == "best_test_accuracy"] == [repr(summary["best_test_accuracy"])]
    assert [e["key"] for e in elements if e.get("figure") == "objective-per-key"] == ["pseudo_label.threshold"]
    best = next(e["text"] for e in elements if e.get("config") == "best")
    assert best == (sweep_dir / "best_config.yaml").read_text().strip()
    assert next(e for e in elements if "stopped-early" in e)["stopped-early"] == "0"


def test_mlflow_holds_the_sweep_its_teacher_and_one_run_per_trial(swept):
    summary, client = _summary(swept), swept["client"]
    runs = _runs(swept)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parent] == [summary["mlflow_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    roles = sorted(r.data.tags["selftrain.role"] for r in children)
    assert roles == ["teacher", "trial", "trial"] and len(runs) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for trial in (r for r in children if r.data.tags["selftrain.role"] == "trial"):
        history = client.get_metric_history(trial.info.run_id, "val/accuracy")
        assert sorted(m.step for m in history) == [1, 2]  # one per epoch, logged as it trained
        assert trial.data.tags["selftrain.trial_status"] == "completed"
        assert "pseudo/kept_fraction" in trial.data.metrics
    metrics = parent[0].data.metrics
    assert metrics["sweep/teacher_scoring_passes"] == 1
    assert metrics["sweep/best_test_accuracy"] == pytest.approx(summary["best_test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"best_config.yaml", "summary.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")} == {"plots/sweep_objective.png"}


def test_compare_lists_the_trials_best_first(swept, capsys, tmp_path):
    sweep_dir = str(swept["root"] / "sweep")
    out = tmp_path / "trials.csv"
    assert main(["compare", "--experiment", "sweep_smoke", "--sweep", sweep_dir, "--format", "csv",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out)
    trials = table[table["role"] == "trial"]
    assert len(trials) == 2 and "pseudo_label.threshold" in table.columns
    # The shared teacher's validation accuracy is the baseline, in the same column.
    teacher = table[table["role"] == "teacher"]
    assert teacher["val/accuracy"].tolist() == [pytest.approx(_summary(swept)["teacher"]["val_accuracy"])]
    assert table["val/accuracy"].is_monotonic_decreasing and set(table["role"]) == {"teacher", "trial"}
    capsys.readouterr()
    assert main(["compare", "--experiment", "sweep_smoke", "--format", "markdown"]) == 0
    assert "| run" in capsys.readouterr().out
    assert main(["compare", "--experiment", "no_such_experiment"]) == 2
    assert "no MLflow experiment 'no_such_experiment'" in capsys.readouterr().err


def test_resume_of_a_finished_sweep_repeats_nothing(swept, capsys):
    before = _summary(swept)
    capsys.readouterr()
    assert main(["sweep", *swept["args"], "--resume"]) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "scores the pool" not in out
    after = _summary(swept)
    assert after["trials"] == before["trials"] and after["teacher_scoring_passes"] == 1
    assert len(_runs(swept)) == 4


def test_rerun_without_resume_and_a_changed_space_are_refused(swept, capsys):
    assert main(["sweep", *swept["args"]]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["sweep", *swept["args"], "sweep.space={pseudo_label.threshold: {grid: [0.0, 0.7]}}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "sweep.space.pseudo_label.threshold.grid: [0.0, 0.5] -> [0.0, 0.7]" in err
