"""Train one model (teacher or student) with Ray Train, by the objective its `MethodConfig` names.

Decoding and augmentation run as Ray Data tasks on CPU and stream into the workers' shards
(`get_dataset_shard`), re-run every pass so each pass sees fresh RandAugment noise. Online
methods get a second stream: the unlabeled pool (its index, `stages/pool_index.py`) as weak and
strong views.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data
from ray.data.expressions import col
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from selftrain.config import MethodConfig, PipelineConfig
from selftrain.console import progress_board
from selftrain.data.listing import data_roots
from selftrain.data.parquet import read_parquet
from selftrain.errors import TrainingError
from selftrain.seeds import relative_key
from selftrain.stages.failed_images import failed_images_actor, failed_images_report
from selftrain.stages.features import CLASSIFIER_INIT_FILE, probed_classifier
from selftrain.stages.passes import stream_passes_actor
from selftrain.stages.rows import ProgressEpochs, keyed, pool_views, prepare_rows
from selftrain.stages.score import wants_gpu
from selftrain.training.loop import HISTORY_FILE, MODEL_FILE, SPEC_FILE, train_loop_per_worker


@dataclass(frozen=True)
class TrainedModel:
    model_dir: str
    history: list[dict[str, float]]
    # Images that failed to read or decode during training (`stages/failed_images.py`):
    # `count` distinct images, `failures` in all passes, the first ones `named` with their reason.
    failed_images: dict[str, Any] = field(default_factory=lambda: {"count": 0, "failures": 0, "named": []})


@dataclass(frozen=True)
class Streams:
    """What a model trains on: the supervised stream (`rows` rows), and for an online method the
    unlabeled pool's views (`pool_rows` images). A labeled-only stream is small by premise and
    every worker reads all of it (`split_train=False`); one with pseudo-labels is split."""

    train: ray.data.Dataset
    rows: int
    split_train: bool = True
    unlabeled: ray.data.Dataset | None = None
    pool_rows: int = 0
    failed_images: Any = None  # the `FailedImages` actor the streams' tasks report to
    passes: Any = None  # the `StreamPasses` actor that seeds the streams' augmentation
    labeled: pd.DataFrame | None = None  # the labeled images (`path`, `label`) in the stream


PASS_BATCHES = 64  # a small stream is repeated until one pass holds this many batches
VIEW_BATCH = 256  # pool images per view-making task: per-task overhead stays small beside the work


def _repeats(rows: int, batch_rows: int) -> int:
    """How often a stream of `rows` is repeated so one pass holds PASS_BATCHES batches.

    Each pass over a stream starts a new Ray Data execution (about a second of start-up here);
    a small stream (50 labeled images, the 1,300 digits of the pool) would pay it every few
    steps. The rows are repeated before decoding, so every repeat is augmented afresh."""
    return max(math.ceil(PASS_BATCHES * batch_rows / max(rows, 1)), 1)


def _repeated(rows: ray.data.Dataset, repeats: int) -> ray.data.Dataset:
    """`rows` (ids and targets only: small when repeated) `repeats` times over."""
    if repeats == 1:
        return rows
    once = rows.materialize()
    return once.union(*[once] * (repeats - 1))


def keyed_repeats(rows: ray.data.Dataset, repeats: int, cpus: float, root: str) -> ray.data.Dataset:
    """`_repeated`, each row with its `key` (path below `root`, and repeat): ids only,
    materialised once when repeated, so every pass reads the same blocks in the same order."""
    rows = ordered(rows)  # before materialising: its blocks in order too
    if repeats == 1:
        return rows.map_batches(keyed, fn_kwargs={"repeat": 0, "root": root}, num_cpus=cpus)
    once = rows.materialize()
    copies = [once.map_batches(keyed, fn_kwargs={"repeat": k, "root": root}, num_cpus=cpus) for k in range(repeats)]
    # The union that runs must keep the order itself (a materialized dataset does not carry its
    # source's `preserve_order`): otherwise the copies come in the order their tasks finish, the
    # same rows in the same places but with other repeat numbers in their keys, hence other seeds.
    return ordered(copies[0].union(*copies[1:])).materialize()


def ordered(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Rows in the same order on every run (Ray Data otherwise passes on whichever task ends
    first), for a dataset executed here (materialised). The training streams are executed by Ray
    Train, which applies its own ingest options instead: `_ingest_in_order`."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def unlabeled_views(cfg: PipelineConfig, method: MethodConfig, pool_index: dict[str, Any],
                    failed_images: Any = None, passes: Any = None) -> ray.data.Dataset:
    """The pool's weak and strong views, in the order of the index, which was shuffled once when
    it was written (no all-to-all shuffle per pass: a pool of millions stays streamed, and the
    training loop mixes rows across windows of batches)."""
    cpus = cfg.train.data_cpus_per_task
    repeats = _repeats(pool_index["rows"], method.mu * cfg.train.batch_size)
    readable = read_parquet(pool_index["dir"], num_cpus=cpus).filter(expr=col("index") >= 0)
    index = keyed_repeats(readable.select_columns(["path", "label", "index"]), repeats, cpus, data_roots(cfg.data).pool)
    return index.map_batches(pool_views, fn_kwargs={"size": cfg.data.image_size, "noise": cfg.noise,
                                                 "parquet_column": cfg.data.parquet_image_column,
                                                 "failed_images": failed_images, "passes": passes, "seed": cfg.seed},
                             batch_size=VIEW_BATCH, num_cpus=cpus)


def training_streams(cfg: PipelineConfig, method: MethodConfig, labeled: pd.DataFrame, num_classes: int,
                     pseudo: dict[str, Any] | None, pool_index: dict[str, Any] | None) -> Streams:
    """The streams `method` trains on. A student's supervised stream carries RandAugment (Noisy
    Student's input noise); a teacher's only the weak flip-and-shift."""
    rows = len(labeled) + (pseudo["rows"] if pseudo else 0)
    pseudo_dir = pseudo["dir"] if pseudo else None
    if method.online and (not pool_index or not pool_index["rows"]):
        raise TrainingError(f"method {method.method!r} learns from the unlabeled pool, but the pool has no readable image")
    failed, passes = failed_images_actor(), stream_passes_actor()
    # Epochs of fixed steps (or an online method's, paced by the pool) cycle the supervised
    # stream: a small one is repeated so each pass holds many batches. Epochs of one pass each
    # read the rows once.
    repeats = _repeats(rows, cfg.train.batch_size) if method.online or cfg.train.steps_per_epoch else 1
    train = training_dataset(cfg, labeled, num_classes, pseudo_dir, randaugment=bool(pseudo), repeats=repeats,
                             failed_images=failed, passes=passes)
    if not method.online:
        return Streams(train, rows * repeats, failed_images=failed, passes=passes, labeled=labeled)
    return Streams(train, rows * repeats, split_train=bool(pseudo),
                   unlabeled=unlabeled_views(cfg, method, pool_index, failed, passes), pool_rows=pool_index["rows"],
                   failed_images=failed, passes=passes, labeled=labeled)


def training_dataset(cfg: PipelineConfig, labeled: pd.DataFrame, num_classes: int,
                     pseudo_dir: str | None, randaugment: bool, repeats: int = 1,
                     failed_images: Any = None, passes: Any = None) -> ray.data.Dataset:
    """Labeled rows (one-hot targets) + pseudo-labeled rows (teacher targets), prepared lazily."""
    cpus = cfg.train.data_cpus_per_task  # every task, reads too: a 1-CPU read beside the
    # trainer on a small node never gets scheduled and training waits forever
    prepare = {"size": cfg.data.image_size, "noise": cfg.noise, "randaugment": randaugment,
               "parquet_column": cfg.data.parquet_image_column, "failed_images": failed_images,
               "passes": passes, "seed": cfg.seed}
    labeled = pd.concat([labeled] * repeats, ignore_index=True)
    one_hot = np.eye(num_classes, dtype=np.float32)[labeled["label"].to_numpy()]
    labeled_root, pool_root = data_roots(cfg.data)
    # Seeds each row's augmentation: the same wherever the data lies.
    keys = [f"labeled:{relative_key(path, labeled_root)}|{row}" for row, path in enumerate(labeled["path"])]
    labeled_rows = ray.data.from_pandas(pd.DataFrame({"path": labeled["path"], "key": keys, "target": list(one_hot)}))
    dataset = labeled_rows.map_batches(prepare_rows, fn_kwargs={**prepare, "target_column": "target"},
                                       batch_size=64, num_cpus=cpus)
    if pseudo_dir:
        pseudo = read_parquet(pseudo_dir, num_cpus=cpus).select_columns(["path", "soft_target"])
        dataset = dataset.union(keyed_repeats(pseudo, repeats, cpus, pool_root).map_batches(
            prepare_rows, fn_kwargs={**prepare, "target_column": "soft_target"}, batch_size=64, num_cpus=cpus))
    return dataset.randomize_block_order(seed=cfg.seed)


def image_list(images: pd.DataFrame, cfg: PipelineConfig) -> dict[str, Any]:
    """A few labeled images (`path`, `label`) as the loop decodes them itself, once per worker."""
    return {"paths": images["path"].tolist(), "labels": images["label"].tolist(),
            "parquet_column": cfg.data.parquet_image_column}


def default_max_failures(configured: int | None) -> int:
    """`train.max_failures` as set, else 3 on a multi-node cluster (nodes come and go: spot,
    preemption) and 0 on one machine (a failure there is a bug, shown at once)."""
    if configured is not None:
        return configured
    return 3 if sum(1 for n in ray.nodes() if n.get("Alive")) > 1 else 0


def _training_error(exc: TrainingFailedError) -> TrainingError | None:
    """Our own TrainingError raised in a worker, unwrapped for a one-line message."""
    text = str(exc)
    marker = "TrainingError: "
    if marker in text:
        return TrainingError(text.split(marker, 1)[1].splitlines()[0])
    return None


def _ingest_in_order() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options with the rows kept in order. Ray Train replaces each dataset's
    execution options with its defaults, which take `preserve_order` from the driver's global
    DataContext (off), not from the dataset: the pool's views then reached the loop in the
    order their tasks finished, the same rows with other repeats' augmentations."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def train_model(
    cfg: PipelineConfig, name: str, arch: str, streams: Streams,
    spec: dict[str, Any], student: bool, out_dir: Path, seed: int,
    validation: pd.DataFrame | None = None, callbacks: list[Any] | None = None, teacher_dir: str | None = None,
    placement_group_file: Path | None = None, init_backbone_dir: str | None = None, label: str | None = None,
) -> TrainedModel:
    """Fit `arch` by `cfg.students` (a student) or `cfg.teacher` and copy the final model to
    `out_dir/model`. Re-running resumes the same Ray Train run (same name and storage) from its
    last committed checkpoint.

    `validation` (`path`, `label`) adds `val/accuracy` to every epoch's report; `callbacks` are
    Ray Train `UserCallback`s (a sweep passes Tune's report callback and an MLflow logger);
    a student starts from `teacher_dir`'s weights when `train.student_init` is `teacher`, a
    teacher from `init_backbone_dir`'s backbone (a pretrained or saved model, `model.init`),
    with its new classifier fitted as a linear probe on the labeled images' features when
    `train.head_init` is `linear_probe`; `placement_group_file` collects the worker group's
    placement group id (see `sweep.py`)."""
    dropout = cfg.noise.dropout if student else cfg.train.teacher_dropout
    method = cfg.students if student else cfg.teacher
    head_file = None
    if init_backbone_dir and not student and cfg.train.head_init == "linear_probe":
        if streams.labeled is None:
            raise TrainingError("train.head_init=linear_probe needs the labeled images in the training streams")
        head_file = probed_classifier(init_backbone_dir, streams.labeled, cfg, spec["num_classes"],
                                      out_dir / CLASSIFIER_INIT_FILE)
    loop_config = {
        **spec, "arch": arch, "method": method.method, "knobs": method.knobs(), "online": method.online,
        "mu": method.mu, "max_empty_epochs": method.max_empty_epochs, "collapse_fraction": method.collapse_fraction,
        "rows": streams.rows, "split_train": streams.split_train, "pool_rows": streams.pool_rows,
        "steps_per_epoch": cfg.train.steps_per_epoch, "seed": seed,
        "init_model_dir": teacher_dir if student and cfg.train.student_init == "teacher" else None,
        "init_backbone_dir": init_backbone_dir if not student else None,
        "classifier_init_file": str(head_file) if head_file else None,
        "epochs": cfg.train.student_epochs if student else cfg.train.teacher_epochs,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
        "backbone_lr_scale": cfg.train.backbone_lr_scale if init_backbone_dir and not student else 1.0,
        "dropout": dropout, "stochastic_depth": cfg.noise.stochastic_depth if student else 0.0,
        "shuffle_buffer": cfg.train.shuffle_buffer, "amp": cfg.train.amp,
        "checkpoint_every": cfg.train.checkpoint_every,
        "torch_threads": cfg.train.torch_threads,
        "final_model_dir": str(out_dir / "model"),
        "placement_group_file": str(placement_group_file) if placement_group_file else None,
        "validation": None if validation is None else image_list(validation, cfg),
    }
    return fit(cfg, name, loop_config, streams, out_dir, callbacks, label)


def fit(cfg: PipelineConfig, name: str, loop_config: dict[str, Any], streams: Streams, out_dir: Path,
        callbacks: list[Any] | None = None, label: str | None = None) -> TrainedModel:
    """Run `train_loop_per_worker` with `loop_config` on `streams` in a Ray Train run named
    `name` (re-running resumes it), and copy the final model to `out_dir/model`. Under the CLI
    each epoch shows as progress of the task `label` (default: `name` and the architecture)."""
    use_gpu = wants_gpu(cfg.train.use_gpu)
    board = progress_board()
    if board is not None:
        task = label or f"{name} {loop_config['arch']}"
        callbacks = [*(callbacks or []), ProgressEpochs(board, task, int(loop_config["epochs"]))]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "stream_passes": streams.passes},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str((out_dir.parent / "ray_train").resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=default_max_failures(cfg.train.max_failures)),
                             callbacks=callbacks or []),
        datasets={"train": streams.train, **({"unlabeled": streams.unlabeled} if streams.unlabeled else {})},
        dataset_config=DataConfig(datasets_to_split=["unlabeled", *(["train"] if streams.split_train else [])],
                                  execution_options=_ingest_in_order()),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise (_training_error(exc) or exc) from None
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as checkpoint:
        for file in (MODEL_FILE, SPEC_FILE, HISTORY_FILE):
            shutil.copy2(Path(checkpoint) / file, model_dir / file)
    return TrainedModel(str(model_dir), json.loads((model_dir / HISTORY_FILE).read_text()),
                        failed_images_report(streams.failed_images))
