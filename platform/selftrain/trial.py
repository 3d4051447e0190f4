"""One sweep trial, run by Ray Tune in its own process: pseudo-label with this trial's knobs,
train the noised student(s), report validation accuracy every epoch.

The trial starts from the sweep's shared teacher and, when the sweep shares it, from the pool
that teacher scored once (`scores`): a τ/T/noise trial then costs one student training and no
teacher pass. Later iterations (the student becomes the teacher) and trials whose knobs change
the teacher itself must score the pool again; each pass is counted in `trial.json`.

Metrics reach Tune through Ray Train's `TuneReportCallback` (Train V2: a trial fits its own
trainer) and MLflow through `MlflowEpochs`, both per epoch, so ASHA can stop a losing trial and
its MLflow run still holds every epoch it trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from selftrain.config import PipelineConfig, with_params
from selftrain.data.builtin import DataPaths
from selftrain.data.listing import data_roots
from selftrain.data.pool import read_pool
from selftrain.fsio import atomic_write_json
from selftrain.models.registry import check_student_sizes
from selftrain.self_training import fresh_dir, teacher_init_dir
from selftrain.stages.pretrain import pretrain_model
from selftrain.stages.pseudo_label import select_pseudo_labels, stats_metrics
from selftrain.stages.score import score_pool
from selftrain.stages.rows import MlflowEpochs
from selftrain.stages.train import train_model, training_streams
from selftrain.tracking import Tracker

TRIAL_TAG = "selftrain.trial_id"
TRIAL_FILE = "trial.json"
# What MLflow did not take from a trial's process, or from its students' epoch logger: found by
# the sweep's summary (`sweep_results.tracking_errors`) under trials/<id>/.
OUTAGE_FILE = "tracking_errors.json"
PLACEMENT_GROUPS_FILE = "placement_groups.txt"  # Ray Train's, removed by the sweep when the trial ends


@dataclass
class Shared:
    """What every trial of a sweep starts from (sent once through the object store)."""

    config: dict[str, Any]  # the sweep's base PipelineConfig, dumped
    output_dir: str  # absolute: trials run in their own working directory
    tracking_uri: str
    parent_id: str
    paths: DataPaths
    classes: list[str]
    train: pd.DataFrame  # labeled images the models learn from (`path`, `label`)
    validation: pd.DataFrame  # labeled images held out for the objective
    teacher: dict[str, Any] | None  # `model`, `model_dir`: None when each trial needs its own
    scores: str | None  # the shared teacher's scores of the pool: None when not shared
    pool_index: dict[str, Any] | None = None  # the numbered pool, when an online method may read it
    backbone: dict[str, Any] | None = None  # the pretrained backbone (`model_dir`) every trial's teacher
    # starts from; None without `pretrain:` or when the search space changes the pretraining
    experiment_id: str | None = None  # the sweep's MLflow experiment (created by the driver)


def run_trial(params: dict[str, Any], shared: Shared) -> None:
    trial_id = tune.get_context().get_trial_id()
    cfg = with_params(PipelineConfig.model_validate(shared.config), params, source=f"trial {trial_id}")
    out = Path(shared.output_dir) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.name, shared.tracking_uri, experiment_id=shared.experiment_id)
    label = " ".join(f"{key}={value}" for key, value in params.items())
    run_id = tracker.find_or_start_run(f"trial-{trial_id}", shared.parent_id, TRIAL_TAG, trial_id,
                                       tags={"selftrain.role": "trial", "selftrain.trial_params": label})
    try:
        with tracker.terminating([run_id]):
            tracker.log_params(run_id, cfg.model_dump())
            _Trial(cfg, shared, out, tracker, run_id).run()
            tracker.finish(run_id)
    finally:
        outage = tracker.outage()
        if outage:  # for the sweep's summary (`sweep_results.tracking_errors`)
            atomic_write_json(out / OUTAGE_FILE, {**outage, "where": f"trial {trial_id}"})


@dataclass
class _Trial:
    cfg: PipelineConfig
    shared: Shared
    out: Path
    tracker: Tracker
    run_id: str

    def run(self) -> None:
        cfg, shared = self.cfg, self.shared
        check_student_sizes(cfg.model.teacher, cfg.model.students, len(shared.classes))
        record = {"teacher_scoring_passes": 0, "model_dir": None, "epochs": 0}
        teacher = shared.teacher or self._own_teacher(record)
        for iteration in range(1, cfg.iterations + 1):
            scores = shared.scores if iteration == 1 and shared.teacher and shared.scores else None
            if scores is None:
                scores = self._score(teacher, iteration)
                record["teacher_scoring_passes"] += 1
                self._save(record)
            arch, epochs_before = cfg.model.student(iteration), record["epochs"]
            # Recorded before training: the loop writes the model there before its last report,
            # and Tune may end this process at that report (ASHA stops a trial at max_t).
            record.update(model_dir=str(self.out / f"iter{iteration}" / "model"),
                          epochs=epochs_before + cfg.train.student_epochs)
            self._save(record)
            teacher = {"model": arch, "model_dir": self._student(iteration, arch, scores, epochs_before,
                                                                 teacher["model_dir"])}

    def _save(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.out / TRIAL_FILE, record)  # the sweep's collection reads it whole

    def _own_teacher(self, record: dict[str, Any]) -> dict[str, Any]:
        """This trial's knobs change the teacher: train one on the same labeled split (from the
        shared pretrained backbone, or from one this trial pretrains when it sweeps `pretrain.*`;
        its kNN monitor classifies the validation images, never the test set)."""
        cfg, shared = self.cfg, self.shared
        backbone = shared.backbone
        if cfg.pretrain and backbone is None:
            backbone = {"model_dir": pretrain_model(cfg, cfg.model.teacher, shared.pool_index, shared.train,
                                                    shared.validation, self._spec(), self.out / "pretrain",
                                                    seed=cfg.seed * 1000).model_dir}
        streams = training_streams(cfg, cfg.teacher, shared.train, len(shared.classes), None, shared.pool_index)
        trained = train_model(cfg, "teacher", cfg.model.teacher, streams, self._spec(),
                              placement_group_file=self.out / PLACEMENT_GROUPS_FILE,
                              student=False, out_dir=self.out / "iter0", seed=cfg.seed * 1000,
                              init_backbone_dir=teacher_init_dir(cfg, backbone))
        return {"model": cfg.model.teacher, "model_dir": trained.model_dir}

    def _score(self, teacher: dict[str, Any], iteration: int) -> str:
        cfg, paths = self.cfg, self.shared.paths
        classes = self.shared.classes if paths.pool_has_class_folders else None
        pool = read_pool(paths.unlabeled, cfg.data.parquet_image_column, classes)
        return score_pool(pool, teacher["model_dir"], cfg.scoring, cfg.data.image_size,
                          fresh_dir(self.out / f"iter{iteration}" / "scoring"),
                          pool_name=f"data.unlabeled={paths.unlabeled}")

    def _student(self, iteration: int, arch: str, scores: str, epochs_before: int, teacher_dir: str) -> str:
        cfg, shared = self.cfg, self.shared
        seed = cfg.seed * 1000 + iteration
        meta = {"teacher_model": arch, "iteration": iteration, "threshold": cfg.pseudo_label.threshold,
                "temperature": cfg.pseudo_label.temperature, "tta": cfg.scoring.tta}
        labels, stats, rows = _outside_trial_bundle(
            partial(select_pseudo_labels, pool_root=data_roots(cfg.data).pool), scores, cfg.pseudo_label, shared.classes,
            fresh_dir(self.out / f"iter{iteration}" / "labels"), seed, meta)
        self.tracker.log_metrics(self.run_id, stats_metrics(stats, rows, shared.classes), step=iteration)
        streams = training_streams(cfg, cfg.students, shared.train, len(shared.classes),
                                   {"dir": labels, "rows": rows}, shared.pool_index)
        logger = MlflowEpochs(shared.tracking_uri, shared.experiment_id, self.run_id, step_offset=epochs_before,
                              outage_file=str(self.out / f"iter{iteration}" / OUTAGE_FILE))
        trained = train_model(cfg, f"iter{iteration}-student", arch, streams, self._spec(), student=True, out_dir=self.out / f"iter{iteration}", seed=seed,
                              validation=shared.validation, callbacks=[TuneReportCallback(), logger],
                              teacher_dir=teacher_dir, placement_group_file=self.out / PLACEMENT_GROUPS_FILE)
        return trained.model_dir

    def _spec(self) -> dict[str, Any]:
        return {"num_classes": len(self.shared.classes), "classes": self.shared.classes,
                "image_size": self.cfg.data.image_size}


@ray.remote(num_cpus=0)
def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _outside_trial_bundle(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` in a task outside the trial's placement group. Tune captures a trial's child tasks
    in its bundle, which holds no CPU (the trainer reserves its own): Ray Data's map tasks escape
    it by their own scheduling strategy, but any task that does not would wait there forever
    (the groupby shuffle of an earlier balancing did)."""
    return ray.get(_call.options(scheduling_strategy="DEFAULT").remote(fn, *args))


def read_trial_record(output_dir: Path, trial_id: str) -> dict[str, Any]:
    path = output_dir / "trials" / trial_id / TRIAL_FILE
    return json.loads(path.read_text()) if path.exists() else {"teacher_scoring_passes": 0, "model_dir": None}
