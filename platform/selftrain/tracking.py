"""MLflow behind a small interface; no other module imports mlflow.

Runs are addressed by id through `MlflowClient` (no global "active run"), so a resumed pipeline
re-opens the runs it recorded instead of creating duplicates. The tracking URI is
`MLFLOW_TRACKING_URI` when set, else MLflow's own default store `sqlite:///mlflow.db` in the
working directory, made absolute so Ray workers and Tune trials (which change directory) agree.

A store that does not answer at the start stops the run before any compute (TrackingError). One
that stops answering later does not: training results matter more than their record, so the
Tracker stops calling it, counts what it could not log and says so at the end (`outage()`).
Credentials in URIs (the store's, the data's) are masked (`masking.redact`) in every param, JSON
artifact and error this module shows or stores.

Every run carries MLflow's source tags (user, entry point, git commit), and the datasets it read
as dataset inputs (the runs table's Dataset column). Trained models are MLflow models, the final
one registered (`mlflow_models.py`, the other module that imports mlflow, called through the same
outage guard).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT,
                                      MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER)

from selftrain import mlflow_models
from selftrain.errors import ConfigError, TrackingError, raise_terminated
from selftrain.masking import redact, redact_tree

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_MAX_PARAM = 6000  # MLflow's limit on a param value's length
# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) take minutes to give up on
# a dead server; these give up in seconds. The user's own MLFLOW_HTTP_* settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# A store that stopped answering is asked again after this long (a server restarted, a network
# back): until then each call is counted as not logged at once instead of waiting on it.
RETRY_AFTER_S = 30.0
T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_tracking_store(uri: str | None = None) -> str:
    """Fail in seconds, naming the store, when it does not answer; returns the masked URI."""
    uri = uri or tracking_uri()
    _use_short_http_retries()
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except (MlflowException, requests.RequestException) as exc:
        raise TrackingError(
            f"the MLflow tracking store {redact(uri)} (MLFLOW_TRACKING_URI) does not answer: "
            f"{_shorten(redact(str(exc)))}; start it (`mlflow server ...`) or unset MLFLOW_TRACKING_URI "
            "to track into sqlite:///mlflow.db in the working directory") from None
    return redact(uri)


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's standard run context (`mlflow.user`, `mlflow.source.name` and `.type`, and the git
    commit, branch and remote of the entry point's checkout), resolved once per process. When the
    entry point is in no checkout (the `selftrain` console script, pytest, a Ray worker), the git
    tags of selftrain's own source tree: a run names the code that trained it."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    tags = dict(resolve_tags())
    if MLFLOW_GIT_COMMIT not in tags:
        here = str(Path(__file__).resolve())
        for key, get in ((MLFLOW_GIT_COMMIT, get_git_commit), (MLFLOW_GIT_BRANCH, get_git_branch),
                         (MLFLOW_GIT_REPO_URL, get_git_repo_url)):
            if value := get(here):
                tags[key] = value
    return {key: redact(str(value)) for key, value in tags.items()}  # a remote URL may hold a token


_ENTRY_POINT_TAGS = (MLFLOW_USER, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE)


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset a run read, described without reading it: `rows` and `digest` come from counts
    and indexes the pipeline already holds (the pool is never collected on the driver)."""

    name: str  # labeled, unlabeled, test, pseudo_labels_iter<i>
    source: str  # its path or URI; masked before it is stored
    rows: int
    digest: str
    context: str  # what the run did with it: training, evaluation, pseudo_labeling
    profile: dict[str, Any] = field(default_factory=dict)  # more counts, beside num_rows

    def entity(self) -> DatasetInput:
        source = redact(self.source)
        scheme = urlparse(source).scheme
        kind = "local" if len(scheme) <= 1 or scheme == "file" else "http" if scheme in ("http", "https") else scheme
        dataset = Dataset(self.name, self.digest, kind, json.dumps({"url" if kind == "http" else "uri": source}),
                          profile=json.dumps({"num_rows": self.rows, **self.profile}))
        return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, self.context)])


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

    def __init__(self, experiment: str, uri: str | None = None, experiment_id: str | None = None):
        """`experiment_id`: the experiment exists (a sweep's trial, its epoch logger): the store
        is not asked here, so a process that starts while it is down still runs, and counts what
        it could not log."""
        self.uri = uri or tracking_uri()
        if experiment_id is None:
            self.display_uri = check_tracking_store(self.uri)
        else:
            _use_short_http_retries()
            self.display_uri = redact(self.uri)
        if self.display_uri != self.uri:  # MLflow prints "View run ... at: <uri>", password included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if experiment_id is None:
            found = self.client.get_experiment_by_name(experiment)
            # Marked as model training, so MLflow 3's UI opens it on the runs table (an unmarked
            # experiment without runs yet opens on the GenAI traces view).
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        self.experiment_id = experiment_id
        self.failure: str | None = None  # the first error once the store stopped answering
        self.not_logged: dict[str, list[str]] = defaultdict(list)  # kind -> names of what was lost
        self.answered_again = False  # the store answered after it had stopped
        self._quiet_until = 0.0  # time.monotonic() before which the store is not asked again

    def start_run(self, name: str, parent_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str | None:
        """The new run's id, or None when the store stopped answering (later calls count as lost).
        A child run names its parent's entry point (a Tune trial runs in a Ray worker process)."""
        def start() -> str:
            context = source_tags()
            if parent_id:
                parent = self.client.get_run(parent_id).data.tags
                context = {**context, **{k: parent[k] for k in _ENTRY_POINT_TAGS if k in parent}}
            run_tags = {**context, "mlflow.runName": name, **(tags or {}), **({PARENT_TAG: parent_id} if parent_id else {})}
            return self.client.create_run(self.experiment_id, tags=run_tags, run_name=name).info.run_id

        return self._attempt("run starts", name, "", start)

    def find_or_start_run(self, name: str, parent_id: str, key_tag: str, key: str,
                          tags: dict[str, str] | None = None) -> str:
        """The child run of `parent_id` tagged `key_tag=key`, re-opened, or a new one. A restored
        Tune sweep re-runs trials it had not snapshotted as done: no duplicate runs for them."""
        found = self._attempt("run searches", name, parent_id, lambda: self.client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{key_tag}` = '{key}'"))
        if found:
            self.reopen(found[0].info.run_id)
            return found[0].info.run_id
        return self.start_run(name, parent_id, {key_tag: key, **(tags or {})})

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._attempt("tags", key, run_id, lambda: self.client.set_tag(run_id, key, redact(str(value))))

    def status(self, run_id: str | None) -> str | None:
        """The run's status; None when the store stopped answering."""
        return self._attempt("run status reads", "status", run_id, lambda: self.client.get_run(run_id).info.status,
                             always=True)

    def reopen(self, run_id: str | None) -> None:
        self._attempt("run status updates", "RUNNING", run_id,
                      lambda: self.client.update_run(run_id, status="RUNNING"), always=True)

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        def log() -> None:
            existing = self.client.get_run(run_id).data.params  # params are write-once in MLflow
            fresh = [Param(k, redact(str(v))[:_MAX_PARAM]) for k, v in flatten(params).items() if k not in existing]
            for start in range(0, len(fresh), 100):
                self.client.log_batch(run_id, params=fresh[start:start + 100])

        self._attempt("param batches", "params", run_id, log)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        """Idempotent per (key, step): a resumed stage that logs again adds no duplicates."""
        def log() -> None:
            now = mlflow.utils.time.get_current_time_millis()
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                     if step not in {m.step for m in self.client.get_metric_history(run_id, k)}]
            for start in range(0, len(batch), 500):
                self.client.log_batch(run_id, metrics=batch[start:start + 500])

        self._attempt("metric batches", f"step {step}", run_id, log)

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._attempt("artifacts", path.name, run_id, lambda: log(run_id, str(path), artifact_path))

    def log_json(self, run_id: str | None, data: Any, file_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(json.dumps(redact_tree(data), indent=2, default=str))
            self._attempt("artifacts", file_name, run_id, lambda: self.client.log_artifact(run_id, str(target)))

    def log_datasets(self, run_id: str | None, datasets: list[DatasetRecord]) -> None:
        """Dataset inputs of the run; logging one again adds nothing (MLflow keeps one per name and digest)."""
        self._attempt("dataset inputs", ", ".join(d.name for d in datasets), run_id,
                      lambda: self.client.log_inputs(run_id, datasets=[d.entity() for d in datasets]))

    def log_model(self, run_id: str | None, model: Any, input_example: Any, num_classes: int,
                  files: list[str]) -> str | None:
        """`model` as the MLflow model `runs:/<run_id>/model` (`mlflow_models.log_model`); its
        LoggedModel id, or None when the store stopped answering."""
        return self._attempt("models", "model", run_id, lambda: mlflow_models.log_model(
            self.client, self.experiment_id, run_id, model, input_example, num_classes, files, source_tags()))

    def register_model(self, name: str, model_id: str | None, run_id: str | None, accuracy: float,
                       tags: dict[str, str]) -> dict[str, Any] | None:
        """A version of registered model `name` for the logged model, alias `best` updated
        (`mlflow_models.register_version`); None when the store stopped answering or the model
        was never logged."""
        if model_id is None:
            self.not_logged["model registrations"].append(name)
            return None
        return self._attempt("model registrations", name, run_id, lambda: mlflow_models.register_version(
            self.client, name, model_id, run_id, accuracy, {k: redact(str(v)) for k, v in tags.items()}))

    def log_figure(self, run_id: str | None, figure: Any, file_name: str) -> None:
        """Log a matplotlib figure as `plots/<file_name>` and release it."""
        from selftrain.plots import close

        try:
            self._attempt("artifacts", f"plots/{file_name}", run_id,
                          lambda: self.client.log_figure(run_id, figure, f"plots/{file_name}"))
        finally:
            close(figure)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        self._attempt("run status updates", status, run_id,
                      lambda: self.client.set_terminated(run_id, status=status), always=True)

    def _attempt(self, kind: str, name: str, run_id: str | None, call: Callable[[], T],
                 always: bool = False) -> T | None:
        """Call the store unless it stopped answering less than RETRY_AFTER_S ago (`always`: a
        run's status, asked even then, so that no run is left RUNNING once the store is back); a
        failure that is the store's (connection, timeout, 5xx) is recorded, never raised. run_id
        "" means none is needed."""
        if run_id is not None and (always or time.monotonic() >= self._quiet_until):
            try:
                value = call()
            except (MlflowException, requests.RequestException) as exc:
                if isinstance(exc, MlflowException) and exc.get_http_status_code() < 500:
                    raise  # a request the store refused (bad value, unknown run): our bug, not an outage
                self.failure = self.failure or _shorten(redact(str(exc)))
                self._quiet_until = time.monotonic() + RETRY_AFTER_S
            else:
                self.answered_again = self.answered_again or self.failure is not None
                return value
        self.not_logged[kind].append(name)
        return None

    def outage(self) -> dict[str, Any] | None:
        """What the store missed, for summary.json and the last line of the run; None if nothing."""
        return outage_record(self.display_uri, self.failure, self.not_logged, self.answered_again)

    @contextmanager
    def terminating(self, run_ids: list[str | None]) -> Iterator[None]:
        """Leave no run RUNNING: FAILED on an exception, KILLED on Ctrl-C or SIGTERM
        (`ray job stop` sends SIGTERM; MLflow alone would leave the run RUNNING forever).
        Marks only runs that are still RUNNING, so finished children keep FINISHED."""
        # Signal handlers can only be set from the main thread; a Tune trial runs in another
        # (Tune settles the status of runs it stops itself).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        if main:
            signal.signal(signal.SIGTERM, raise_terminated)
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

    def _terminate_running(self, run_ids: list[str | None], status: str) -> None:
        for run_id in run_ids:
            running = self._attempt("run status updates", status, run_id,
                                    lambda: self.client.get_run(run_id).info.status == "RUNNING")
            if running:
                self.finish(run_id, status)

    def runs(self, parent_id: str) -> list[Any]:
        """Child runs of a parent, oldest first."""
        found = self._attempt("run searches", "children", parent_id, lambda: self.client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", order_by=["attributes.start_time ASC"]),
            always=True)
        return list(found or [])


def outage_record(display_uri: str, failure: str | None, not_logged: dict[str, list[str]],
                  answered_again: bool = False) -> dict[str, Any] | None:
    """What a store missed (kind -> names of what was not logged), for summary.json; None if nothing."""
    if not not_logged:
        return None
    counts = ", ".join(f"{len(names)} {kind}" + (f" ({', '.join(names)})" if kind == "artifacts" else "")
                       for kind, names in not_logged.items())
    again = " (it answered again later; what came after was logged)" if answered_again else ""
    return {"uri": display_uri, "error": failure, "answered_again": answered_again,
            "not_logged": {kind: len(names) for kind, names in not_logged.items()},
            "artifacts_not_logged": list(not_logged.get("artifacts", [])),
            "message": f"MLflow at {display_uri} stopped answering{again}; not logged: {counts}"}


def search_runs(experiment: str, filter_string: str = "", uri: str | None = None) -> Any:
    """Runs of an experiment as a pandas DataFrame (`mlflow.search_runs`): columns run_id,
    status, start_time, end_time, `params.*`, `metrics.*` (last values), `tags.*`."""
    check_tracking_store(uri or tracking_uri())
    client = MlflowClient(uri or tracking_uri())
    if client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment {experiment!r} in {redact(client.tracking_uri)}; "
                          f"experiments there: {', '.join(names) or 'none'}")
    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string)


def download_model_files(uri: str, root: str, what: str) -> str:
    """A local folder with the `model.pt` + `model.json` of an MLflow model URI (`runs:/`,
    `models:/<name>@<alias>`, `models:/<name>/<version>`); ConfigError naming `what` and
    MLflow's reason (no such run, registered model, alias or version) when there is none."""
    try:
        return mlflow_models.download_model_files(uri, root, tracking_uri())
    except MlflowException as exc:
        raise ConfigError(f"{what}: {_shorten(redact(str(exc).splitlines()[0]))} "
                          f"(MLflow at {redact(tracking_uri())})") from None


def _shorten(text: str, keep: int = 250) -> str:
    """MLflow's connection errors run to a kilobyte; the cause is at the end."""
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


def _use_short_http_retries() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


