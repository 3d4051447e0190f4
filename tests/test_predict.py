"""`selftrain predict`: every file of a folder labeled through the scoring path, unreadable
files named, predictions equal to the model's own forward pass; MODEL as folder, run id, or
registered model (alias, version)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from selftrain.cli import main
from selftrain.data.augment import to_model_input
from selftrain.data.decode import decode_image
from selftrain.models.registry import build_model
from selftrain.stages.predict import resolve_model
from selftrain.tracking import Tracker
from selftrain.training.loop import load_model, save_model

from conftest import copy_tree, write_corrupt_files

CLASSES = [f"digit{c}" for c in range(10)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    save_model(directory, build_model("cnn_tiny", 10), {"arch": "cnn_tiny", "num_classes": 10,
                                                         "classes": CLASSES, "image_size": 16})
    return directory


def test_predict_labels_every_image_names_unreadable_ones_and_matches_the_model(ray_session, digits, model_dir,
                                                                                 tmp_path, capsys):
    data = copy_tree(f"{digits.test}/3", tmp_path / "data")  # real digit images
    bad = write_corrupt_files(data / "broken")
    assert main(["predict", str(model_dir), str(data), "--out", str(tmp_path / "preds.parquet")]) == 0
    preds = pd.read_parquet(tmp_path / "preds.parquet")
    good = preds[preds["error"] == ""]
    assert len(preds) == len(good) + len(bad) and len(good) == len(list(data.glob("*.png")))
    assert sorted(preds.loc[preds["error"] != "", "path"]) == sorted(bad)
    out = capsys.readouterr().out
    assert f"predicted {len(good)} images (3 unreadable" in out
    # Live progress from the scoring actors: the task's last line counts every file, 3 unreadable.
    assert f"predicting {data}: {len(preds):,} images" in out and "3 unreadable" in out.split("predicting")[-1]

    model, _ = load_model(model_dir)
    images = np.stack([decode_image(open(p, "rb").read(), 16) for p in good["path"]])
    with torch.no_grad():
        probs = torch.softmax(model(to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2))), dim=1).numpy()
    np.testing.assert_allclose(np.stack(good["probabilities"].to_numpy()), probs, rtol=1e-4, atol=1e-5)
    assert good["class"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(good["confidence"], probs.max(axis=1), rtol=1e-4)


def test_predict_takes_an_mlflow_run_id_and_refuses_what_is_not_a_model(ray_session, digits, model_dir, tmp_path,
                                                                         mlflow_store, capsys):
    # A run from before models were MLflow models: its `model` artifact is the bare folder.
    client = MlflowClient(mlflow_store)
    run = client.create_run(client.create_experiment("predict"))
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    data = copy_tree(f"{digits.test}/5", tmp_path / "five")
    assert main(["predict", run.info.run_id, str(data), "--out", str(tmp_path / "a")]) == 0
    assert main(["predict", f"runs:/{run.info.run_id}/model", str(data), "--out", str(tmp_path / "b")]) == 0
    assert pd.read_parquet(tmp_path / "a").sort_values("path").equals(pd.read_parquet(tmp_path / "b").sort_values("path"))
    capsys.readouterr()
    assert main(["predict", str(tmp_path), str(data), "--out", str(tmp_path / "c")]) == 2
    assert "no model.json in this folder" in capsys.readouterr().err
    assert main(["predict", "digits@best", str(data), "--out", str(tmp_path / "c")]) == 2
    assert "not a model folder, an MLflow run id, runs:/<run id>/model, models:/<name>@<alias>" in capsys.readouterr().err
    assert main(["predict", "models:/digits@best", str(data), "--out", str(tmp_path / "c")]) == 2
    assert "MODEL models:/digits@best: Registered Model with name=digits not found" in capsys.readouterr().err


def test_predict_takes_a_registered_model_by_alias_or_version(ray_session, digits, model_dir, tmp_path, mlflow_store,
                                                               capsys):
    tracker = Tracker("predict-registry")
    run = tracker.start_run("trained")
    model, spec = load_model(model_dir)
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    model_id = tracker.log_model(run, model, example, 10, [str(model_dir / "model.pt"), str(model_dir / "model.json")])
    registered = tracker.register_model("digits", model_id, run, 0.5, {})
    tracker.client.set_registered_model_alias("digits", "champion", registered["version"])
    data = copy_tree(f"{digits.test}/7", tmp_path / "seven")
    assert main(["predict", str(model_dir), str(data), "--out", str(tmp_path / "folder")]) == 0
    assert main(["predict", "models:/digits@champion", str(data), "--out", str(tmp_path / "alias")]) == 0
    by_path = [pd.read_parquet(tmp_path / name).sort_values("path", ignore_index=True) for name in ("folder", "alias")]
    pd.testing.assert_frame_equal(*by_path)
    # models:/<name>/<version> and the run id resolve to the same two files; nothing else is downloaded.
    for uri in (f"models:/digits/{registered['version']}", run, f"runs:/{run}/model"):
        local = resolve_model(uri, str(tmp_path / "downloads"))
        assert sorted(p.name for p in Path(local).iterdir()) == ["model.json", "model.pt"]
        assert (Path(local) / "model.pt").read_bytes() == (model_dir / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["predict", "models:/digits@nope", str(data), "--out", str(tmp_path / "c")]) == 2
    assert "MODEL models:/digits@nope: Registered model alias nope not found" in capsys.readouterr().err
