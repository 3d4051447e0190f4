import os
import signal

import pytest

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
