"""MLflow behind a small interface; no other module imports mlflow.

Runs are addressed by id through `MlflowClient` (no global "active run"), so a resumed pipeline
re-opens the runs it recorded instead of creating duplicates. The tracking URI is
`MLFLOW_TRACKING_URI` when set, else MLflow's own default store `sqlite:///mlflow.db` in the
working directory, made absolute so Ray workers and Tune trials (which change directory) agree.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from selftrain.errors import TrackingError

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One experiment in one store. Creating it creates the store once, before any fan-out."""

    def __init__(self, experiment: str, uri: str | None = None):
        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = {"mlflow.runName": name, **(tags or {})}
        if parent_id:
            tags[PARENT_TAG] = parent_id
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def find_or_start_run(self, name: str, parent_id: str, key_tag: str, key: str,
                          tags: dict[str, str] | None = None) -> str:
        """The child run of `parent_id` tagged `key_tag=key`, re-opened, or a new one. A restored
        Tune sweep re-runs trials it had not snapshotted as done: no duplicate runs for them."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{key_tag}` = '{key}'")
        if found:
            self.reopen(found[0].info.run_id)
            return found[0].info.run_id
        return self.start_run(name, parent_id, {key_tag: key, **(tags or {})})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params  # params are write-once in MLflow
        fresh = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(params).items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Idempotent per (key, step): a resumed stage that logs again adds no duplicates."""
        now = mlflow.utils.time.get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step not in {m.step for m in self.client.get_metric_history(run_id, k)}]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start:start + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str, data: Any, file_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(json.dumps(data, indent=2, default=str))
            self.client.log_artifact(run_id, str(target))

    def log_figure(self, run_id: str, figure: Any, file_name: str) -> None:
        """Log a matplotlib figure as `plots/<file_name>` and release it."""
        from selftrain.plots import close

        try:
            self.client.log_figure(run_id, figure, f"plots/{file_name}")
        finally:
            close(figure)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def terminating(self, run_ids: list[str]) -> Iterator[None]:
        """Leave no run RUNNING: FAILED on an exception, KILLED on Ctrl-C or SIGTERM
        (`ray job stop` sends SIGTERM; MLflow alone would leave the run RUNNING forever).
        Marks only runs that are still RUNNING, so finished children keep FINISHED."""
        # Signal handlers can only be set from the main thread; a Tune trial runs in another
        # (Tune settles the status of runs it stops itself).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        if main:
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            yield
        except KeyboardInterrupt:
            self._terminate_running(run_ids, "KILLED")
            raise
        except BaseException:
            self._terminate_running(run_ids, "FAILED")
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def _terminate_running(self, run_ids: list[str], status: str) -> None:
        for run_id in run_ids:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.finish(run_id, status)

    def runs(self, parent_id: str) -> list[Any]:
        """Child runs of a parent, oldest first."""
        found = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                        order_by=["attributes.start_time ASC"])
        return list(found)


def search_runs(experiment: str, filter_string: str = "", uri: str | None = None) -> Any:
    """Runs of an experiment as a pandas DataFrame (`mlflow.search_runs`): columns run_id,
    status, start_time, end_time, `params.*`, `metrics.*` (last values), `tags.*`."""
    client = MlflowClient(uri or tracking_uri())
    if client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}; "
                          f"experiments there: {', '.join(names) or 'none'}")
    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")
