"""Self-supervised pretraining of the teacher's backbone on the unlabeled pool (`pretrain:`).

The pool (its index, `stages/pool_index.py`) streams through Ray Data, which makes two
augmented views of every image in CPU tasks (`contrastive_transform`); Ray Train trains the
method's network (`pretraining/`) with the same loop, checkpoints and resume as every other
model. Each epoch reports `val/knn_accuracy`: a weighted kNN of the test images among the
labeled ones on the backbone's features (solo-learn's and lightly's monitor). The saved model is
the backbone in its classifier's format; the teacher starts from it (`model.init: pretrain`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import ray.data
from ray.data.expressions import col

from selftrain.config import PipelineConfig
from selftrain.data.listing import data_roots
from selftrain.data.parquet import read_parquet
from selftrain.errors import TrainingError
from selftrain.stages.failed_images import failed_images_actor
from selftrain.stages.passes import stream_passes_actor
from selftrain.stages.rows import contrastive_views
from selftrain.stages.train import VIEW_BATCH, Streams, TrainedModel, _repeats, fit, image_list, keyed_repeats


def pretrain_views(cfg: PipelineConfig, pool_index: dict[str, Any], failed_images: Any = None,
                   passes: Any = None) -> ray.data.Dataset:
    """The pool's two views per image, in the index's (once shuffled) order, streamed."""
    cpus, pretrain = cfg.train.data_cpus_per_task, cfg.pretrain
    readable = read_parquet(pool_index["dir"], num_cpus=cpus).filter(expr=col("index") >= 0)
    paths = keyed_repeats(readable.select_columns(["path"]), _repeats(pool_index["rows"], pretrain.batch_size), cpus,
                          data_roots(cfg.data).pool)
    return paths.map_batches(contrastive_views, fn_kwargs={
        "size": cfg.data.image_size, "noise": cfg.noise, "crop_scale_min": pretrain.crop_scale_min,
        "color_jitter": pretrain.color_jitter, "parquet_column": cfg.data.parquet_image_column,
        "failed_images": failed_images, "passes": passes, "seed": cfg.seed,
        "affine": {"rotation": pretrain.rotation, "shear": pretrain.shear, "translate": pretrain.translate},
    }, batch_size=VIEW_BATCH, num_cpus=cpus)


def knn_monitor(cfg: PipelineConfig, labeled: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    """What the loop's per-epoch kNN reads: the labeled images (the bank) and up to
    `pretrain.knn_queries` test images (a fixed sample, the same every epoch)."""
    queries = test if len(test) <= cfg.pretrain.knn_queries else test.sample(cfg.pretrain.knn_queries,
                                                                               random_state=cfg.seed)
    return {"bank": image_list(labeled, cfg), "queries": image_list(queries, cfg),
            "k": cfg.pretrain.knn_k, "temperature": cfg.pretrain.knn_temperature}


def pretrain_model(cfg: PipelineConfig, arch: str, pool_index: dict[str, Any], labeled: pd.DataFrame,
                   test: pd.DataFrame, spec: dict[str, Any], out_dir: Path, seed: int,
                   callbacks: list[Any] | None = None) -> TrainedModel:
    """Pretrain `arch`'s backbone by `cfg.pretrain.method`; the model lands in `out_dir/model`."""
    if not pool_index["rows"]:
        raise TrainingError("pretraining learns from the unlabeled pool, but the pool has no readable image")
    pretrain = cfg.pretrain
    rows = pool_index["rows"] * _repeats(pool_index["rows"], pretrain.batch_size)
    loop_config = {
        **spec, "arch": arch, "pretrain": True, "method": pretrain.method, "knobs": pretrain.knobs(),
        "online": False, "rows": rows, "split_train": True, "pool_rows": pool_index["rows"],
        "steps_per_epoch": pretrain.steps_per_epoch or max(pool_index["rows"] // (cfg.train.num_workers * pretrain.batch_size), 1),
        "seed": seed, "epochs": pretrain.epochs, "batch_size": pretrain.batch_size, "lr": pretrain.lr,
        "weight_decay": pretrain.weight_decay, "optimizer": pretrain.optimizer, "dropout": 0.0, "stochastic_depth": 0.0,
        "shuffle_buffer": 0, "amp": cfg.train.amp, "checkpoint_every": cfg.train.checkpoint_every,
        "torch_threads": cfg.train.torch_threads, "final_model_dir": str(out_dir / "model"),
        "knn": knn_monitor(cfg, labeled, test),
    }
    failed, passes = failed_images_actor(), stream_passes_actor()
    return fit(cfg, "pretrain", loop_config,
               Streams(pretrain_views(cfg, pool_index, failed, passes), rows, failed_images=failed, passes=passes),
               out_dir, callbacks, label=f"[pretrain] {pretrain.method} {arch}")
