"""The driver of a pipeline killed in each of its stages, one after another, and a stage whose
result was lost: the same command resumes each time (faults injected from outside, as a cluster
would inflict them; its own module so the test processes can run it beside test_faults.py).

Run alone with `python -m pytest -m faults`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selftrain.config import load_config

from conftest import REPO

pytestmark = pytest.mark.faults


def _driver_killed_at(args: list[str], env: dict[str, str], cwd: Path, cue: str) -> str:
    """`selftrain run ARGS` in a driver of its own, SIGKILLed (no handler runs, as with the OOM
    killer) at the first console line that holds `cue`; what it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "run", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if cue in line:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        seen.append(proc.communicate(timeout=60)[0])
    console = "".join(seen)
    assert cue in console and "summary: " not in console, f"the driver was not killed at {cue!r}:\n{console[-3000:]}"
    return console


@pytest.fixture(scope="module")
def killed_three_times(ray_session, digits, tmp_path_factory):
    """The smoke pipeline's driver SIGKILLed while the teacher trains, after its first epoch's
    checkpoint; then (the same command again) while the pool's pseudo-labels are made; then as
    the student starts, before its first checkpoint. The fourth run of the command finishes.
    (A kill after a student's checkpoint resumes as the teacher's does: the same stage code; a
    worker killed mid-run: test_faults.py.) What the tests check is read here, before any test
    changes the run."""
    from mlflow.tracking import MlflowClient

    from selftrain.cli import main

    from conftest import digits_overrides, experiment_runs, pool_subset, tracking_uri_set

    import ray

    root = tmp_path_factory.mktemp("kills")
    out, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    # 300 pool images and 2 student epochs: what is checked is where each run resumes, not how
    # good the student gets (the full smoke run: test_pipeline.py).
    pool = pool_subset(digits.unlabeled, root / "pool", per_class=30)
    args = [str(REPO / "pipelines" / "smoke.yaml"), f"output_dir={out}", "name=smoke-kills", "train.student_epochs=2",
            *digits_overrides(digits, pool)]
    # The drivers join this session's Ray, so a kill leaves the cluster up, as with a `ray job`.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "PYTHONUNBUFFERED": "1"}
    consoles = [_driver_killed_at(args, env, root, cue) for cue in (
        "[iteration 0] teacher cnn_tiny: epoch ",  # the first epoch's progress line: mid-training
        "[iteration 1] pseudo-labelling: ",        # the pool scored, its pseudo-labels being made
        "[iteration 1] training student",          # Ray Train starting the student: no checkpoint yet
    )]
    with tracking_uri_set(uri):
        code = main(["run", *args])
        client = MlflowClient(uri)
        runs = experiment_runs(client, "smoke-kills")
        summary = json.loads((out / "summary.json").read_text()) if code == 0 else {}
        cfg = load_config(args[0], args[1:])
        models = []
        for record, epochs in zip(summary.get("iterations", []), (cfg.train.teacher_epochs, cfg.train.student_epochs)):
            history = json.loads((Path(record["model_dir"]) / "history.json").read_text())
            logged = client.get_metric_history(record["mlflow_run_id"], "train/loss")
            models.append({"role": record["role"], "epochs": epochs, "history": [h["epoch"] for h in history],
                           "logged": sorted(m.step for m in logged)})
        yield {"code": code, "consoles": consoles, "args": args, "root": root, "client": client, "models": models,
               "runs": [(r.data.tags["selftrain.role"], r.info.status) for r in runs]}


def test_a_driver_killed_in_each_stage_resumes_each_time_with_one_mlflow_run_per_stage(killed_three_times):
    """Each kill leaves RUNNING MLflow runs and a half-done stage behind; in the end there is one
    MLflow run per stage, none left RUNNING, and each epoch once in each model's history and in
    MLflow. (A kill in the pool pass: test_pipeline.py; in a sweep trial: test_sweep.py.)"""
    run = killed_three_times
    consoles = run["consoles"]
    assert all("resuming" in console for console in consoles[1:])
    assert "training teacher" not in consoles[2] and "scores the pool" not in consoles[2]  # done ones not redone
    assert run["code"] == 0
    assert sorted(run["runs"]) == [("pipeline", "FINISHED"), ("student", "FINISHED"), ("teacher", "FINISHED")]
    assert [m["role"] for m in run["models"]] == ["teacher", "student"]
    for model in run["models"]:
        assert model["history"] == list(range(1, model["epochs"] + 1)), model
        assert model["logged"] == list(range(1, model["epochs"] + 1)), model


def test_a_student_whose_result_was_lost_is_retrained_in_its_own_mlflow_run(killed_three_times, capsys):
    """state.json lost the finished student (as if the driver died between MLflow and the ledger)
    and its Ray Train run is gone: the same command trains the student again, in the same MLflow
    run, as a second MLflow model and a second registered version; @best stays on the better."""
    from selftrain.cli import main

    from conftest import experiment_runs, tracking_uri_set

    run, client = killed_three_times, killed_three_times["client"]
    out = run["root"] / "run"
    state = json.loads((out / "state.json").read_text())
    child = state["records"]["iter1/mlflow_run_id"]
    del state["records"]["iter1/result"]
    (out / "state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "ray_train" / "iter1-student")
    capsys.readouterr()
    with tracking_uri_set(client.tracking_uri):
        assert main(["run", *run["args"]]) == 0
    printed = capsys.readouterr().out
    assert "training student" in printed and "training teacher" not in printed and "scores the pool" not in printed
    assert len(experiment_runs(client, "smoke-kills")) == 3
    assert client.get_run(child).info.status == "FINISHED"
    epochs = run["models"][1]["epochs"]
    assert len(client.get_metric_history(child, "train/loss")) == epochs  # no duplicates
    assert len(client.get_metric_history(child, "eval/accuracy")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"][1]["mlflow_run_id"] == child
    models = [client.get_logged_model(o.model_id) for o in client.get_run(child).outputs.model_outputs]
    newest = max(models, key=lambda m: m.creation_timestamp)
    assert len(models) == 2 and summary["iterations"][1]["mlflow_model_id"] == newest.model_id
    versions = client.search_model_versions("name = 'smoke-kills'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    accuracy = {int(v.version): float(v.tags["test_accuracy"]) for v in versions}
    best = client.get_model_version_by_alias("smoke-kills", "best")
    assert accuracy[int(best.version)] == max(accuracy.values())
