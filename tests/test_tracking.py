import os
import signal

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
