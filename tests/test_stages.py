"""Stages on the shared local CPU Ray, over real image files."""

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selftrain.config import PseudoLabelConfig, ScoringConfig
from selftrain.data.pool import read_pool
from selftrain.errors import DataError, PseudoLabelError
from selftrain.models.registry import build_model
from selftrain.stages.evaluate import evaluate
from selftrain.stages.pseudo_label import select_pseudo_labels
from selftrain.stages.score import rows_per_task, score, score_pool
from selftrain.data.augment import to_model_input
from selftrain.data.decode import decode_image
from selftrain.training.loop import load_model, save_model

from conftest import copy_tree, png_bytes, write_corrupt_files

CLASSES = [str(c) for c in range(10)]
SCORING = ScoringConfig(batch_size=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained but real resnet18 checkpoint (scoring needs a model, not a good one)."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)  # an untrained net often predicts one class for all; seed 0 predicts 4
    save_model(directory, build_model("resnet18", 10), {"arch": "resnet18", "num_classes": 10,
                                                          "classes": CLASSES, "image_size": 16})
    return str(directory)


@pytest.fixture(scope="module")
def corrupt_pool(digits, tmp_path_factory):
    """The digits pool plus three corrupt files."""
    pool = copy_tree(digits.unlabeled, tmp_path_factory.mktemp("pool") / "pool")
    return pool, write_corrupt_files(pool / "7")


@pytest.fixture(scope="module")
def scored_pool(ray_session, corrupt_pool, model_dir, tmp_path_factory):
    """`corrupt_pool` scored once for the tests below."""
    pool, bad = corrupt_pool
    out = tmp_path_factory.mktemp("scores")
    scores = score_pool(read_pool(str(pool), "image", CLASSES), model_dir, SCORING, 16, out)
    return scores, bad, sum(1 for p in pool.rglob("*") if p.is_file())


def test_scoring_keeps_every_good_image_and_names_every_bad_one(scored_pool, model_dir):
    scores_dir, bad, files = scored_pool
    table = pd.read_parquet(scores_dir)
    assert len(table) == files == 1297 + 3
    errors = table[table["error"] != ""]
    assert sorted(errors["path"]) == sorted(bad)
    good = table[table["error"] == ""]
    assert len(good) == 1297 and (good["prediction"] >= 0).all()
    assert (good["label"] == good["path"].map(lambda p: int(p.split("/")[-2]))).all()
    # The logits are the model's own on that very file, whatever row order the actors saw.
    sample = good.sample(8, random_state=0)
    model, _ = load_model(model_dir)
    images = np.stack([decode_image(open(p, "rb").read(), 16) for p in sample["path"]])
    with torch.no_grad():
        expected = model(to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.stack(sample["logits"].to_numpy()), expected, rtol=1e-4, atol=1e-4)
    probs = torch.softmax(torch.from_numpy(expected), dim=1)
    np.testing.assert_allclose(sample["confidence"], probs.max(dim=1).values.numpy(), rtol=1e-4)
    assert (sample["prediction"].to_numpy() == probs.argmax(dim=1).numpy()).all()


def test_concurrent_batches_in_one_actor_score_each_row_as_one_at_a_time(scored_pool, corrupt_pool, model_dir,
                                                                        tmp_path):
    """Three calls at once in the actor's threads (as on a GPU): every row keeps its own
    logits, and an unreadable file's row is blanked, not dropped and not another row's."""
    pool, bad = corrupt_pool
    cfg = SCORING.model_copy(update={"batch_size": 64, "concurrent_batches": 3})
    concurrent = pd.read_parquet(score_pool(read_pool(str(pool), "image", CLASSES), model_dir, cfg, 16, tmp_path))
    serial = pd.read_parquet(scored_pool[0])
    assert len(concurrent) == len(serial) == 1300
    both = serial.merge(concurrent, on="path", suffixes=("_serial", "_concurrent"), validate="one_to_one")
    assert len(both) == 1300
    assert np.allclose(np.stack(both["logits_serial"]), np.stack(both["logits_concurrent"]), atol=1e-4)
    assert (both["prediction_serial"] == both["prediction_concurrent"]).all()
    blanked = concurrent[concurrent["path"].isin(bad)]
    assert len(blanked) == 3 and (blanked["prediction"] == -1).all() and (blanked["confidence"] == 0).all()
    assert not np.stack(blanked["logits"]).any()


def test_a_scoring_task_holds_up_to_four_batches_within_its_byte_budget():
    cfg = ScoringConfig(batch_size=256)
    assert rows_per_task(cfg, image_size=32) == 4 * 256  # 3 MiB of images
    assert rows_per_task(cfg, image_size=224) == 3 * 256  # 38.5 MB a batch, 128 MiB a task at most
    assert rows_per_task(cfg, image_size=320) == 256  # 78.6 MB: one batch
    assert rows_per_task(cfg.model_copy(update={"batch_size": 4096}), 224) == 4096  # never less than a batch


@pytest.mark.parametrize("calls", [1, 3])
def test_an_actor_task_holds_four_batches_whether_its_calls_overlap_or_not(corrupt_pool, model_dir, calls):
    """Ray's work between two actor tasks falls once per four batches, one call at a time (CPU)
    or with calls overlapping in threads (a GPU), where each thread works through its own task.
    The tasks are counted by Ray Data's own stats (a call cannot see its task: calls run in a
    thread of the actor)."""
    pool, _ = corrupt_pool
    cfg = SCORING.model_copy(update={"batch_size": 64, "concurrent_batches": calls, "use_gpu": False})
    assert rows_per_task(cfg, image_size=16) == 4 * 64
    scored = score(read_pool(str(pool), "image", CLASSES), model_dir, cfg, 16, from_paths=False).materialize()
    assert scored.count() == 1300
    stats = scored.stats()
    found = re.search(r"MapBatches\(TeacherScorer\): (\d+) tasks executed", stats)
    assert found, stats
    # the pool's 10 read blocks of 130 files, decoded and handed over in 256s or more (one block a
    # task would make at least 10 tasks)
    assert int(found.group(1)) <= 1300 // 256


def test_pseudo_labels_balanced_and_written_with_their_provenance(scored_pool, tmp_path):
    scores_dir, bad, _ = scored_pool
    cfg = PseudoLabelConfig(threshold=0.0, temperature=2.0, balance=True, per_class=40)
    meta = {"teacher_id": "run-1", "teacher_model": "resnet18", "iteration": 1, "threshold": 0.0, "temperature": 2.0}
    directory, stats, rows = select_pseudo_labels(scores_dir, cfg, CLASSES, tmp_path, seed=0, meta=meta, pool_root="")
    labels = pd.read_parquet(directory)
    present = [c for c, n in enumerate(stats.kept_per_class) if n > 0]
    assert stats.scored == 1297 and stats.kept == 1297 and len(stats.rejected) == 3
    assert sorted(r["path"] for r in stats.rejected) == sorted(bad)
    assert rows == len(labels) == 40 * len(present)
    assert labels.groupby("pseudo_label").size().eq(40).all()
    assert set(labels.columns) >= {"path", "pseudo_label", "confidence", "soft_target", "true_label",
                                   "teacher_id", "iteration", "threshold", "temperature"}
    soft = np.stack(labels["soft_target"].to_numpy())
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    assert (labels["teacher_id"] == "run-1").all() and (labels["temperature"] == 2.0).all()


def test_a_threshold_that_keeps_nothing_stops_with_the_reason(scored_pool, tmp_path):
    cfg = PseudoLabelConfig(threshold=0.99)
    with pytest.raises(PseudoLabelError, match=r"threshold=0.99 keeps 0 of 1297 pool images"):
        select_pseudo_labels(scored_pool[0], cfg, CLASSES, tmp_path, seed=0, meta={}, pool_root="")
    assert not (tmp_path / "pseudo_labels").exists()


def test_pseudo_labels_collapsed_onto_one_class_stop(tmp_path, ray_session):
    logits = np.zeros((20, 3), dtype=np.float32)
    logits[:, 1] = 5.0
    table = pd.DataFrame({"path": [f"p{i}" for i in range(20)], "label": -1, "error": "",
                          "logits": list(logits), "prediction": 1, "confidence": 0.98})
    pq.write_table(pa.Table.from_pandas(table), tmp_path / "scores.parquet")
    with pytest.raises(PseudoLabelError, match=r"collapsed onto one class \('b': all 20 kept images\)"):
        select_pseudo_labels(str(tmp_path / "scores.parquet"), PseudoLabelConfig(), ["a", "b", "c"],
                             tmp_path, seed=0, meta={}, pool_root="")


def test_parquet_pool_rows_are_addressed_by_file_and_row(ray_session, tmp_path, model_dir):
    images = [png_bytes(np.full((8, 8), v, np.uint8)) for v in (0, 100, 200)] + [b"broken"]
    pq.write_table(pa.table({"img": images}), tmp_path / "pool.parquet")
    with pytest.raises(DataError, match=r"has no column 'image' \(columns: img\)"):
        read_pool(str(tmp_path / "pool.parquet"), "image", None)
    scores = score_pool(read_pool(str(tmp_path / "pool.parquet"), "img", None), model_dir, SCORING, 16, tmp_path)
    table = pd.read_parquet(scores).sort_values("path")
    assert table["path"].tolist() == [f"{tmp_path / 'pool.parquet'}#row={i}" for i in range(4)]
    assert (table["error"] != "").tolist() == [False, False, False, True]
    assert (table["label"] == -1).all()


def test_glob_pool_and_bad_pool_paths(ray_session, digits, tmp_path):
    pool = read_pool(f"{digits.unlabeled}/3/*.png", "image", CLASSES)
    labels = pool.select_columns(["label"]).to_pandas()["label"]
    assert len(labels) > 100 and (labels == 3).all()
    with pytest.raises(DataError, match="matches no image files"):
        read_pool(f"{tmp_path}/*.png", "image", None)
    with pytest.raises(DataError, match="path does not exist"):
        read_pool(str(tmp_path / "missing"), "image", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        read_pool(str(tmp_path / "empty"), "image", None)


def test_evaluation_confusion_matrix_counts_every_test_image(ray_session, digits, model_dir):
    from selftrain.data.folders import index_class_folders

    test = index_class_folders(digits.test, CLASSES, "test")
    result = evaluate(test, model_dir, SCORING, 16, 10)
    assert result.count == 450 == result.confusion.sum()
    assert result.confusion.sum(axis=1).tolist() == np.bincount(test["label"], minlength=10).tolist()
    assert result.accuracy == pytest.approx(np.trace(result.confusion) / 450)
