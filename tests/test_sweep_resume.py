"""A sweep whose driver is killed (SIGKILL: no handler runs) while its trials train, then
`selftrain sweep --resume`: the shared teacher is not trained or scored again, every trial
ends completed, and MLflow holds one run per trial, not one per attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import ray
from mlflow.tracking import MlflowClient

from selftrain.cli import main

from conftest import REPO, digits_overrides, experiment_runs, tracking_uri_set

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


def test_a_killed_sweep_resumes_without_a_second_teacher_or_duplicate_runs(ray_session, digits, tmp_path):
    out = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [SWEEP, f"output_dir={out}", *digits_overrides(digits)]
    client = MlflowClient(uri)
    # The first driver joins this session's Ray, so killing it leaves the cluster running, as a
    # crashed `ray job` driver would.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "sweep", *args], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_a_training_trial(process, out, client)
    finally:
        process.send_signal(signal.SIGKILL)
        first_output = process.communicate(timeout=60)[0]
    assert not (out / "summary.json").exists()
    assert "shared teacher" in first_output

    with tracking_uri_set(uri):
        assert main(["sweep", *args, "--resume"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_scoring_passes"] == 1
    assert summary["trials_by_status"] == {"completed": 2, "stopped_early": 0, "failed": 0}
    runs = experiment_runs(client, "sweep_smoke")
    roles = sorted(run.data.tags.get("selftrain.role", "") for run in runs)
    assert roles == ["sweep", "teacher", "trial", "trial"], roles
    trial_ids = [run.data.tags["selftrain.trial_id"] for run in runs if run.data.tags.get("selftrain.role") == "trial"]
    assert sorted(trial_ids) == sorted(t["trial_id"] for t in summary["trials"])
    assert all(run.info.status == "FINISHED" for run in runs), [(r.info.run_name, r.info.status) for r in runs]
