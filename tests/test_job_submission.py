"""The smoke pipeline submitted as a Ray job to a real head node on loopback, exactly as the
README says: `ray job submit --working-dir . -- selftrain run pipelines/smoke.yaml`.

The head node is started here (`ray start --head --block`, its own temp dir and ports) and
stopped by the pid of that process, never with `ray stop`: other Rays on the machine live on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_env() -> dict[str, str]:
    # Ray 2.60 turns token auth on for a head started where ~/.ray/auth_token exists; clients
    # must then say RAY_AUTH_MODE=token (the README says so too).
    # A job runs `selftrain` from the PATH of the head's `ray start`: the venv's bin comes first.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=_cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head_node():
    # Ray's socket paths must stay short (AF_UNIX limit), hence a short temp dir of our own.
    temp_dir = tempfile.mkdtemp(prefix="stj", dir="/tmp")
    port, dashboard, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    # Every fixed default port chosen free: other heads on this machine (tests run in parallel)
    # hold 52365 (job agent) or 10001 (Ray client), and a second agent there never registers
    # ("No available agent to submit job").
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_api(address, head)
        yield SimpleNamespace(address=address, logs=Path(temp_dir) / "session_latest" / "logs")
    finally:
        head.terminate()  # --block: the head takes its Ray processes down with it
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # still stopping the job's workers: this head's own group, killed
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_api(address: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}")
        listed = _ray("job", "list", "--address", address)
        if listed.returncode == 0:
            return
        last = listed.stderr[-500:]
        time.sleep(2)
    pytest.fail(f"the job API at {address} did not answer within {timeout} s: {last}")


def _submit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # `job list` answers before the head's job agent has registered; a submit in that window
    # gets "No available agent to submit job, please try again later" (seen on a loaded machine).
    deadline = time.monotonic() + timeout
    while True:
        submitted = _ray(*args)
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            return submitted
        time.sleep(2)


def _job_status(head_node: SimpleNamespace, job: str, timeout: float) -> str:
    """The job's status once it ended (succeeded, failed or stopped), lower case. Asked every
    5 s: each `ray job status` is a Python process that imports Ray, seconds of CPU on 2 cores."""
    deadline = time.monotonic() + timeout
    while True:
        answer = _ray("job", "status", "--address", head_node.address, job)
        status = (answer.stdout + answer.stderr).lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            return status
        assert time.monotonic() < deadline, f"job {job} still running: {status[-500:]}"
        time.sleep(5)


def _driver_log(head_node: SimpleNamespace, job: str) -> str:
    """What the job's entry point has printed so far, read from the head's log folder (what
    `ray job logs` serves), so waiting for a line costs no process per look."""
    try:
        return (head_node.logs / f"job-driver-{job}.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_a_ray_job_stopped_mid_training_resumes_when_submitted_again(head_node, digits, tmp_path):
    """The README's `ray job submit --working-dir . -- selftrain run pipelines/smoke.yaml`, stopped
    with `ray job stop` while the teacher trains, then the same command submitted again.

    `ray job stop` makes Ray's job supervisor send SIGTERM to the entry point (SIGKILL follows
    after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default): selftrain marks its MLflow runs KILLED before
    that and says how to resume. The second job joins the cluster, resumes the same MLflow runs
    and finishes them."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = tmp_path / "run"
    command = [
        "--working-dir", str(REPO),  # uploaded to the cluster; the job starts inside it
        "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": store}}), "--",
        "selftrain", "run", "pipelines/smoke.yaml",
        f"output_dir={output}", f"data.labeled={digits.labeled}", f"data.unlabeled={digits.unlabeled}",
        f"data.test={digits.test}", "name=smoke-job",
        # The job's plumbing is under test, not learning: the teacher alone, briefly.
        "iterations=0", "train.teacher_epochs=3",
    ]
    submitted = _submit("job", "submit", "--address", head_node.address, "--submission-id", "stopped", "--no-wait",
                        *command)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    deadline = time.monotonic() + 300
    # Stopped as soon as Ray Train starts the teacher: its first epoch is seconds away.
    while "training teacher" not in (logs := _driver_log(head_node, "stopped")):
        assert "epoch 1/3" not in logs and time.monotonic() < deadline, f"not stopped in training: {logs[-2000:]}"
        time.sleep(0.5)
    stopped = _ray("job", "stop", "--address", head_node.address, "stopped", timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped" in _job_status(head_node, "stopped", 60)
    logs = _ray("job", "logs", "--address", head_node.address, "stopped").stdout
    assert "selftrain: terminated (SIGTERM); re-run the same command to resume" in logs, logs[-3000:]
    assert "epoch 3/3" not in logs  # stopped mid-training, not after it
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("smoke-job").experiment_id
    killed = {r.data.tags["selftrain.role"]: r for r in client.search_runs([experiment])}
    assert {role: r.info.status for role, r in killed.items()} == {"pipeline": "KILLED", "teacher": "KILLED"}

    submitted = _submit("job", "submit", "--address", head_node.address, "--submission-id", "again", "--no-wait",
                        *command)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    status = _job_status(head_node, "again", 480)
    logs = _ray("job", "logs", "--address", head_node.address, "again").stdout
    assert "job 'again' succeeded" in status, logs[-3000:]
    assert f"resuming {output}" in logs
    assert "final student vs teacher" in logs and "[iteration 0] teacher cnn_tiny: epoch 3/3" in logs
    # The same two MLflow runs, reopened and finished: none left KILLED, none added.
    finished = {r.data.tags["selftrain.role"]: r for r in client.search_runs([experiment])}
    assert {role: r.info.run_id for role, r in finished.items()} == {role: r.info.run_id for role, r in killed.items()}
    assert {r.info.status for r in finished.values()} == {"FINISHED"}
    # The entry point joined the cluster it was submitted to instead of starting its own; what Ray
    # says of it is in the run's log file, not the job's log (the console keeps selftrain's lines).
    ray_log = "".join(p.read_text() for p in (output / "logs").glob("run-*.log"))
    assert "Connecting to existing Ray cluster" in ray_log and "Started a local Ray instance" not in ray_log
    assert "Connecting to existing Ray cluster" not in logs
    # `pipelines/smoke.yaml` is relative: it resolved only because the job ran in the uploaded --working-dir.
    summary = json.loads((output / "summary.json").read_text())
    assert summary["tracking_uri"] == store and summary["tracking_errors"] == []
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "run"
