"""Two Ray Train workers (DDP over gloo) running an online method end to end: the labeled
stream replicated, the pool split, equal step counts on both ranks (no hang), one model out."""

from __future__ import annotations

import torch

from selftrain.config import load_config
from selftrain.data.folders import load_labeled_sets
from selftrain.stages.pool_index import index_pool
from selftrain.stages.train import train_model, training_streams
from selftrain.training.loop import load_model

from conftest import REPO


def test_flexmatch_on_two_gloo_workers_runs_every_step_and_saves_one_model(ray_session, digits, tmp_path):
    epochs, steps = 2, 6
    cfg = load_config(str(REPO / "pipelines" / "fixmatch.yaml"), [
        "teacher.method=flexmatch", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.data_cpus_per_task=0.25", f"train.teacher_epochs={epochs}", f"train.steps_per_epoch={steps}",
        "train.batch_size=8", "teacher.mu=2", f"output_dir={tmp_path}"])
    sets = load_labeled_sets(digits.labeled, digits.test, cfg.data.image_size)
    pool = index_pool(digits.unlabeled, "image", sets.classes, cfg.data.image_size, tmp_path / "pool_index", 0)
    streams = training_streams(cfg, cfg.teacher, sets.labeled, len(sets.classes), None, pool)
    assert not streams.split_train  # 50 labeled images: every rank reads them all
    spec = {"num_classes": 10, "classes": sets.classes, "image_size": cfg.data.image_size}
    trained = train_model(cfg, "ddp", "cnn_tiny", streams, spec, student=False, out_dir=tmp_path / "iter0", seed=0)

    assert [h["epoch"] for h in trained.history] == [1, 2]
    assert all(h["train/steps"] == steps for h in trained.history)
    # Both ranks' images count: B labeled + μB weak per rank per step, summed over the 2 ranks.
    per_epoch = {h["train/images_per_s"] * h["train/epoch_seconds"] for h in trained.history}
    assert all(abs(n - 2 * steps * (8 + 2 * 8)) < 1e-3 * n for n in per_epoch)
    model, saved = load_model(trained.model_dir)
    assert saved["arch"] == "cnn_tiny"
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
