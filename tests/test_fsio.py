"""Atomic files and the output_dir lock, on real files and real processes (no Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from selftrain.errors import ConfigError, DataError
from selftrain.fsio import LOCK_FILE, OutputLock, _atomic_write, atomic_torch_save, atomic_write_json
from selftrain.training.loop import STATE_FILE, load_train_state

HOLD = textwrap.dedent("""
    import sys, time
    from selftrain.fsio import OutputLock
    lock = OutputLock(sys.argv[1], "run").acquire()  # held while referenced
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(directory):
    """A separate process that takes the lock on `directory` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_files(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"final_test_accuracy": 0.9})

    def half_then_crash(handle):
        handle.write(b'{"final_test_acc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"final_test_accuracy": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_torch_save_round_trips(tmp_path):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    atomic_torch_save(weights, tmp_path / "model.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], weights["w"])


def test_a_second_holder_is_refused_naming_the_first_and_a_dead_holder_frees_the_lock(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(ConfigError) as info:
            OutputLock(tmp_path / "out", "run").acquire()
        assert f"pid {proc.pid}" in str(info.value)
        assert "is in use by another selftrain run" in str(info.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # as the OOM killer would
        proc.wait()
    with OutputLock(tmp_path / "out", "run"):
        assert f"pid {os.getpid()}" in (tmp_path / "out" / LOCK_FILE).read_text()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    outer = OutputLock(tmp_path, "run").acquire()
    with OutputLock(tmp_path, "run"):  # the pipeline inside the CLI's lock
        pass
    probe = subprocess.run([sys.executable, "-c", "import sys; from selftrain.fsio import OutputLock\n"
                            "try:\n  lock = OutputLock(sys.argv[1]).acquire()\nexcept Exception as e:\n  print(e)",
                            str(tmp_path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert "is in use" in probe.stdout  # still held after the inner release
    outer.release()


def test_cli_refuses_a_busy_output_dir_before_starting_ray(tmp_path, capsys):
    import ray

    from selftrain.cli import main

    started_before = ray.is_initialized()  # other tests of the session may have started it
    proc = _holder(tmp_path / "out")
    try:
        code = main(["run", str(REPO / "pipelines" / "fixmatch_smoke.yaml"), f"output_dir={tmp_path / 'out'}"])
    finally:
        proc.kill()
        proc.wait()
    assert code == 2
    assert f"pid {proc.pid}" in capsys.readouterr().err
    assert ray.is_initialized() == started_before  # refused before init_ray


def test_a_run_that_fails_validating_its_data_leaves_no_ledger(tmp_path, mlflow_store):
    """Fixing the typo must not be refused as 'a different config'."""
    from selftrain.config import load_config
    from selftrain.self_training import run_pipeline

    cfg = load_config(str(REPO / "pipelines" / "fixmatch_smoke.yaml"),
                      [f"output_dir={tmp_path / 'out'}", "data.builtin=null", f"data.labeled={tmp_path / 'typo'}",
                       f"data.unlabeled={tmp_path}", f"data.test={tmp_path}"])
    with pytest.raises(DataError, match="typo"):
        run_pipeline(cfg)
    assert not (tmp_path / "out" / "state.json").exists()


def test_a_training_state_loads_with_weights_only(tmp_path):
    """What the loop checkpoints (optimizer, scheduler, method state, history) needs no pickle."""
    from selftrain.methods import METHODS

    model = torch.nn.Linear(4, 3)
    method = METHODS["flexmatch"](3, {}, total_steps=10, pool_size=5)
    method.setup(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "method": method.state_dict(), "epoch": 3, "history": [{"epoch": 1, "train/loss": 0.5}]}
    torch.save(state, tmp_path / STATE_FILE)
    loaded = load_train_state(tmp_path)
    assert loaded["epoch"] == 3 and loaded["history"] == state["history"]
    assert torch.equal(loaded["method"]["records"], method.state_dict()["records"])


SECRET_URI = "s3://AKIAEXAMPLE:wJalrXUtnFEMI-topsecret@bucket/pool"


def test_data_credentials_never_reach_mlflow_the_ledger_or_the_console(tmp_path, mlflow_store, capsys):
    from mlflow.tracking import MlflowClient

    from selftrain.cli import main
    from selftrain.config import load_config
    from selftrain.ledger import Ledger
    from selftrain.tracking import Tracker

    cfg = load_config(str(REPO / "pipelines" / "fixmatch_smoke.yaml"),
                      ["data.builtin=null", f"data.unlabeled={SECRET_URI}", f"data.labeled={tmp_path}",
                       f"data.test={tmp_path}"])
    tracker = Tracker("masking")
    run_id = tracker.start_run("parent")
    tracker.log_params(run_id, cfg.model_dump())
    tracker.log_json(run_id, cfg.model_dump(), "config.json")
    Ledger(tmp_path / "out", cfg).put("mlflow_run_id", run_id)

    params = MlflowClient(mlflow_store).get_run(run_id).data.params
    assert params["data.unlabeled"] == "s3://AKIAEXAMPLE:***@bucket/pool"
    artifact = MlflowClient(mlflow_store).download_artifacts(run_id, "config.json", str(tmp_path))
    stored = {"config.json": open(artifact).read(), "state.json": (tmp_path / "out" / "state.json").read_text()}
    for name, text in stored.items():
        assert "topsecret" not in text, name
        assert "s3://AKIAEXAMPLE:***@bucket/pool" in text, name  # masked, not dropped

    assert main(["run", SECRET_URI + "/pipeline.yaml"]) == 2  # an error that quotes the URI (as a path: one slash)
    err = capsys.readouterr().err
    assert "AKIAEXAMPLE:***@bucket" in err and "topsecret" not in err


def test_a_lock_that_made_the_output_dir_removes_it_when_nothing_was_written(tmp_path):
    with OutputLock(tmp_path / "new", "run"):
        pass
    assert not (tmp_path / "new").exists()  # a failed start leaves nothing behind
    with OutputLock(tmp_path / "kept", "run"):
        (tmp_path / "kept" / "state.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_FILE, "state.json"]


def test_a_run_started_before_a_config_key_existed_resumes_when_the_key_is_at_its_default(tmp_path):
    """state.json written by an older selftrain lacks keys added since (here `registry`, and
    `train.max_failures`): read as their defaults they are no difference; a non-default value is."""
    from selftrain.config import ConfigError, build_config
    from selftrain.ledger import Ledger

    cfg = build_config({"name": "old"})
    Ledger(tmp_path, cfg).put("stage", 1)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["config"]["registry"], state["config"]["train"]["max_failures"]
    (tmp_path / "state.json").write_text(json.dumps(state))

    assert Ledger(tmp_path, cfg).get("stage") == 1  # resumes
    with pytest.raises(ConfigError, match=r"registry: None -> \{'model_name': 'prod'\}"):
        Ledger(tmp_path, build_config({"name": "old", "registry": {"model_name": "prod"}}))
    with pytest.raises(ConfigError, match=r"train.max_failures: None -> 2"):
        Ledger(tmp_path, build_config({"name": "old", "train": {"max_failures": 2}}))


def test_a_full_disk_is_found_in_a_wrapped_error_or_in_rays_text_and_named_with_the_directory(tmp_path):
    import errno

    from selftrain.errors import StorageError, full_disk_named, no_space_left

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("checkpoint upload failed") from exc
    except RuntimeError as wrapped:
        assert no_space_left(wrapped)
    # What Ray Train's controller raises on the driver: the worker's error as text only.
    assert no_space_left(RuntimeError("Training failed due to controller error:\n[Errno 28] Error writing bytes "
                                      "to file. Detail: [errno 28] No space left on device"))
    assert not no_space_left(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(StorageError, match=f"no space left on the device of {tmp_path} \\(.* MiB free\\)"):
        with full_disk_named(str(tmp_path)):
            raise full
    with pytest.raises(PermissionError):  # any other error passes through as itself
        with full_disk_named(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied")
