"""`selftrain protocol`: a pipeline over label counts x seeds, mean ± std per label count."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from selftrain.cli import main
from selftrain.config import build_config
from selftrain.errors import ConfigError
from selftrain.protocol import protocol_table, run_protocol

from conftest import REPO, experiment_runs, tracking_uri_set


def test_the_table_is_mean_and_sample_std_per_label_count_in_percent():
    runs = pd.DataFrame({"labels_per_class": [1, 1, 1, 4], "seed": [0, 1, 2, 0],
                         "model": ["teacher"] * 4, "test_accuracy": [0.5, 0.6, 0.7, 0.9]})
    table = protocol_table(runs)
    assert table.loc[1, "teacher"] == "60.0 ± 10.0 (3)"  # std over seeds with ddof=1: 0.1
    assert table.loc[4, "teacher"] == "90.0 ± 0.0 (1)"


def test_label_counts_need_a_builtin_dataset(tmp_path):
    cfg = build_config({"data": {"builtin": None, "labeled": str(tmp_path), "unlabeled": str(tmp_path),
                                 "test": str(tmp_path)}, "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="data.labels_per_class, which applies to a built-in dataset"):
        run_protocol(cfg, [1, 4], 1)


def test_protocol_runs_each_label_count_and_reads_finished_runs_back(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["protocol", str(REPO / "pipelines" / "smoke.yaml"), f"output_dir={tmp_path / 'protocol'}",
            "iterations=0", "baseline=false", "train.teacher_epochs=1", "train.steps_per_epoch=4",
            f"data.cache_dir={tmp_path / 'cache'}", "--labels-per-class", "1,3", "--seeds", "1"]
    with tracking_uri_set(uri):
        assert main(args) == 0
    printed = capsys.readouterr().out
    runs = pd.read_csv(tmp_path / "protocol" / "runs.csv")
    assert sorted(runs["labels_per_class"]) == [1, 1, 3, 3] and set(runs["model"]) == {"teacher", "final"}
    for labels in (1, 3):  # each run is an ordinary run with its own summary, matching the table
        summary = json.loads((tmp_path / "protocol" / f"labels{labels}-seed0" / "summary.json").read_text())
        row = runs[(runs["labels_per_class"] == labels) & (runs["model"] == "teacher")]
        assert row["test_accuracy"].item() == pytest.approx(summary["teacher_test_accuracy"])
        assert len(summary["iterations"]) == 1 and summary["iterations"][0]["train_rows"] == 10 * labels
        assert f"{summary['teacher_test_accuracy'] * 100:.1f} ± 0.0 (1)" in printed
    markdown = (tmp_path / "protocol" / "protocol.md").read_text()
    assert [cell.strip() for cell in markdown.splitlines()[0].split("|")[1:-1]] == ["labels_per_class", "teacher", "final"]
    client = MlflowClient(uri)
    parents = experiment_runs(client, "smoke", "tags.`selftrain.role` = 'protocol'")
    pipelines = experiment_runs(client, "smoke", "tags.`selftrain.role` = 'pipeline'")
    assert len(parents) == 1 and len(pipelines) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in pipelines} == {parents[0].info.run_id}
    # a second call reads both runs back instead of training again
    with tracking_uri_set(uri):
        assert main(args) == 0
    assert capsys.readouterr().out.count("done before, read back") == 2
    assert len(experiment_runs(client, "smoke", "tags.`selftrain.role` = 'pipeline'")) == 2
