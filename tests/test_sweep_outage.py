"""A sweep whose MLflow server is killed while a trial trains and restarted on the same port
(a redeploy, a crash and a supervisor): the sweep finishes, no run is left RUNNING, and the
summary says what MLflow did not get, which is exactly what its record lacks.

Run alone with `python -m pytest -m faults`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
from mlflow.tracking import MlflowClient

from conftest import REPO, digits_overrides, experiment_runs, pool_subset, wait_for
from mlflow_server import free_port, mlflow_server, stop

pytestmark = pytest.mark.faults

SWEEP = str(REPO / "pipelines" / "sweep_smoke.yaml")


def test_a_sweep_outlives_an_mlflow_restart_and_reports_exactly_what_was_not_logged(ray_session, digits, tmp_path):
    pool = pool_subset(digits.unlabeled, tmp_path / "pool", per_class=50)
    out, store, port = tmp_path / "sweep", tmp_path / "mlflow", free_port()
    store.mkdir()
    args = [SWEEP, f"output_dir={out}", "name=sweep-outage", *digits_overrides(digits, pool)]
    with mlflow_server(store, port=port) as (url, server):
        # The driver joins this session's Ray; MLflow is the server's, over HTTP.
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": url,
               "PYTHONUNBUFFERED": "1"}
        sweep = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "sweep", *args], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            client = MlflowClient(url)

            def a_trial_epoch_logged() -> bool:
                if not client.get_experiment_by_name("sweep-outage"):
                    return False
                trials = experiment_runs(client, "sweep-outage", "tags.`selftrain.role` = 'trial'")
                return any("val/accuracy" in run.data.metrics for run in trials)

            wait_for(a_trial_epoch_logged, 420, "a trial's first epoch in MLflow", sweep)
            stop(server)  # killed mid-trial
            # Down until a trial's process or epoch logger has recorded something it could not log.
            wait_for(lambda: list((out / "trials").glob("*/**/tracking_errors.json")), 300,
                   "a trial to find MLflow down", sweep)
            with mlflow_server(store, port=port):  # the same store, back on the same port
                printed = sweep.communicate(timeout=600)[0]
                assert sweep.returncode == 0, printed[-3000:]
                runs = experiment_runs(client, "sweep-outage")
                summary = json.loads((out / "summary.json").read_text())
                logged = {t["trial_id"]: {m.step for m in client.get_metric_history(t["mlflow_run_id"], "val/accuracy")}
                          for t in summary["trials"]}
        finally:
            sweep.kill()
    assert summary["trials_by_status"] == {"completed": 2, "stopped_early": 0, "failed": 0}
    assert sorted(r.data.tags["selftrain.role"] for r in runs) == ["sweep", "teacher", "trial", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    errors = summary["tracking_errors"]
    assert errors and all(e["uri"] == url and e["message"].startswith(f"MLflow at {url} stopped answering")
                          for e in errors), errors
    assert any(e["message"] in printed for e in errors)  # said at the end of the sweep, not only in the file
    # Exactly what each trial's MLflow run lacks is reported: epochs logged + epochs reported as not
    # logged = epochs trained, for every trial.
    for trial in summary["trials"]:
        lost = sum(e["not_logged"].get("metric batches", 0) for e in errors
                   if f"/trials/{trial['trial_id']}/iter" in e.get("file", ""))
        steps = logged[trial["trial_id"]]
        assert len(steps) + lost == trial["epochs"] == 2, (trial["trial_id"], sorted(steps), lost)
    assert sum(e["not_logged"].get("metric batches", 0) for e in errors if "/iter" in e.get("file", "")) >= 1
