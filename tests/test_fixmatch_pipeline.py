"""The FixMatch smoke pipeline end to end: a teacher trained online on labeled + the unlabeled
pool (two Ray Data streams into Ray Train), then a Noisy Student round; real Ray, real MLflow."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from selftrain.cli import main

from conftest import REPO, copy_tree, digits_overrides, experiment_runs, tracking_uri_set, write_corrupt_files

PIPELINE = str(REPO / "pipelines" / "fixmatch_smoke.yaml")


@pytest.fixture(scope="module")
def fixmatch_run(ray_session, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("fixmatch")
    pool = copy_tree(digits.unlabeled, root / "pool")
    bad = write_corrupt_files(pool / "7")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_uri_set(uri):
        code = main(["run", PIPELINE, f"output_dir={root / 'run'}", *digits_overrides(digits, pool)])
    return {"code": code, "root": root, "bad": bad, "client": MlflowClient(uri),
            "summary": json.loads((root / "run" / "summary.json").read_text()) if code == 0 else None}


def test_the_pool_index_numbers_every_readable_image_once(fixmatch_run):
    assert fixmatch_run["code"] == 0
    index = pd.read_parquet(fixmatch_run["root"] / "run" / "pool_index" / "index")
    readable = index[index["index"] >= 0]
    assert len(readable) == 1297  # the digits pool
    assert sorted(readable["index"]) == list(range(1297))
    assert readable["path"].is_unique and (readable["label"] >= 0).all()  # class folders: truth known
    # The corrupt files get no slot, and are counted and named in the summary.
    assert sorted(index.loc[index["index"] < 0, "path"]) == sorted(fixmatch_run["bad"])
    summary = fixmatch_run["summary"]
    assert summary["rejected_count"] == 3 and {r["path"] for r in summary["rejected"]} == set(fixmatch_run["bad"])
    # Shuffled before numbering: the folders list class by class, training reads in index order.
    first = readable.sort_values("index")["label"].head(100)
    assert first.nunique() >= 8


def test_the_teacher_trains_by_fixmatch_and_mlflow_shows_its_unlabeled_metrics(fixmatch_run):
    summary, client = fixmatch_run["summary"], fixmatch_run["client"]
    assert [(e["role"], e["method"]) for e in summary["iterations"]] == [("teacher", "fixmatch"),
                                                                          ("student", "noisy_student")]
    runs = experiment_runs(client, "fixmatch_smoke")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    assert len(runs) == 4 and len(children) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.tags["selftrain.role"] for r in children] == ["teacher", "baseline", "student"]
    teacher = children[0]
    params = teacher.data.params
    assert params["method"] == "fixmatch" and params["method.threshold"] == "0.5"
    assert params["mu"] == "4" and params["pool_rows"] == "1297"
    for key in ("train/loss", "sup/loss", "unsup/loss", "unsup/mask_rate", "unsup/threshold", "train/steps"):
        assert len(client.get_metric_history(teacher.info.run_id, key)) == 3, key  # one per epoch
    steps = {m.value for m in client.get_metric_history(teacher.info.run_id, "train/steps")}
    assert steps == {5.0}  # train.steps_per_epoch
    assert all(m.value == pytest.approx(0.5) for m in client.get_metric_history(teacher.info.run_id, "unsup/threshold"))
    assert params["method.lambda_u"] == "1.0" and params["method.ema_decay"] == "0.999"  # paper defaults
    # The loss is the supervised part plus λu (1) times the unlabeled part, epoch by epoch.
    for total, sup, unsup in zip(*(client.get_metric_history(teacher.info.run_id, k)
                                   for k in ("train/loss", "sup/loss", "unsup/loss"))):
        assert total.value == pytest.approx(sup.value + unsup.value, rel=1e-5)


def test_the_labeled_only_baseline_and_the_seconds_per_stage_are_reported(fixmatch_run, capsys):
    """An online teacher gets a supervised twin on the labeled images alone: the summary shows
    what the pool added. Every stage's wall time is in summary.json."""
    summary, client = fixmatch_run["summary"], fixmatch_run["client"]
    baseline = summary["baseline"]
    assert (baseline["role"], baseline["method"], baseline["model"]) == ("baseline", "supervised", "cnn_small")
    assert baseline["train_rows"] == 50 and baseline["pseudo_labels_kept"] == 0
    run = client.get_run(baseline["mlflow_run_id"])
    assert run.data.params["method"] == "supervised" and run.data.params["pool_rows"] == "0"
    assert run.data.metrics["eval/accuracy"] == summary["baseline_test_accuracy"] == baseline["test_accuracy"]
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.metrics["eval/baseline_accuracy"] == baseline["test_accuracy"]
    stages = summary["stage_seconds"]
    assert list(stages) == ["teacher", "baseline", "iter1/scoring", "iter1/pseudo_labels", "iter1/student"]
    assert all(seconds > 0 for seconds in stages.values())
    wall = (parent.info.end_time - parent.info.start_time) / 1000
    assert sum(stages.values()) <= wall + 1
    from selftrain.self_training import summary_table

    text = summary_table(summary)
    gain = (summary["final_test_accuracy"] - baseline["test_accuracy"]) * 100
    assert f"vs supervised on the labeled images alone: {gain:+.1f} points" in text
    assert text.splitlines()[1].split()[:3] == ["-", "baseline", "cnn_small"]  # first row, under the header
    assert "seconds per stage: teacher" in text
