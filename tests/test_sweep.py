"""A real sweep through the CLI: shared teacher, one teacher pass, two Tune trials, MLflow tree,
best config, `selftrain compare`, and a resume that duplicates nothing."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from selftrain.cli import main
from selftrain.config import load_config

from conftest import REPO, digits_overrides, experiment_runs, tracking_uri_set

SWEEP = str(REPO / "pipelines" / "sweep_smoke.yaml")


@pytest.fixture(scope="module")
def swept(ray_session, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [SWEEP, f"output_dir={root / 'sweep'}", *digits_overrides(digits)]
    with tracking_uri_set(uri):
        code = main(["sweep", *args])
        yield {"code": code, "args": args, "root": root, "client": MlflowClient(uri),
               "summary": root / "sweep" / "summary.json"}


def _summary(swept):
    return json.loads(swept["summary"].read_text())


def _runs(swept):
    return experiment_runs(swept["client"], "sweep_smoke")


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
    assert summary["best_test_accuracy"] >= 0.5  # 450 test images; chance is 0.1
    assert summary["labeled_train_images"] == 40  # 5 per class, 1 per class held out for validation


def test_best_config_runs_as_a_pipeline_with_the_best_knobs(swept):
    summary = _summary(swept)
    cfg = load_config(summary["best_config"])
    assert cfg.pseudo_label.threshold == summary["best_params"]["pseudo_label.threshold"]
    assert cfg.train.student_epochs == 2 and cfg.name == "sweep_smoke"


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
