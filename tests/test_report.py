"""`selftrain report` without a cluster: the sweep page on a sweep folder written here by hand
(with the statuses the real sweep fixture never produces: stopped early, failed), and the errors
for a folder that holds nothing to report. Pipeline runs: tests/test_pipeline.py (the smoke run);
a real sweep: tests/test_sweep.py."""

from __future__ import annotations

import json

import yaml

from selftrain.cli import main

from conftest import external_references, page_data

SPACE = {"pseudo_label.threshold": {"grid": [0.0, 0.5, 0.9]}, "noise.randaugment_magnitude": {"choice": [5, 9]}}
TRIALS = [
    {"trial_id": "a_00000", "params": {"pseudo_label.threshold": 0.0, "noise.randaugment_magnitude": 5},
     "objective": 0.6166666666666667, "status": "completed", "epochs": 4, "error": None, "mlflow_run_id": "run-a"},
    {"trial_id": "a_00001", "params": {"pseudo_label.threshold": 0.5, "noise.randaugment_magnitude": 9},
     "objective": 0.8333333333333334, "status": "completed", "epochs": 4, "error": None, "mlflow_run_id": "run-b"},
    {"trial_id": "a_00002", "params": {"pseudo_label.threshold": 0.9, "noise.randaugment_magnitude": 5},
     "objective": 0.3, "status": "stopped_early", "epochs": 1, "error": None, "mlflow_run_id": "run-c"},
    {"trial_id": "a_00003", "params": {"pseudo_label.threshold": 0.9, "noise.randaugment_magnitude": 9},
     "objective": None, "status": "failed", "epochs": 0, "mlflow_run_id": "run-d",
     "error": "pseudo_label.threshold=0.9 keeps 0 of 1297 pool images"},
]


def _sweep_dir(tmp_path, with_summary=True):
    out = tmp_path / "sweep"
    out.mkdir()
    best_config = out / "best_config.yaml"
    best_config.write_text("# selftrain run best_config.yaml\nname: handmade\npseudo_label:\n  threshold: 0.5\n")
    (out / "state.json").write_text(json.dumps({"config": {"pipeline": {"name": "handmade", "iterations": 1},
                                                           "sweep": {"space": SPACE}}, "records": {}}))
    if with_summary:
        (out / "summary.json").write_text(json.dumps({
            "mlflow_run_id": "parent", "tracking_uri": "sqlite:///mlflow.db", "experiment": "handmade",
            "objective": "val/accuracy", "labeled_train_images": 40,
            "teacher": {"model": "cnn_tiny", "test_accuracy": 0.7, "val_accuracy": 0.5, "mlflow_run_id": "teacher",
                        "model_dir": "/nowhere"},
            "trials": TRIALS, "best_trial": "a_00001", "best_params": TRIALS[1]["params"], "best_val_accuracy": 0.8333333333333334,
            "best_test_accuracy": 0.7555555555555555, "best_config": "/moved/elsewhere/best_config.yaml",
            "teacher_scoring_passes": 1, "trials_by_status": {"completed": 2, "stopped_early": 1, "failed": 1},
            "wall_seconds": 312.5, "tracking_errors": []}))
    return out


def _by(elements, metric, key):
    return {e.get(key): e.get("value") for e in elements if e.get("metric") == metric}


def test_sweep_report_shows_each_trial_each_key_the_best_config_and_the_early_stops(tmp_path, capsys):
    out = _sweep_dir(tmp_path)
    assert main(["report", str(out)]) == 0
    assert "report of the sweep" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert external_references(html) == [] and "<script" not in html.lower()
    elements = page_data(html)
    assert _by(elements, "objective", "trial") == {t["trial_id"]: t["objective"] and repr(t["objective"]) for t in TRIALS}
    assert {e["trial"]: e["text"] for e in elements if e.get("metric") == "objective"} == {
        "a_00000": "0.6167", "a_00001": "0.8333", "a_00002": "0.3000", "a_00003": "–"}
    assert _by(elements, "best_test_accuracy", "metric") == {"best_test_accuracy": "0.7555555555555555"}
    assert [e["text"] for e in elements if e.get("metric") == "best-trial"] == ["a_00001"]
    # one scatter per swept key, and the bars per trial
    assert sorted(e.get("key", "") + e["figure"] for e in elements if e["tag"] == "img") == [
        "noise.randaugment_magnitudeobjective-per-key", "objective-per-trial",
        "pseudo_label.thresholdobjective-per-key"]
    early = next(e for e in elements if "stopped-early" in e)
    assert (early["stopped-early"], early["failed"]) == ("1", "1")
    assert "trial a_00002 (pseudo_label.threshold=0.9, noise.randaugment_magnitude=5): stopped after 1 epoch" in html
    assert "keeps 0 of 1297 pool images" in html
    # the summary's best_config path is gone (a copied folder): the file in OUTPUT_DIR is shown
    assert "name: handmade\npseudo_label:\n  threshold: 0.5" in html
    shown = {e["config"]: yaml.safe_load(e["text"]) for e in elements if "config" in e}
    assert shown["sweep"]["sweep"]["space"] == SPACE and shown["base-pipeline"] == {"name": "handmade", "iterations": 1}


def test_an_unfinished_sweep_is_refused_with_what_to_do(tmp_path, capsys):
    out = _sweep_dir(tmp_path, with_summary=False)
    assert main(["report", str(out)]) == 2
    assert f"{out} holds a sweep that has not finished" in capsys.readouterr().err


def test_a_folder_without_a_run_is_named(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no selftrain run or sweep" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such directory" in capsys.readouterr().err
