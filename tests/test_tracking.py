import json
import os
import signal
import subprocess
import sys

import pytest

from mlflow.tracking import MlflowClient

from selftrain.tracking import Tracker, flatten


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker = Tracker("exp")
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("interrupt, status", [
    (lambda: (_ for _ in ()).throw(RuntimeError("boom")), "FAILED"),
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "KILLED"),
    (lambda: os.kill(os.getpid(), signal.SIGTERM), "KILLED"),
])
def test_no_run_is_left_running(mlflow_store, interrupt, status):
    tracker = Tracker("exp")
    parent = tracker.start_run("parent")
    done = tracker.start_run("done", parent_id=parent)
    tracker.finish(done)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        with tracker.terminating([parent, done]):
            interrupt()
    assert tracker.client.get_run(parent).info.status == status
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert [r.info.run_id for r in tracker.runs(parent)] == [done]


def test_params_are_written_once_and_reopened_runs_run_again(mlflow_store):
    tracker = Tracker("exp")
    run = tracker.start_run("r")
    tracker.log_params(run, {"a": {"b": 1}})
    tracker.log_params(run, {"a": {"b": 1}, "c": 2})  # a resume logs the same params again
    assert tracker.client.get_run(run).data.params == {"a.b": "1", "c": "2"}
    tracker.finish(run, "FAILED")
    tracker.reopen(run)
    assert tracker.client.get_run(run).info.status == "RUNNING"


def test_a_restored_trial_finds_its_run_instead_of_making_a_second(mlflow_store):
    tracker = Tracker("exp")
    parent, other_parent = tracker.start_run("sweep"), tracker.start_run("other sweep")
    first = tracker.find_or_start_run("trial-a", parent, "selftrain.trial_id", "a", {"selftrain.role": "trial"})
    tracker.finish(first, "KILLED")  # as after a driver crash
    again = tracker.find_or_start_run("trial-a", parent, "selftrain.trial_id", "a")
    assert again == first and tracker.status(first) == "RUNNING"
    assert tracker.find_or_start_run("trial-b", parent, "selftrain.trial_id", "b") != first
    assert tracker.find_or_start_run("trial-a", other_parent, "selftrain.trial_id", "a") != first
    assert len(tracker.runs(parent)) == 2


def test_threaded_callers_get_no_signal_handler_and_still_mark_failures(mlflow_store):
    import threading

    tracker = Tracker("exp")
    run = tracker.start_run("trial")
    errors = []

    def trial():
        try:
            with tracker.terminating([run]):
                raise RuntimeError("trial failed")
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert errors == ["trial failed"] and tracker.status(run) == "FAILED"


def test_experiments_are_marked_as_model_training(mlflow_store):
    """MLflow 3's UI opens a marked experiment on its runs table, not the GenAI traces view."""
    tracker = Tracker("kind")
    experiment = MlflowClient(mlflow_store).get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_best_alias_follows_the_highest_test_accuracy_and_a_model_registers_once(mlflow_store):
    """Registered versions refer to LoggedModels (made bare here: registering reads no weights)."""
    tracker = Tracker("registry")

    def register(accuracy, model_id=None, run=None):
        run = run or tracker.start_run("final")
        model_id = model_id or tracker.client.create_logged_model(tracker.experiment_id, "model", run).model_id
        return tracker.register_model("digits", model_id, run, accuracy, {"selftrain.role": "student"}), model_id, run

    first, _, _ = register(0.5)
    assert (first["version"], first["best_version"], first["uri"]) == (1, 1, "models:/digits/1")
    better, model_id, run = register(0.7)
    assert better["best_version"] == 2
    worse, _, _ = register(0.6)  # a worse re-run does not take `best`
    tie, _, _ = register(0.7)  # nor does an equal one: the oldest of equals keeps it
    assert (worse["version"], worse["best_version"], tie["best_version"]) == (3, 2, 2)
    again, _, _ = register(0.7, model_id, run)  # a resumed pipeline registers the same model again
    assert again["version"] == 2 and len(tracker.client.search_model_versions("name = 'digits'")) == 4
    best = tracker.client.get_model_version_by_alias("digits", "best")
    assert (int(best.version), best.tags["test_accuracy"], best.run_id) == (2, "0.7", run)
    assert best.source == f"models:/{model_id}" and best.tags["selftrain.role"] == "student"


def test_runs_carry_mlflow_source_tags_children_their_parents_entry_point(mlflow_store, monkeypatch):
    from selftrain.tracking import source_tags

    tracker = Tracker("source")
    parent = tracker.start_run("pipeline")
    monkeypatch.setattr(sys, "argv", ["/elsewhere/default_worker.py"])  # as in a Ray worker
    source_tags.cache_clear()
    child = tracker.start_run("trial", parent_id=parent)
    source_tags.cache_clear()
    parent_tags, child_tags = (tracker.client.get_run(r).data.tags for r in (parent, child))
    assert parent_tags["mlflow.source.type"] == "LOCAL" and parent_tags["mlflow.user"]
    assert child_tags["mlflow.source.name"] == parent_tags["mlflow.source.name"] != "/elsewhere/default_worker.py"
    commit = subprocess.run(["git", "-C", os.path.dirname(__file__), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:  # selftrain's checkout, whatever the entry point
        assert parent_tags["mlflow.source.git.commit"] == child_tags["mlflow.source.git.commit"] == commit.stdout.strip()


def test_dataset_inputs_keep_counts_and_mask_credentials(mlflow_store):
    from selftrain.tracking import DatasetRecord

    tracker = Tracker("datasets")
    run = tracker.start_run("r")
    pool = DatasetRecord("unlabeled", "s3://KEY:SECRET@bucket/pool", 1000, "0123abcd", "training", {"unreadable": 2})
    labeled = DatasetRecord("labeled", "/data/labeled", 50, "89abcdef", "training")
    tracker.log_datasets(run, [pool, labeled])
    tracker.log_datasets(run, [pool])  # a resumed stage logs again: nothing is added
    inputs = {d.dataset.name: d for d in tracker.client.get_run(run).inputs.dataset_inputs}
    assert sorted(inputs) == ["labeled", "unlabeled"]
    stored = inputs["unlabeled"].dataset
    assert (stored.source_type, json.loads(stored.source), json.loads(stored.profile), stored.digest) == (
        "s3", {"uri": "s3://KEY:***@bucket/pool"}, {"num_rows": 1000, "unreadable": 2}, "0123abcd")
    assert inputs["labeled"].dataset.source_type == "local"
    assert [(t.key, t.value) for t in inputs["labeled"].tags] == [("mlflow.data.context", "training")]
