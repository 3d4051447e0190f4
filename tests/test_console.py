"""The console: selftrain's lines on stdout, library output in the run's log file, progress lines
with rates and ETAs from the workers' own clocks (no Ray here; the smoke pipeline in
test_pipeline.py checks the whole console of a real run)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from selftrain.console import LOGGER, _Task, console, duration


def test_scoring_rate_and_eta_come_from_the_batches_own_times():
    task = _Task("scoring", "img", total=1024)
    task.update(256, now=100.0)  # the first batch: its start-up is not in the rate
    assert task.rate() is None and "img/s" not in task.line()
    task.update(512, now=101.0)
    task.update(768, now=102.0)
    assert task.rate() == pytest.approx(256.0)  # 512 images in the 2 s after the first batch
    assert task.line() == "scoring: 768/1,024 images  256 img/s  ETA 0:01"
    task.extra = 3
    task.update(1024, now=103.0)
    assert task.finished() and task.line() == "scoring: 1,024/1,024 images  256 img/s  3 unreadable"


def test_training_eta_leaves_out_the_first_epoch():
    task = _Task("teacher", "epoch", total=10)
    for epoch, seconds in enumerate([30.0, 2.0, 4.0], start=1):
        task.update(epoch, now=float(epoch))
        task.epoch_seconds.append(seconds)
        task.fields = {"train/loss": 1.0 / epoch, "val/accuracy": 0.5, "train/images_per_s": 640.0}
    # 7 epochs left at the mean of epochs 2-3 (3 s): 21 s. With epoch 1 it would say 84 s.
    assert task.line() == "teacher: epoch 3/10  loss 0.333  val 0.500  640 img/s  ETA 0:21"
    assert duration(3725) == "1:02:05"


def test_normal_console_sends_library_output_to_the_log_and_restores_it(tmp_path, monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr("sys.stdout", shown)
    library = logging.getLogger("ray.test_console")
    library_stream = io.StringIO()
    library.addHandler(logging.StreamHandler(library_stream))
    library.setLevel(logging.INFO)
    try:
        with console("normal", tmp_path, "run") as state:
            LOGGER.info("10 classes, 50 labeled")
            library.info("Execution plan of Dataset x")
            print("(RayTrainWorker pid=1) Reporting training result 1")  # what Ray's log thread prints
            warnings.warn("a deprecation of somebody else's", DeprecationWarning)
            LOGGER.warning("the mask stayed empty")
        log = state.log_path.read_text()
        assert state.log_path.parent == tmp_path / "logs"
        for line in ("Execution plan of Dataset x", "Reporting training result 1", "a deprecation of somebody else's"):
            assert line in log and line not in shown.getvalue()
        lines = shown.getvalue().splitlines()
        assert lines[0].startswith("[00:00] log: ") and str(state.log_path) in lines[0]
        assert lines[1:] == ["[00:00] 10 classes, 50 labeled", "[00:00] warning: the mask stayed empty"]
        # After the command, the library's handler writes where it wrote before.
        library.info("after")
        assert library_stream.getvalue() == "after\n"
    finally:
        library.handlers.clear()


def test_quiet_shows_warnings_only_and_verbose_leaves_library_output_on_the_console(tmp_path, monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr("sys.stdout", shown)
    with console("quiet", tmp_path, "run"):
        LOGGER.info("progress nobody asked for")
        LOGGER.warning("pseudo-labels collapsed onto one class")
    assert shown.getvalue().splitlines() == ["[00:00] warning: pseudo-labels collapsed onto one class"]

    shown.seek(0)
    shown.truncate()
    with console("verbose", tmp_path / "v", "run") as state:
        print("(RayTrainWorker pid=1) Reporting training result 1")
        LOGGER.info("ours")
    assert state.log_path is None and not (tmp_path / "v").exists()
    assert shown.getvalue().splitlines() == ["(RayTrainWorker pid=1) Reporting training result 1", "[00:00] ours"]
