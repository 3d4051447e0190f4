"""Faults injected into real components, from outside, as a cluster would inflict them.

Run alone with `python -m pytest -m faults`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from selftrain.config import load_config
from selftrain.data.folders import load_labeled_sets
from selftrain.stages.train import train_model, training_streams

from conftest import REPO, digits_overrides, wait_for

pytestmark = pytest.mark.faults


def _train_worker_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors

    # This session's Ray by address: another Ray on the machine must not confuse the lookup.
    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return {a.pid for a in alive}


def _latest_checkpoint(storage: Path) -> str | None:
    snapshot = storage / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    return latest["checkpoint_dir_name"] if latest else None


def test_a_ddp_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(ray_session, digits, tmp_path):
    """SIGKILL one of two Ray Train workers (DDP over gloo, each rank reading its split of the
    seeded stream) once the first checkpoint is committed: Ray Train restarts the worker group,
    the loop resumes after that checkpoint, every epoch is in the history once, and the final
    weights equal those of an uninterrupted run with the same seed. A single worker is restarted
    the same way, as a group of one."""
    epochs, workers = 3, 2
    cfg = load_config(str(REPO / "pipelines" / "fixmatch.yaml"), [
        "teacher.method=supervised", "model.teacher=cnn_tiny", f"train.teacher_epochs={epochs}",
        "train.steps_per_epoch=30", "train.max_failures=1", "train.checkpoint_every=1", f"output_dir={tmp_path}",
        f"train.num_workers={workers}", "train.cpus_per_worker=0.5", "train.data_cpus_per_task=0.25",
        "train.batch_size=16"])
    sets = load_labeled_sets(digits.labeled, digits.test, cfg.data.image_size)
    streams = training_streams(cfg, cfg.teacher, sets.labeled, len(sets.classes), None, None)
    spec = {"num_classes": 10, "classes": sets.classes, "image_size": cfg.data.image_size}
    out = tmp_path / "iter0"
    result: dict = {}

    def fit() -> None:
        try:
            result["trained"] = train_model(cfg, "fault", "cnn_tiny", streams, spec, student=False,
                                            out_dir=out, seed=0)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=fit)  # the run whose worker is killed
    thread.start()
    storage = out.parent / "ray_train" / "fault"
    # Committed = registered by the controller (in its snapshot), not merely written: a worker
    # killed between the upload and the registration restarts from scratch, as it should.
    committed = wait_for(lambda: _latest_checkpoint(storage), 240, "the first committed checkpoint")
    saved = json.loads((storage / committed / "history.json").read_text())  # the epochs it holds
    victims = wait_for(lambda: len(pids := _train_worker_pids()) == workers and pids, 30, "the live RayTrainWorkers")
    victim = max(victims)  # one of them: with DDP, its peer is stopped and both restart
    os.kill(victim, signal.SIGKILL)
    # A new worker process takes over (had the run ended before the kill, none would come).
    wait_for(lambda: _train_worker_pids() - victims, 120, "a restarted RayTrainWorker")
    thread.join(timeout=300)

    assert "error" not in result, f"the run did not survive the kill: {result.get('error')!r}"
    history = result["trained"].history
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # each epoch once, in order
    # Resumed, not restarted from scratch: the epochs before the checkpoint are the ones it saved.
    assert history[:len(saved)] == saved
    assert (Path(result["trained"].model_dir) / "model.pt").exists()

    # Reproducible: the same config and seed, uninterrupted, ends on the same weights, bit for bit
    # (augmentation seeded per row and pass, rows in order, the stream's position and the RNG
    # restored with the checkpoint). Any of them missing moves some weight.
    again = train_model(cfg, "uninterrupted", "cnn_tiny", training_streams(cfg, cfg.teacher, sets.labeled, 10, None, None),
                        spec, student=False, out_dir=tmp_path / "again", seed=0)
    assert [h["train/loss"] for h in again.history] == [h["train/loss"] for h in history]
    killed = torch.load(Path(result["trained"].model_dir) / "model.pt", weights_only=True)
    clean = torch.load(Path(again.model_dir) / "model.pt", weights_only=True)
    assert killed.keys() == clean.keys()
    differing = [k for k in clean if not torch.equal(killed[k], clean[k])]
    assert not differing, f"weights differ from the uninterrupted run's: {differing}"


def test_sigterm_during_training_marks_the_runs_killed_and_exits_143(tmp_path):
    """`kill -TERM` (what `ray job stop` sends) while Ray Train fits the teacher."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "run", str(REPO / "pipelines" / "smoke.yaml"),
                             f"output_dir={tmp_path / 'run'}", "train.teacher_epochs=200", "--num-cpus", "2"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "training teacher" in line:
                break
        # Inside trainer.fit: the Ray Train run directory exists once the controller started.
        wait_for(lambda: list((tmp_path / "run" / "ray_train").glob("*")), 120, "Ray Train to start")
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "selftrain: terminated (SIGTERM); re-run the same command to resume" in err
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.data.tags["selftrain.role"] for r in runs) == ["pipeline", "teacher"]
    assert {r.info.status for r in runs} == {"KILLED"}


SLOW_CLEANUP = """
import sys, time
from types import SimpleNamespace
import selftrain.cli as cli

def command(args):  # a command whose cleanup is slower than `ray job stop`'s 3 s before SIGKILL
    try:
        print("running", flush=True)  # inside the try: a SIGTERM right after it still meets the cleanup
        time.sleep(60)
    finally:
        time.sleep(60)

cli.build_parser = lambda: SimpleNamespace(parse_args=lambda argv: SimpleNamespace(handler=command))
sys.exit(cli.main([]))
"""


def test_sigterm_is_answered_before_a_slow_cleanup_so_a_sigkill_after_it_cannot_hide_how_to_resume(tmp_path):
    """`ray job stop` sends SIGKILL 3 s after SIGTERM; the message must not wait for the cleanup."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        proc.kill()  # what Ray's job supervisor does next
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert err.strip() == "selftrain: terminated (SIGTERM); re-run the same command to resume"


def test_the_same_config_and_seed_give_the_same_pool_index_and_the_same_weights(ray_session, digits, tmp_path):
    """An online method (FlexMatch: weak and strong views of the pool made in Ray Data tasks, a
    labeled stream repeated and keyed) trained twice from scratch ends on the same weights, the
    second time on a copy of the data in another folder: rows are seeded by their paths below
    the data's roots, not by where the data lies."""
    import shutil

    import pandas as pd

    from selftrain.data.builtin import DataPaths
    from selftrain.stages.pool_index import index_pool

    moved = tmp_path / "moved" / "digits"
    for role in ("labeled", "unlabeled", "test"):
        shutil.copytree(getattr(digits, role), moved / role)
    copy = DataPaths(str(moved / "labeled"), str(moved / "unlabeled"), str(moved / "test"), True)
    orders, weights = [], []
    for run, data in enumerate([digits, copy]):
        # The quickstart's teacher, briefly: FlexMatch (its warm-up keeps every pool image in the
        # loss from the first step) at mu 7 and batch 32, so the pool's views are made by several
        # tasks at once; at mu 2 and batch 16 two runs happened to agree even with the views
        # arriving in the order their tasks finished (Ray Train's ingest default).
        cfg = load_config(str(REPO / "pipelines" / "quickstart.yaml"), [
            "train.teacher_epochs=1", "train.steps_per_epoch=10", f"output_dir={tmp_path}", *digits_overrides(data)])
        sets = load_labeled_sets(data.labeled, data.test, cfg.data.image_size)
        spec = {"num_classes": 10, "classes": sets.classes, "image_size": cfg.data.image_size}
        index = index_pool(str(data.unlabeled), "image", None, cfg.data.image_size, tmp_path / f"pool{run}", cfg.seed)
        paths = pd.read_parquet(index["dir"]).sort_values("index")["path"]
        orders.append(paths.str.removeprefix(str(data.unlabeled)).tolist())
        streams = training_streams(cfg, cfg.teacher, sets.labeled, 10, None, index)
        trained = train_model(cfg, f"run{run}", "cnn_tiny", streams, spec, student=False,
                              out_dir=tmp_path / f"run{run}", seed=0)
        weights.append(torch.load(Path(trained.model_dir) / "model.pt", weights_only=True))
        assert trained.history[-1]["unsup/mask_rate"] > 0.5  # the strong views move the weights
    assert orders[0] == orders[1] and len(orders[0]) > 1000  # the same shuffle, numbered the same
    differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differing, f"two runs with one seed differ in {differing}"


def _mount_tmpfs(path: Path, size: str) -> None:
    """A small filesystem of its own, to fill. Needs root (CI runs as root); elsewhere skipped,
    saying why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root; run the fault suite as root (CI does)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _fill(disk: Path) -> Path:
    """Writes zeros to `disk` until the device is full; returns the file that holds them."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as out:
        with pytest.raises(OSError) as full:
            while True:
                out.write(chunk)
    assert full.value.errno == errno.ENOSPC
    return filler


def _stopped_by_a_full_disk(args: list[str], disk: Path, out: Path, ready, what: str, capsys) -> Path:
    """`selftrain ARGS` in a thread; once `ready()` (`what`), `disk` is filled up. The command
    must stop with exit 2 and one line naming `out`, no traceback. Returns the filler file."""
    from selftrain.cli import main

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=main(args)))
    thread.start()
    wait_for(ready, 240, what)
    filler = _fill(disk)
    thread.join(timeout=300)
    assert result.get("code") == 2, result
    err = capsys.readouterr().err
    assert f"selftrain: error: no space left on the device of {out}" in err, err[-3000:]
    assert "Traceback" not in err
    return filler


def test_a_full_disk_while_checkpointing_stops_with_a_clear_error_and_the_same_command_resumes(
        ray_session, digits, tmp_path, capsys):
    """The device under output_dir fills up after the teacher's first committed checkpoint: the
    next checkpoint cannot be written. The command stops with one message naming the directory
    (exit 2, no traceback), the committed checkpoint stays whole, and once there is room the same
    command resumes from it and finishes, each epoch once."""
    from mlflow.tracking import MlflowClient

    from selftrain.cli import main

    from conftest import digits_overrides, experiment_runs, tracking_uri_set

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "32m")
    try:
        out, uri, epochs = disk / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", 4
        args = ["run", str(REPO / "pipelines" / "smoke.yaml"), f"output_dir={out}", "name=smoke-full-disk",
                "iterations=0", f"train.teacher_epochs={epochs}", "train.steps_per_epoch=30",
                "train.checkpoint_every=1", *digits_overrides(digits)]
        storage = out / "ray_train" / "iter0-teacher"
        with tracking_uri_set(uri):
            filler = _stopped_by_a_full_disk(args, disk, out, lambda: _latest_checkpoint(storage),
                                             "the first committed checkpoint", capsys)
            # The last checkpoint committed before the disk filled up is whole: its tensors load.
            committed = _latest_checkpoint(storage)
            saved = torch.load(storage / committed / "model.pt", weights_only=True)
            assert saved and all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
            filler.unlink()
            assert main(args) == 0  # the same command, once there is room
        history = json.loads((out / "iter0" / "model" / "history.json").read_text())
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # each epoch once
        client = MlflowClient(uri)
        runs = experiment_runs(client, "smoke-full-disk")
        assert sorted(r.data.tags["selftrain.role"] for r in runs) == ["pipeline", "teacher"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        teacher = next(r for r in runs if r.data.tags["selftrain.role"] == "teacher")
        assert sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "train/loss")) == list(
            range(1, epochs + 1))
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_full_disk_while_writing_the_pool_scores_stops_with_a_clear_error_and_the_same_command_resumes(
        ray_session, digits, tmp_path, capsys):
    """The device under output_dir fills up once the teacher is recorded as done, before the pool
    pass writes its scores Parquet. The command stops with one message naming the directory (exit
    2, no traceback), the pass is not recorded as done, and once there is room the same command
    scores the pool again and finishes, every pool image pseudo-labelled."""
    from selftrain.cli import main

    from conftest import digits_overrides, tracking_uri_set

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        out, uri = disk / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
        args = ["run", str(REPO / "pipelines" / "smoke.yaml"), f"output_dir={out}", "name=smoke-full-scores",
                "train.teacher_epochs=2", "train.student_epochs=1", *digits_overrides(digits)]

        def records() -> dict:
            try:
                return json.loads((out / "state.json").read_text())["records"]
            except (FileNotFoundError, json.JSONDecodeError):
                return {}

        with tracking_uri_set(uri):
            filler = _stopped_by_a_full_disk(args, disk, out, lambda: "iter0/result" in records(),
                                             "the teacher recorded as done", capsys)
            assert "iter0/result" in records() and "iter1/scores" not in records()
            # It failed in the pool pass, writing its Parquet (seen: the first shard begun).
            assert (out / "iter1" / "scoring" / "scores").is_dir()
            filler.unlink()
            assert main(args) == 0  # the same command, once there is room
        printed = capsys.readouterr().out
        assert "training teacher" not in printed and "scores the pool" in printed
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rejected_count"] == 0 and summary["iterations"][1]["pseudo_labels_kept"] == 1297
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)
