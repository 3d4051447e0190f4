"""MLflow unreachable: at the start the run stops in seconds naming the store; mid-run the run
goes on and the Tracker says what it could not log. Against a real `mlflow server`."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, run_smoke_subprocess
from mlflow_server import mlflow_server, stop
from selftrain.errors import TrackingError
from selftrain.models.registry import build_model
from selftrain.plots import accuracy_per_iteration
from selftrain.tracking import DatasetRecord, Tracker, redact
from selftrain.training.loop import save_model


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cret@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
    ("postgresql://mlflow:pa:ss@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("https://mlflow.internal/?token=abc&metric_key=a", "https://mlflow.internal/?token=***&metric_key=a"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact_masks_passwords_only(uri, shown):
    assert redact(uri) == shown
    assert redact(f"API request to {uri}/api/2.0 failed") == f"API request to {shown}/api/2.0 failed"


def test_a_tracker_on_a_dead_server_is_refused_naming_it():
    with pytest.raises(TrackingError, match=r"store http://127\.0\.0\.1:1 \(MLFLOW_TRACKING_URI\) does not answer"):
        Tracker("exp", "http://127.0.0.1:1")


def test_a_sweep_trials_tracker_starts_on_a_dead_server_and_counts_what_it_cannot_log():
    """A trial (or its epoch logger) knows its experiment: it runs while the store is down."""
    start = time.monotonic()
    tracker = Tracker("exp", "http://127.0.0.1:1", experiment_id="0")
    run = tracker.start_run("trial-1", parent_id="parent")
    tracker.log_metrics(run, {"val/accuracy": 0.5}, step=1)
    tracker.finish(run)
    outage = tracker.outage()
    assert run is None and outage["not_logged"] == {"run starts": 1, "metric batches": 1, "run status updates": 1}
    assert outage["message"] == ("MLflow at http://127.0.0.1:1 stopped answering; not logged: 1 run starts, "
                                 "1 metric batches, 1 run status updates")
    assert time.monotonic() - start < 30  # asked once: the later calls come within RETRY_AFTER_S


def test_a_dead_server_at_the_start_fails_in_seconds_naming_it(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://user:hunter2@127.0.0.1:1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO / "platform"), "HOME": str(tmp_path)}
    done, elapsed = run_smoke_subprocess(env, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "MLflow tracking store http://user:***@127.0.0.1:1 (MLFLOW_TRACKING_URI) does not answer" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()  # stopped before any compute
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_a_server_that_dies_mid_run_loses_logs_not_the_run(tmp_path, capsys):
    with mlflow_server(tmp_path) as (url, server):
        # Credentials in the URI: the server has no auth and ignores them; they must never show.
        tracker = Tracker("outage", url.replace("http://", "http://bob:hunter2@"))
        parent = tracker.start_run("parent")
        child = tracker.start_run("child", parent_id=parent)
        tracker.log_params(parent, {"train": {"epochs": 3}})
        tracker.log_metrics(child, {"train/loss": 1.5}, step=0)
        tracker.log_figure(child, accuracy_per_iteration([0.5, 0.6], ["a", "b"]), "accuracy.png")
        tracker.finish(tracker.start_run("finished before the outage", parent_id=parent))
        # A model through the server's artifact proxy (mlflow-artifacts:/), registered.
        torch.manual_seed(0)
        model = build_model("cnn_tiny", 10).eval()
        (tmp_path / "model").mkdir()
        save_model(tmp_path / "model", model, {"arch": "cnn_tiny", "num_classes": 10})
        model_args = (model, np.zeros((1, 3, 16, 16), np.float32), 10,
                      [str(tmp_path / "model" / "model.pt"), str(tmp_path / "model" / "model.json")])
        model_id = tracker.log_model(child, *model_args)
        assert tracker.register_model("outage", model_id, child, 0.5, {})["best_version"] == 1
        assert tracker.outage() is None
        assert "hunter2" not in "".join(capsys.readouterr())  # MLflow prints run URLs on finish
        stop(server)  # the server goes down mid-run
        start = time.monotonic()
        for step in (1, 2, 3):
            tracker.log_metrics(child, {"train/loss": 1.0 / step}, step=step)
        tracker.log_figure(child, accuracy_per_iteration([0.5, 0.7], ["a", "b"]), "confusion_matrix.png")
        tracker.log_json(parent, {"a": 1}, "config.json")
        late = tracker.start_run("late child", parent_id=parent)
        tracker.log_metrics(late, {"eval/accuracy": 0.9})
        tracker.log_datasets(child, [DatasetRecord("labeled", "/data", 50, "0123abcd", "training")])
        assert tracker.log_model(child, *model_args) is None
        assert tracker.register_model("outage", model_id, child, 0.9, {}) is None
        tracker.finish(child)
        tracker.finish(parent)
        elapsed = time.monotonic() - start
    outage = tracker.outage()
    assert late is None
    assert outage["not_logged"] == {"metric batches": 4, "artifacts": 2, "run starts": 1, "run status updates": 2,
                                    "dataset inputs": 1, "models": 1, "model registrations": 1}
    assert outage["artifacts_not_logged"] == ["plots/confusion_matrix.png", "config.json"]
    assert outage["message"].startswith(f"MLflow at {url.replace('http://', 'http://bob:***@')} stopped answering; "
                                        "not logged: 4 metric batches, 2 artifacts (plots/confusion_matrix.png, ")
    assert "hunter2" not in str(outage) and "Connection refused" in outage["error"]
    assert elapsed < 60, f"the dead server cost {elapsed:.0f} s"  # it is asked once, not per call
    # What was logged before the outage is in the server's own store and artifact root.
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert store.get_run(parent).data.params == {"train.epochs": "3"}
    assert [m.value for m in store.get_metric_history(child, "train/loss")] == [1.5]
    assert [p.name for p in (tmp_path / "artifacts").rglob("*.png")] == ["accuracy.png"]
    assert len(list((tmp_path / "artifacts").rglob("MLmodel"))) == 1
    assert store.get_model_version_by_alias("outage", "best").source == f"models:/{model_id}"
