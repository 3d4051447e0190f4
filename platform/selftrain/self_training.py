"""The outer loop: Noisy Student self-training (Xie et al. 2020, Algorithm 1), iterated.

    [backbone <- pretrain(pool), self-supervised]      (optional: `pretrain:`)
    teacher <- train(labeled)                           (from the backbone: `model.init`)
    repeat `iterations` times:
        scores  <- teacher scores the unlabeled pool (un-noised)
        pseudo  <- threshold / balance / soften the scores
        student <- train a noised, equal-or-larger model on labeled + pseudo
        teacher <- student

Every step is recorded in the ledger (`state.json`) so a re-run resumes where it stopped, and
in MLflow: one parent run per pipeline, one child run per trained model, each model an MLflow
model and the final one registered (`stages/publish.py`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from selftrain import plots
from selftrain.config import PRETRAIN_KNOBS, MethodConfig, PipelineConfig
from selftrain.console import LOGGER, end_task, progress_task
from selftrain.data.builtin import DataPaths, materialize_builtin
from selftrain.data.folders import LabeledSets, load_labeled_sets
from selftrain.data.listing import data_roots
from selftrain.data.pool import read_pool
from selftrain.errors import ConfigError
from selftrain.evaluation.test_predictions import CONFUSION_FILE, PREDICTIONS_FILE, evaluation_dir
from selftrain.fsio import OutputLock, atomic_write_json
from selftrain.ledger import Ledger
from selftrain.methods import METHODS, check_knobs
from selftrain.models.registry import check_student_sizes
from selftrain.stages.evaluate import evaluate
from selftrain.pretraining import PRETRAIN_METHODS, check_pretrain_knobs
from selftrain.stages.pretrain import pretrain_model
from selftrain.stages.protocols import frozen_protocols
from selftrain.stages.pseudo_label import select_pseudo_labels, stats_metrics, stats_record
from selftrain.stages.publish import (log_trained_model, pipeline_datasets, pretrain_datasets, register_final,
                                      stage_datasets)
from selftrain.stages.score import score_pool
from selftrain.stages.pool_index import index_pool
from selftrain.stages.rows import MlflowEpochs
from selftrain.stages.train import train_model, training_streams
from selftrain.masking import redact, redact_tree
from selftrain.tracking import Tracker
from selftrain.training.loop import SPEC_FILE

T = TypeVar("T")


@dataclass
class Run:
    cfg: PipelineConfig
    out: Path
    ledger: Ledger
    tracker: Tracker
    parent_id: str
    paths: DataPaths
    sets: LabeledSets
    say: Callable[[str], None]
    open_runs: list[str] = field(default_factory=list)

    def seed(self, iteration: int) -> int:
        return self.cfg.seed * 1000 + iteration


def run_pipeline(cfg: PipelineConfig, say: Callable[[str], None] = LOGGER.info, parent_id: str | None = None) -> dict[str, Any]:
    """The whole pipeline into `cfg.output_dir`; its MLflow run is a child of `parent_id` when
    given (`selftrain protocol`)."""
    check_method_knobs(cfg)
    out = Path(cfg.output_dir).expanduser().resolve()
    with OutputLock(out, "run"):
        return _run_locked(cfg, out, say, parent_id)


def _run_locked(cfg: PipelineConfig, out: Path, say: Callable[[str], None], parent_id: str | None) -> dict[str, Any]:
    ledger = Ledger(out, cfg)  # refuses a different config; writes nothing yet
    # The input is validated before the first record, so a typo fixed does not read as a new config.
    paths = data_paths(cfg)
    sets = load_labeled_sets(paths.labeled, paths.test, cfg.data.image_size)
    check_student_sizes(cfg.model.teacher, cfg.model.students, len(sets.classes))
    if cfg.teacher_init not in ("none", "pretrain"):
        check_init_dir(cfg)
    tracker, parent_id = open_tracking(cfg.name, out, ledger, say, {"selftrain.role": "pipeline"}, parent_id)
    open_runs = [parent_id]

    def timed(stage: str, done_key: str, compute: Callable[[], T]) -> T:
        """`compute()`; the wall time of the attempt that completes a stage is recorded in the
        ledger beside its result, so a resumed run reports the same seconds for stages it skipped."""
        if ledger.get(done_key):
            return compute()
        start = time.monotonic()
        result = compute()
        ledger.put(f"seconds/{stage}", round(time.monotonic() - start, 1))
        return result

    with tracker.terminating(open_runs):
        tracker.log_params(parent_id, cfg.model_dump())
        run = Run(cfg, out, ledger, tracker, parent_id, paths, sets, say, open_runs)
        say(f"{len(sets.classes)} classes, {len(sets.labeled)} labeled, {len(sets.test)} test images; "
            f"pool: {paths.unlabeled}")

        backbone = timed("pretrain", "pretrain/result", lambda: pretrain_stage(run)) if cfg.pretrain else None
        teacher = timed("teacher", "iter0/result", lambda: train_stage(
            run, iteration=0, arch=cfg.model.teacher, pseudo=None, init_backbone_dir=teacher_init_dir(cfg, backbone)))
        baseline = (timed("baseline", "baseline/result", lambda: baseline_stage(run))
                    if cfg.baseline and (cfg.teacher.online or cfg.teacher_init != "none") else None)
        results = [teacher]
        for iteration in range(1, cfg.iterations + 1):
            it = f"iter{iteration}"
            scores = timed(f"{it}/scoring", f"{it}/scores", lambda: score_stage(run, iteration, teacher))
            pseudo = timed(f"{it}/pseudo_labels", f"{it}/pseudo_labels",
                           lambda: pseudo_label_stage(run, iteration, teacher, scores))
            student = timed(f"{it}/student", f"{it}/result", lambda: train_stage(
                run, iteration, cfg.model.student(iteration), pseudo, teacher["model_dir"]))
            results.append(student)
            teacher = student

        registered = register_final(run, results[-1])
        stage_seconds = {k.split("/", 1)[1]: v for k, v in ledger.state["records"].items() if k.startswith("seconds/")}
        datasets = pipeline_datasets(run)
        tracker.log_datasets(parent_id, datasets)
        summary = _summarize(run, results, baseline, stage_seconds, backbone, datasets, registered)
        tracker.log_metrics(parent_id, {"eval/final_accuracy": summary["final_test_accuracy"],
                                        "eval/teacher_accuracy": results[0]["test_accuracy"],
                                        **({"eval/baseline_accuracy": baseline["test_accuracy"]} if baseline else {})})
        tracker.log_figure(parent_id, plots.accuracy_per_iteration(
            [r["test_accuracy"] for r in results], [r["model"] for r in results],
            baseline["test_accuracy"] if baseline else None), "accuracy_per_iteration.png")
        tracker.log_json(parent_id, cfg.model_dump(), "config.json")
        tracker.log_artifact(parent_id, out / "summary.json")
        tracker.finish(parent_id)
    outage = tracker.outage()
    if outage:  # the results on disk are complete; say what the MLflow record lacks
        summary["tracking_errors"] = [outage]
        _write_summary(out, summary)
        say(outage["message"])
    return summary


def open_tracking(experiment: str, out: Path, ledger: Ledger, say: Callable[[str], None],
                  tags: dict[str, str], parent_id: str | None = None) -> tuple[Tracker, str]:
    """The MLflow parent run of `out`: created once, re-opened on resume, never in another store."""
    tracker = Tracker(experiment)
    recorded_uri = ledger.get("tracking_uri")
    if recorded_uri and redact(recorded_uri) != tracker.display_uri:  # compared masked: never stored clear
        raise ConfigError(
            f"{out} was tracked in MLflow store {redact(recorded_uri)}, but this run would use "
            f"{tracker.display_uri}; resume from the same directory or set MLFLOW_TRACKING_URI to the recorded store"
        )
    ledger.put("tracking_uri", tracker.display_uri)
    run_id = ledger.get("mlflow_run_id")
    if run_id:
        say(f"resuming {out} (MLflow run {run_id})")
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(out.name, parent_id, tags={"selftrain.output_dir": str(out), **tags})
        ledger.put("mlflow_run_id", run_id)
    return tracker, run_id


def data_paths(cfg: PipelineConfig) -> DataPaths:
    data = cfg.data
    if data.builtin:
        return materialize_builtin(data.builtin, data.cache_dir, data.labels_per_class, cfg.seed)
    return DataPaths(data.labeled, data.unlabeled, data.test, data.unlabeled_has_class_folders)


def fresh_dir(directory: Path) -> Path:
    """An empty directory: clears what an interrupted attempt at this stage left behind."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def score_stage(run: Run, iteration: int, teacher: dict[str, Any]) -> str:
    def compute() -> str:
        run.say(f"[iteration {iteration}] teacher {teacher['model']} scores the pool")
        classes = run.sets.classes if run.paths.pool_has_class_folders else None
        pool = read_pool(run.paths.unlabeled, run.cfg.data.parquet_image_column, classes)
        progress = progress_task(f"[iteration {iteration}] scoring the pool")
        try:
            return score_pool(pool, teacher["model_dir"], run.cfg.scoring, run.cfg.data.image_size,
                              fresh_dir(run.out / f"iter{iteration}" / "scoring"),
                              pool_name=f"data.unlabeled={run.paths.unlabeled}", progress=progress)
        finally:
            end_task(progress)

    return run.ledger.stage(f"iter{iteration}/scores", compute)


def pseudo_label_stage(run: Run, iteration: int, teacher: dict[str, Any], scores: str) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        cfg = run.cfg.pseudo_label
        meta = {"teacher_id": teacher["mlflow_run_id"], "teacher_model": teacher["model"],
                "iteration": iteration, "threshold": cfg.threshold, "temperature": cfg.temperature,
                "tta": run.cfg.scoring.tta}
        progress = progress_task(f"[iteration {iteration}] pseudo-labelling")
        try:
            directory, stats, rows = select_pseudo_labels(
                scores, cfg, run.sets.classes, fresh_dir(run.out / f"iter{iteration}" / "labels"),
                run.seed(iteration), meta, progress, pool_root=data_roots(run.cfg.data).pool)
        finally:
            end_task(progress)
        run.say(f"[iteration {iteration}] kept {stats.kept}/{stats.scored} pool images at "
                f"τ={cfg.threshold} ({rows} rows after balancing, {stats.rejected_count} unreadable"
                + (f", {stats.non_finite_count} with NaN or infinite teacher logits, not pseudo-labelled, e.g. "
                   f"{stats.non_finite[0]['path']}" if stats.non_finite_count else "") + ")")
        return {"dir": directory, "rows": rows, "kept": stats.kept, "rejected": stats.rejected,
                "rejected_count": stats.rejected_count, "non_finite": stats.non_finite,
                "non_finite_count": stats.non_finite_count,
                "metrics": stats_metrics(stats, rows, run.sets.classes), "stats": stats_record(stats)}

    return run.ledger.stage(f"iter{iteration}/pseudo_labels", compute)


def pool_index_stage(run: Run) -> dict[str, Any]:
    """The pool numbered once, for the online methods that read it every step."""
    def compute() -> dict[str, Any]:
        run.say(f"indexing the unlabeled pool {run.paths.unlabeled} for online training")
        classes = run.sets.classes if run.paths.pool_has_class_folders else None
        record = index_pool(run.paths.unlabeled, run.cfg.data.parquet_image_column, classes,
                            run.cfg.data.image_size, fresh_dir(run.out / "pool_index"), run.cfg.seed)
        run.say(f"{record['rows']} pool images indexed, {record['rejected_count']} unreadable")
        return record

    return run.ledger.stage("pool_index", compute)


def check_method_knobs(cfg: PipelineConfig, swept: list[str] = ()) -> None:
    """Before any compute: every knob set (or swept) for a role is one its method reads."""
    if cfg.pretrain and "pretrain.method" not in swept:
        check_pretrain_knobs(cfg.pretrain.method, [*cfg.pretrain.knobs(), *(
            k.split(".", 1)[1] for k in swept if k.startswith("pretrain.") and k.split(".", 1)[1] in PRETRAIN_KNOBS)])
    for role in ("teacher", "students"):
        method = getattr(cfg, role)
        if f"{role}.method" not in swept:
            knobs = [*method.knobs(), *(k.split(".", 1)[1] for k in swept if k.startswith(f"{role}."))]
            check_knobs(role, method.method, knobs)


def method_params(method: Any) -> dict[str, Any]:
    """The method's name and every knob as it will run: the config's, else the paper default."""
    return {"method": method.method, "mu": method.mu,
            **{f"method.{k}": v for k, v in {**METHODS[method.method].defaults, **method.knobs()}.items()}}


def child_run(run: Run, key: str, name: str, iteration: int, role: str) -> str:
    """The MLflow child run of stage `key`: created once, re-opened on resume."""
    child = run.ledger.get(f"{key}/mlflow_run_id")
    if child:
        run.open_runs.append(child)
        run.tracker.reopen(child)
        return child
    child = run.tracker.start_run(name, parent_id=run.parent_id,
                                  tags={"selftrain.iteration": str(iteration), "selftrain.role": role})
    run.open_runs.append(child)
    run.ledger.put(f"{key}/mlflow_run_id", child)
    return child


def teacher_init_dir(cfg: PipelineConfig, backbone: dict[str, Any] | None) -> str | None:
    """The model directory whose backbone the teacher starts from (`model.init`), or None."""
    init = cfg.teacher_init
    if init == "none":
        return None
    return backbone["model_dir"] if init == "pretrain" else check_init_dir(cfg)


def check_init_dir(cfg: PipelineConfig) -> str:
    """`model.init` as a saved model directory: it exists, holds a model of the teacher's architecture."""
    directory = Path(cfg.model.init).expanduser().resolve()
    spec_file = directory / SPEC_FILE
    if not spec_file.is_file():
        raise ConfigError(f"model.init={cfg.model.init}: no saved model there (no {SPEC_FILE}); give pretrain, "
                          "none, or a model folder such as <output_dir>/pretrain/model")
    arch = json.loads(spec_file.read_text())["arch"]
    if arch != cfg.model.teacher:
        raise ConfigError(f"model.init={cfg.model.init} holds a {arch} backbone, but model.teacher is "
                          f"{cfg.model.teacher}: the architectures must match")
    return str(directory)


def pretrain_stage(run: Run) -> dict[str, Any]:
    """Self-supervised pretraining of the teacher's backbone on the pool; recorded with the kNN
    and linear-probe accuracy of its frozen features (labeled -> test)."""
    if run.ledger.get("pretrain/result"):
        return run.ledger.get("pretrain/result")
    cfg, classes, pretrain, arch = run.cfg, run.sets.classes, run.cfg.pretrain, run.cfg.model.teacher
    child = child_run(run, "pretrain", f"pretrain-{pretrain.method}-{arch}", 0, "pretrain")
    pool = pool_index_stage(run)
    knobs = {**PRETRAIN_METHODS[pretrain.method].defaults, **pretrain.knobs()}
    run.tracker.log_datasets(child, pretrain_datasets(run))  # the pool it learns from; labeled -> test probes
    run.tracker.log_params(child, {"role": "pretrain", "arch": arch, "pool_rows": pool["rows"],
                                   **{f"pretrain.{k}": v for k, v in pretrain.model_dump().items() if v is not None},
                                   **{f"method.{k}": v for k, v in knobs.items()}})
    run.say(f"[pretrain] {pretrain.method} on {pool['rows']} pool images: {arch} backbone, "
            f"{pretrain.epochs} epochs, kNN accuracy on the test images each epoch")
    spec = {"num_classes": len(classes), "classes": classes, "image_size": cfg.data.image_size}
    trained = pretrain_model(cfg, arch, pool, run.sets.labeled, run.sets.test, spec, run.out / "pretrain",
                             run.seed(0), callbacks=[MlflowEpochs(run.tracker.uri, run.tracker.experiment_id, child)])
    for epoch in trained.history:
        run.tracker.log_metrics(child, {k: v for k, v in epoch.items() if k != "epoch"}, step=epoch["epoch"])
    protocols = {name: result["accuracy"] for name, result in frozen_protocols(
        trained.model_dir, run.sets.labeled, run.sets.test, cfg, len(classes), ("knn", "linear"),
        pretrain.knn_k, pretrain.knn_temperature).items()}
    run.say(f"[pretrain] {pretrain.method} backbone: kNN accuracy {protocols['knn']:.4f}, "
            f"linear probe {protocols['linear']:.4f} (labeled -> test)")
    run.tracker.log_metrics(child, {"eval/knn_accuracy": protocols["knn"], "eval/linear_accuracy": protocols["linear"]})
    run.tracker.log_artifact(child, trained.model_dir, "model")
    run.tracker.finish(child)
    record = {"role": "pretrain", "method": pretrain.method, "model": arch, "model_dir": trained.model_dir,
              "knn_accuracy": protocols["knn"], "linear_accuracy": protocols["linear"], "mlflow_run_id": child,
              "failed_images": _say_failed_images(run, "[pretrain]", trained.failed_images)}
    run.ledger.put("pretrain/result", record)
    return record


def train_stage(run: Run, iteration: int, arch: str, pseudo: dict[str, Any] | None,
                teacher_dir: str | None = None, role: str | None = None,
                init_backbone_dir: str | None = None) -> dict[str, Any]:
    """Train, evaluate and record one model; iteration 0 is the teacher on labeled data only,
    from `init_backbone_dir`'s backbone when given (role "baseline": the teacher's architecture,
    supervised, from random weights, on the labeled images alone)."""
    role = role or ("teacher" if iteration == 0 else "student")
    key = "baseline" if role == "baseline" else f"iter{iteration}"
    if run.ledger.get(f"{key}/result"):
        return run.ledger.get(f"{key}/result")
    child = child_run(run, key, f"{key}-{arch}" if role == "baseline" else f"{key}-{role}-{arch}", iteration, role)
    cfg, classes = run.cfg, run.sets.classes
    method = run.cfg.students if pseudo else run.cfg.teacher
    pool = pool_index_stage(run) if method.online else None
    run.tracker.log_params(child, {"role": role, "arch": arch, "iteration": iteration,
                                   "labeled_rows": len(run.sets.labeled),
                                   "pseudo_rows": pseudo["rows"] if pseudo else 0,
                                   "pool_rows": pool["rows"] if pool else 0, **method_params(method),
                                   **({"init": init_backbone_dir} if init_backbone_dir else {})})
    run.tracker.log_datasets(child, stage_datasets(run, iteration, pseudo, pool_read=pool is not None))
    if pseudo:
        run.tracker.log_metrics(child, pseudo["metrics"])
        stats, threshold = pseudo["stats"], cfg.pseudo_label.threshold
        run.tracker.log_figure(child, plots.confidence_histogram(
            stats["histogram_kept"], stats["histogram_dropped"], threshold,
            f"iteration {iteration}: teacher confidence over the pool"), "confidence_histogram.png")
        run.tracker.log_figure(child, plots.class_counts(
            stats["kept_per_class"], classes, f"iteration {iteration}: kept pseudo-labels per class"),
            "pseudo_label_counts.png")

    rows = len(run.sets.labeled) + (pseudo["rows"] if pseudo else 0)
    run.say(f"[iteration {iteration}] training {role} {arch} by {method.method} on {rows} images "
            f"({len(run.sets.labeled)} labeled + {rows - len(run.sets.labeled)} pseudo-labeled"
            + (f"; {pool['rows']} unlabeled pool images every pass)" if pool else ")"))
    streams = training_streams(cfg, method, run.sets.labeled, len(classes), pseudo, pool)
    spec = {"num_classes": len(classes), "classes": classes, "image_size": cfg.data.image_size}
    # Each epoch's metrics reach MLflow when the epoch ends (live curves); the history is logged
    # again afterwards, which adds nothing twice (one value per key and step) and fills any gap a
    # restarted controller left.
    live = MlflowEpochs(run.tracker.uri, run.tracker.experiment_id, child) if child else None
    trained = train_model(cfg, f"{key}-{role}", arch, streams, spec, student=pseudo is not None,
                          out_dir=run.out / key, seed=run.seed(iteration), teacher_dir=teacher_dir,
                          callbacks=[live] if live else None, init_backbone_dir=init_backbone_dir,
                          label=f"[iteration {iteration}] {role} {arch}")
    for epoch in trained.history:
        run.tracker.log_metrics(child, {k: v for k, v in epoch.items() if k != "epoch"}, step=epoch["epoch"])
    failed = _say_failed_images(run, f"[iteration {iteration}] {role}", trained.failed_images)
    run.tracker.log_metrics(child, {"train/failed_images": failed["count"]})

    evaluation = evaluation_dir(run.out, key)
    result = evaluate(run.sets.test, trained.model_dir, cfg.scoring, cfg.data.image_size, len(classes),
                      out_dir=evaluation, classes=classes)
    run.say(f"[iteration {iteration}] {role} {arch}: test accuracy {result.accuracy:.4f}")
    run.tracker.log_metrics(child, {"eval/accuracy": result.accuracy, "eval/test_images": result.count})
    run.tracker.log_artifact(child, evaluation / CONFUSION_FILE)
    run.tracker.log_figure(child, plots.confusion_matrix(
        result.confusion, classes, f"{role} {arch}: test accuracy {result.accuracy:.3f}"), "confusion_matrix.png")
    run.tracker.log_json(child, cfg.model_dump(), "config.json")
    model_id = log_trained_model(run, child, trained.model_dir)  # runs:/<child>/model
    run.tracker.finish(child)
    record = {"iteration": iteration, "role": role, "model": arch, "method": method.method,
              "test_accuracy": result.accuracy,
              "pseudo_labels_kept": pseudo["kept"] if pseudo else 0,
              "pseudo_label_accuracy": pseudo["metrics"].get("pseudo/accuracy") if pseudo else None,
              "train_rows": rows, "mlflow_run_id": child, "mlflow_model_id": model_id, "model_dir": trained.model_dir,
              "test_predictions": str(evaluation / PREDICTIONS_FILE),
              "pseudo_labels": pseudo["dir"] if pseudo else None, "failed_images": failed}
    run.ledger.put(f"{key}/result", record)
    return record


def _say_failed_images(run: Run, stage: str, failed: dict[str, Any]) -> dict[str, Any]:
    """Images that failed to read or decode while a model trained (`stages/failed_images.py`):
    said, and kept in the stage's record for the summary."""
    if failed["count"]:
        run.say(f"{stage}: {failed['count']} images failed to read or decode during training and were "
                f"left out, e.g. {failed['named'][0]['path']} ({failed['named'][0]['reason']})")
    return failed


def baseline_stage(run: Run) -> dict[str, Any]:
    """The teacher's architecture and budget, supervised from random weights on the labeled
    images alone: what the pool adds (online learning, pretraining) is the teacher's (and the
    students') accuracy over this one."""
    cfg = run.cfg.model_copy(update={"teacher": MethodConfig(method="supervised")})
    return train_stage(replace(run, cfg=cfg), iteration=0, arch=cfg.model.teacher, pseudo=None, role="baseline")


def _summarize(run: Run, results: list[dict[str, Any]], baseline: dict[str, Any] | None = None,
               stage_seconds: dict[str, float] | None = None, backbone: dict[str, Any] | None = None,
               datasets: list[Any] = (), registered: dict[str, Any] | None = None) -> dict[str, Any]:
    rejected = {r["path"]: r["reason"] for r in run.sets.rejected.to_dict("records")}
    pool_rejected = 0  # every pass scores the same pool; the lists name the first 1,000 only
    records = [run.ledger.get(f"iter{i}/pseudo_labels") for i in range(1, run.cfg.iterations + 1)]
    for record in [*records, *([run.ledger.get("pool_index")] if run.ledger.get("pool_index") else [])]:
        pool_rejected = max(pool_rejected, record.get("rejected_count", len(record["rejected"])))
        for r in record["rejected"]:
            rejected[r["path"]] = r["reason"]
    # Images that failed in training (changed or vanished since they were checked), per model.
    trained = [r for r in [*results, baseline, backbone] if r]
    failed_in_training = sum(r.get("failed_images", {}).get("count", 0) for r in trained)
    for record in trained:
        for r in record.get("failed_images", {}).get("named", []):
            rejected.setdefault(r["path"], r["reason"])
    non_finite = [{"iteration": i, "count": r["non_finite_count"], "named": r["non_finite"]}
                  for i, r in enumerate(records, start=1) if r and r.get("non_finite_count")]
    summary = {
        "mlflow_run_id": run.parent_id,
        "tracking_uri": run.tracker.display_uri,
        "experiment": run.cfg.name,
        "classes": run.sets.classes,
        "teacher_test_accuracy": results[0]["test_accuracy"],
        "final_test_accuracy": results[-1]["test_accuracy"],
        "baseline_test_accuracy": baseline["test_accuracy"] if baseline else None,
        "baseline": baseline,
        "pretrain": backbone,
        "stage_seconds": stage_seconds or {},
        "teacher_scoring_passes": run.cfg.iterations,
        "iterations": results,
        "registered_model": registered,
        "datasets": {d.name: {"rows": d.rows, "digest": d.digest, "source": d.source, **d.profile} for d in datasets},
        "rejected": [{"path": p, "reason": r} for p, r in sorted(rejected.items())],
        "tracking_errors": [run.tracker.outage()] if run.tracker.outage() else [],
        "rejected_count": len(run.sets.rejected) + pool_rejected,
        "failed_in_training": failed_in_training,
        "non_finite_logits": non_finite,
    }
    _write_summary(run.out, summary)
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / "summary.json", redact_tree(summary), indent=2)


def summary_table(summary: dict[str, Any]) -> str:
    """The models of a run, the labeled-only baseline first when there is one, then where the
    minutes went."""
    rows = ([{**summary["baseline"], "iteration": "-"}] if summary.get("baseline") else []) + summary["iterations"]
    table = pd.DataFrame(rows)[
        ["iteration", "role", "model", "method", "train_rows", "pseudo_labels_kept", "pseudo_label_accuracy", "test_accuracy"]]
    gain = summary["final_test_accuracy"] - summary["teacher_test_accuracy"]
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
             f"final student vs teacher: {gain * 100:+.1f} points of test accuracy"]
    if summary.get("baseline_test_accuracy") is not None:
        pool_gain = summary["final_test_accuracy"] - summary["baseline_test_accuracy"]
        lines[-1] += f"; vs supervised on the labeled images alone: {pool_gain * 100:+.1f} points"
    failed = summary.get("failed_in_training", 0)
    lines[-1] += (f" ({summary.get('rejected_count', len(summary['rejected']))} unreadable files skipped"
                  + (f", {failed} images failed in training" if failed else "")
                  + f"; MLflow run {summary['mlflow_run_id']})")
    if summary.get("registered_model"):
        registered = summary["registered_model"]
        lines.append(f"final model: {registered['uri']} (MLflow Model Registry; {registered['best_uri']} = "
                     f"version {registered['best_version']}, the highest test accuracy)")
    if summary.get("pretrain"):
        pretrain = summary["pretrain"]
        lines.append(f"pretrained backbone ({pretrain['method']}, {pretrain['model']}): kNN accuracy "
                     f"{pretrain['knn_accuracy']:.4f}, linear probe {pretrain['linear_accuracy']:.4f}")
    if summary.get("stage_seconds"):
        lines.append("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    return "\n".join(lines)
