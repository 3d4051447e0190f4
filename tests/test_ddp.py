"""Two Ray Train workers (DDP over gloo) running an online method end to end: the labeled
stream replicated, the pool split, equal step counts on both ranks (no hang), one model out;
an image of each stream that broke after it was checked is counted and named, not lost silently."""

from __future__ import annotations

import torch

from pathlib import Path

from selftrain.config import load_config
from selftrain.data.folders import load_labeled_sets
from selftrain.stages.pool_index import index_pool
from selftrain.stages.train import train_model, training_streams
from selftrain.training.loop import load_model

from conftest import REPO, copy_tree


def test_flexmatch_on_two_gloo_workers_runs_every_step_and_saves_one_model(ray_session, digits, tmp_path):
    epochs, steps = 2, 6
    cfg = load_config(str(REPO / "pipelines" / "fixmatch.yaml"), [
        "teacher.method=flexmatch", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.data_cpus_per_task=0.25", f"train.teacher_epochs={epochs}", f"train.steps_per_epoch={steps}",
        "train.batch_size=8", "teacher.mu=2", f"output_dir={tmp_path}"])
    labeled, unlabeled = copy_tree(digits.labeled, tmp_path / "labeled"), copy_tree(digits.unlabeled, tmp_path / "pool")
    sets = load_labeled_sets(str(labeled), digits.test, cfg.data.image_size)
    pool = index_pool(str(unlabeled), "image", sets.classes, cfg.data.image_size, tmp_path / "pool_index", 0)
    # One file of each stream breaks after it was checked (changed on shared storage since).
    broken = [sets.labeled["path"][7], str(unlabeled / "3" / sorted(p.name for p in (unlabeled / "3").iterdir())[0])]
    for path in broken:
        Path(path).write_bytes(b"broken after it was checked")
    streams = training_streams(cfg, cfg.teacher, sets.labeled, len(sets.classes), None, pool)
    assert not streams.split_train  # 50 labeled images: every rank reads them all
    spec = {"num_classes": 10, "classes": sets.classes, "image_size": cfg.data.image_size}
    trained = train_model(cfg, "ddp", "cnn_tiny", streams, spec, student=False, out_dir=tmp_path / "iter0", seed=0)

    assert [h["epoch"] for h in trained.history] == [1, 2]
    assert all(h["train/steps"] == steps for h in trained.history)
    # Both ranks' images count: B labeled + μB weak per rank per step, summed over the 2 ranks.
    per_epoch = {h["train/images_per_s"] * h["train/epoch_seconds"] for h in trained.history}
    assert all(abs(n - 2 * steps * (8 + 2 * 8)) < 1e-3 * n for n in per_epoch)
    failed = trained.failed_images  # told by both ranks' data tasks, every pass: counted once each
    assert failed["count"] == 2 and failed["failures"] >= 2
    assert sorted(failed["named"], key=lambda r: r["path"]) == sorted(
        ({"path": p, "reason": "failed in training: not an image (unrecognised format)"} for p in broken),
        key=lambda r: r["path"])
    model, saved = load_model(trained.model_dir)
    assert saved["arch"] == "cnn_tiny"
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
