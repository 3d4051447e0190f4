"""Self-supervised pretraining end to end: SimCLR on the digits pool (Ray Data views into Ray
Train), a teacher started from the backbone, the labeled-only baseline beside it, and
`selftrain eval` on the saved backbone; real Ray, real MLflow."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from selftrain.cli import main
from selftrain.data.augment import to_model_input
from selftrain.data.decode import load_batch
from selftrain.evaluation.knn import knn_accuracy
from selftrain.evaluation.linear_probe import as_linear, fit_probe
from selftrain.models.backbone import strip_classifier
from selftrain.stages.features import CLASSIFIER_INIT_FILE
from selftrain.training.loop import load_model

from conftest import REPO, digits_overrides, experiment_runs, tracking_uri_set

PIPELINE = str(REPO / "pipelines" / "pretrain.yaml")
TINY = ["iterations=0", "pretrain.epochs=2", "pretrain.steps_per_epoch=3", "pretrain.batch_size=64",
        "train.teacher_epochs=2", "train.steps_per_epoch=5", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def pretrain_run(ray_session, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_uri_set(uri):
        code = main(["run", PIPELINE, f"output_dir={root / 'run'}", *digits_overrides(digits), *TINY])
    return {"code": code, "root": root, "uri": uri, "client": MlflowClient(uri),
            "summary": json.loads((root / "run" / "summary.json").read_text()) if code == 0 else None}


def _features(model_dir: str, images: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features computed here, in-process: no Ray, no actor pool."""
    model, spec = load_model(model_dir)
    backbone, _, _ = strip_classifier(model)
    loaded = load_batch({"path": images["path"].to_numpy(dtype=object)}, spec["image_size"], "image")
    x = to_model_input(torch.from_numpy(loaded["image"]).permute(0, 3, 1, 2))
    with torch.no_grad():
        return backbone(x), torch.as_tensor(images["label"].to_numpy(copy=True))


def _labeled_and_test(digits) -> tuple[pd.DataFrame, pd.DataFrame]:
    from selftrain.data.folders import load_labeled_sets

    sets = load_labeled_sets(digits.labeled, digits.test, 16)
    return sets.labeled, sets.test


def test_pretraining_reports_knn_every_epoch_in_its_own_mlflow_child_run(pretrain_run):
    assert pretrain_run["code"] == 0
    summary, client = pretrain_run["summary"], pretrain_run["client"]
    pretrain = summary["pretrain"]
    assert (pretrain["role"], pretrain["method"], pretrain["model"]) == ("pretrain", "simclr", "cnn_tiny")
    runs = experiment_runs(client, "pretrain")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    assert [r.data.tags["selftrain.role"] for r in children] == ["pretrain", "teacher", "baseline"]
    assert all(r.info.status == "FINISHED" for r in runs)
    run = children[0]
    assert run.info.run_id == pretrain["mlflow_run_id"]
    assert run.data.params["method.temperature"] == "0.5" and run.data.params["pool_rows"] == "1297"
    for key in ("val/knn_accuracy", "train/loss", "pretrain/embedding_std"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key  # one per epoch
    assert {m.value for m in client.get_metric_history(run.info.run_id, "train/steps")} == {3.0}
    # NT-Xent over 2 x 64 views: a loss near log(127) = 4.84 at the start, finite and positive
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert all(0.5 < v < 6.0 for v in losses)


def test_the_backbone_protocols_match_features_computed_in_process(pretrain_run, digits):
    """kNN of the test images among the labeled ones, recomputed here from the saved backbone's
    features without Ray: the Ray Data actor-pool path must give the same accuracy, well above
    chance (10 classes)."""
    pretrain = pretrain_run["summary"]["pretrain"]
    labeled, test = _labeled_and_test(digits)
    bank, bank_labels = _features(pretrain["model_dir"], labeled)
    queries, query_labels = _features(pretrain["model_dir"], test)
    expected = knn_accuracy(queries, query_labels, bank, bank_labels, 10, k=200, temperature=0.1)
    assert pretrain["knn_accuracy"] == pytest.approx(expected, abs=2 / len(test))  # float noise may flip one image
    assert pretrain["knn_accuracy"] > 0.4 and pretrain["linear_accuracy"] > 0.4
    run = pretrain_run["client"].get_run(pretrain["mlflow_run_id"])
    assert run.data.metrics["eval/knn_accuracy"] == pretrain["knn_accuracy"]
    assert run.data.metrics["eval/linear_accuracy"] == pretrain["linear_accuracy"]


def test_the_teacher_starts_from_the_pretrained_backbone_and_the_baseline_from_scratch(pretrain_run):
    """Ten SGD steps move the weights little: the teacher's convolutions stay closer to the
    backbone's, the random-init baseline's are as far as two random initialisations."""
    summary = pretrain_run["summary"]
    teacher, baseline = summary["iterations"][0], summary["baseline"]
    assert teacher["role"] == "teacher" and baseline["role"] == "baseline"
    params = pretrain_run["client"].get_run(teacher["mlflow_run_id"]).data.params
    assert params["init"] == summary["pretrain"]["model_dir"]

    def conv_weights(model_dir: str) -> torch.Tensor:
        state = torch.load(f"{model_dir}/model.pt", weights_only=True)
        return torch.cat([v.flatten() for k, v in state.items() if v.dim() == 4])

    backbone = conv_weights(summary["pretrain"]["model_dir"])
    to_teacher = (conv_weights(teacher["model_dir"]) - backbone).norm()
    to_baseline = (conv_weights(baseline["model_dir"]) - backbone).norm()
    assert to_teacher < 0.6 * to_baseline  # observed: 0.37 of it
    assert "pretrained backbone (simclr, cnn_tiny): kNN accuracy" in _table(summary)


def test_the_teachers_classifier_starts_as_a_linear_probe_of_the_backbone(pretrain_run, digits):
    """`train.head_init: linear_probe` (pipelines/pretrain.yaml): the classifier the teacher
    started from is the probe fitted here, in-process, on the backbone's features of the labeled
    images; it classifies the test images well above chance before any fine-tuning."""
    summary = pretrain_run["summary"]
    start = torch.load(pretrain_run["root"] / "run" / "iter0" / CLASSIFIER_INIT_FILE, weights_only=True)
    labeled, test = _labeled_and_test(digits)
    features, labels = _features(summary["pretrain"]["model_dir"], labeled)
    weight, bias = as_linear(fit_probe(features.numpy(), labels.numpy(), standardise=False), 10)
    queries, query_labels = _features(summary["pretrain"]["model_dir"], test)
    used = (queries @ start["weight"].T + start["bias"]).argmax(1)
    refit = (queries @ torch.from_numpy(weight).T + torch.from_numpy(bias)).argmax(1)
    assert (used == refit).float().mean() > 0.98  # the same probe, up to float noise in the features
    assert (used == query_labels).float().mean() > 0.4  # 10 classes: chance is 0.1


def _table(summary: dict) -> str:
    from selftrain.self_training import summary_table

    return summary_table(summary)


def test_a_pretraining_loss_that_diverges_names_the_pretraining_rate(pretrain_run, digits, capsys):
    """A diverging pretraining run says to lower `pretrain.lr`, the rate it ran at (not the
    teacher's `train.lr`, which it does not read). It runs under LARS (`pretrain.optimizer`), so
    that optimiser also runs once inside Ray Train here (its step is checked in test_loop)."""
    root = pretrain_run["root"]
    with tracking_uri_set(pretrain_run["uri"]):
        code = main(["run", PIPELINE, f"output_dir={root / 'diverged'}", "name=pretrain-diverged",
                     *digits_overrides(digits), *TINY, "pretrain.lr=1e30", "pretrain.optimizer=lars"])
    err = capsys.readouterr().err
    assert code == 2
    assert "loss became" in err and "lower pretrain.lr" in err and "train.lr" not in err.replace("pretrain.lr", "")
    [stage] = experiment_runs(pretrain_run["client"], "pretrain-diverged", "tags.`selftrain.role` = 'pretrain'")
    assert (stage.data.params["pretrain.optimizer"], stage.info.status) == ("lars", "FAILED")


def test_selftrain_eval_scores_a_saved_backbone_by_knn_and_finetuning(pretrain_run, digits, capsys):
    pretrain = pretrain_run["summary"]["pretrain"]
    out = pretrain_run["root"] / "eval"
    with tracking_uri_set(pretrain_run["uri"]):
        # A random head: 10 steps from a probe of this 6-step backbone end near chance (its
        # confident head moves BN's statistics), which says nothing about the protocol.
        code = main(["eval", pretrain["model_dir"], PIPELINE, *digits_overrides(digits), *TINY, "train.head_init=random",
                     "--protocol", "knn,finetune", "--label-fraction", "0.4", "--k", "20", "--out", str(out)])
    assert code == 0
    results = {r["protocol"]: r for r in json.loads((out / "eval.json").read_text())["results"]}
    labeled, test = _labeled_and_test(digits)
    bank, bank_labels = _features(pretrain["model_dir"], labeled)
    queries, query_labels = _features(pretrain["model_dir"], test)
    assert results["knn"]["accuracy"] == pytest.approx(
        knn_accuracy(queries, query_labels, bank, bank_labels, 10, k=20, temperature=0.1), abs=2 / len(test))
    assert results["knn"]["k"] == 20 and results["knn"]["labeled_images"] == 50
    finetune = results["finetune"]
    assert finetune["labeled_images"] == 20  # 40% of 5 per class, per class
    assert finetune["accuracy"] > 0.2  # 10 classes: chance is 0.1
    printed = capsys.readouterr().out
    assert "knn  accuracy" in printed and "finetune  accuracy" in printed
    evals = experiment_runs(pretrain_run["client"], "pretrain", "tags.`selftrain.role` = 'eval'")
    assert len(evals) == 1
    assert evals[0].data.metrics["eval/knn_accuracy"] == pytest.approx(results["knn"]["accuracy"])
    assert np.isfinite(evals[0].data.metrics["eval/finetune_accuracy"])
