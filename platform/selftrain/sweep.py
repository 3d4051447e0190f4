"""Ray Tune sweeps over the knobs that decide whether self-training helps: τ, T, noise, ….

    split labeled -> train + validation (the objective; the test set never chooses)
    teacher <- train(train split)                       once, shared by every trial
    scores  <- teacher scores the pool                  once, shared (unless the sweep is naive)
    Tune: each trial pseudo-labels `scores` with its knobs and trains its student(s),
          reporting validation accuracy every epoch (ASHA stops losers early)
    best trial -> test accuracy, best_config.yaml (runnable with `selftrain run`), summary.json

Trials whose knobs change the teacher itself (its architecture, epochs, the data, …) train and
score with their own teacher. MLflow: one parent run per sweep, the shared teacher and one run
per trial as its children. The ledger (`state.json`) and Tune's own experiment state make a
crashed sweep resumable with `--resume`; a changed search space is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from selftrain import plots
from selftrain.config import PipelineConfig, SweepConfig, with_params
from selftrain.console import LOGGER
from selftrain.data.folders import load_labeled_sets
from selftrain.errors import ConfigError, SweepError
from selftrain.fsio import OutputLock, atomic_write_json, atomic_write_text
from selftrain.ledger import Ledger
from selftrain.masking import redact_tree
from selftrain.self_training import (Run, check_method_knobs, data_paths, open_tracking, pool_index_stage,
                                     pretrain_stage, score_stage, teacher_init_dir, train_stage)
from selftrain.stages.evaluate import evaluate
from selftrain.sweep_results import OBJECTIVE, collect_trials, split_validation, tracking_errors
from selftrain.trial import PLACEMENT_GROUPS_FILE, Shared, run_trial

# Keys whose value shapes the shared teacher or the pool it scores: sweeping one of them gives
# every trial its own teacher (and teacher pass). Everything else varies only the student side.
TEACHER_KEYS = ("data.", "seed", "model.teacher", "model.init", "teacher.", "train.teacher_epochs",
                "train.teacher_dropout", "train.lr", "train.batch_size", "train.weight_decay", "noise.horizontal_flip",
                "scoring.", "pretrain.")
# Keys that change the pretrained backbone: sweeping one makes every trial pretrain its own.
PRETRAIN_KEYS = ("data.", "seed", "model.teacher", "noise.horizontal_flip", "pretrain.")


TRIAL_MEMORY = 256 * 1024**2  # bytes reserved per trial process (Ray's `memory` resource)


def changes_teacher(key: str, keys: tuple[str, ...] = TEACHER_KEYS) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def run_sweep(cfg: PipelineConfig, sweep: SweepConfig, resume: bool = False,
              say: Callable[[str], None] = LOGGER.info) -> dict[str, Any]:
    started = time.monotonic()
    if cfg.iterations < 1:
        raise ConfigError("iterations: a sweep trains at least one student per trial (got 0); "
                          "its objective is the students' validation accuracy")
    check_method_knobs(cfg, list(sweep.space))
    out = Path(cfg.output_dir).expanduser().resolve()
    with OutputLock(out, "sweep"):
        _check_resume(out, resume)
        return _sweep_locked(cfg, sweep, out, resume, say, started)


def _sweep_locked(cfg: PipelineConfig, sweep: SweepConfig, out: Path, resume: bool,
                  say: Callable[[str], None], started: float) -> dict[str, Any]:
    pipeline = cfg.model_dump()
    pipeline.pop("output_dir")
    ledger = Ledger(out, {"pipeline": pipeline, "sweep": sweep.model_dump()}, kind="sweep")
    paths = data_paths(cfg)  # validated before the first record (see run_pipeline)
    sets = load_labeled_sets(paths.labeled, paths.test, cfg.data.image_size)
    tracker, parent_id = open_tracking(cfg.name, out, ledger, say, {"selftrain.role": "sweep"})
    open_runs = [parent_id]
    with tracker.terminating(open_runs):
        tracker.log_params(parent_id, {**cfg.model_dump(), "sweep": _space_params(sweep)})
        train, validation = split_validation(sets.labeled, sweep.validation_fraction, cfg.seed)
        say(f"{len(sets.classes)} classes: {len(train)} labeled images to learn from, {len(validation)} "
            f"held out for validation, {len(sets.test)} test; pool: {paths.unlabeled}")
        run = Run(cfg, out, ledger, tracker, parent_id, paths, replace(sets, labeled=train), say, open_runs)

        shared_teacher = not any(changes_teacher(key) for key in sweep.space)
        shared_backbone = cfg.pretrain is not None and not any(changes_teacher(k, PRETRAIN_KEYS) for k in sweep.space)
        backbone = pretrain_stage(run) if shared_backbone else None
        teacher = scores = None
        if shared_teacher:
            teacher = train_stage(run, iteration=0, arch=cfg.model.teacher, pseudo=None,
                                  init_backbone_dir=teacher_init_dir(cfg, backbone))
            teacher["val_accuracy"] = ledger.stage("teacher_val_accuracy", lambda: evaluate(
                validation, teacher["model_dir"], cfg.scoring, cfg.data.image_size, len(sets.classes)).accuracy)
            tracker.log_metrics(teacher["mlflow_run_id"], {OBJECTIVE: teacher["val_accuracy"]})  # the baseline
            say(f"shared teacher {teacher['model']}: validation accuracy {teacher['val_accuracy']:.4f}")
            if sweep.reuse_teacher_scores:
                scores = score_stage(run, 1, teacher)
        else:
            say("the search space changes the teacher: every trial trains and scores with its own")
        reads_pool = (cfg.teacher.online or cfg.students.online or cfg.pretrain is not None
                      or any(k.endswith(".method") for k in sweep.space))
        shared = Shared(cfg.model_dump(), str(out), tracker.uri, parent_id, paths, sets.classes, train,
                        validation, teacher, scores, pool_index_stage(run) if reads_pool else None, backbone,
                        tracker.experiment_id)
        results = _tune(cfg, sweep, shared, out, resume, say)
        trials = collect_trials(results, sweep, cfg, out, tracker, parent_id)
        summary = _summarize(cfg, sweep, run, trials, teacher, time.monotonic() - started)
        tracker.finish(parent_id)
    errors = tracking_errors(tracker, out)
    if errors != summary["tracking_errors"]:  # the last calls found the store down
        summary["tracking_errors"] = errors  # the results on disk are complete
        atomic_write_json(out / "summary.json", redact_tree(summary), indent=2, default=str)
    return summary


def _check_resume(out: Path, resume: bool) -> None:
    exists = (out / "state.json").exists()
    if exists and not resume:
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue it, or choose another output_dir")
    if resume and not exists:
        raise ConfigError(f"--resume: {out} holds no sweep to resume (no state.json); run without --resume")


def _space_params(sweep: SweepConfig) -> dict[str, Any]:
    return {"space": {k: f"{d.kind} {getattr(d, d.kind)}" for k, d in sweep.space.items()},
            **sweep.model_dump(exclude={"space"})}


def _domain(domain: Any) -> Any:
    """Our YAML domain as Ray Tune's: grid_search(list), choice(list), uniform(lo, hi), …"""
    value = getattr(domain, domain.kind)
    if domain.kind == "grid":
        return tune.grid_search(value)
    if domain.kind == "choice":
        return tune.choice(value)
    return getattr(tune, domain.kind)(*value)


def max_epochs(cfg: PipelineConfig, sweep: SweepConfig) -> int:
    """The longest a trial can train (ASHA's max_t): student epochs × iterations, at their largest."""
    def largest(key: str, default: int) -> int:
        domain = sweep.space.get(key)
        return int(max(domain.values)) if domain else default
    return largest("train.student_epochs", cfg.train.student_epochs) * largest("iterations", cfg.iterations)


def concurrent_trials(cfg: PipelineConfig, sweep: SweepConfig) -> int:
    """As many trials as the cluster fits: each holds its trainer's workers plus one data task."""
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    resources = ray.cluster_resources()
    need_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.train.data_cpus_per_task + sweep.trial_cpus
    fits = math.floor(resources.get("CPU", 1) / need_cpu)
    if resources.get("GPU", 0) and cfg.train.use_gpu is not False:
        fits = min(fits, math.floor(resources["GPU"] / cfg.train.num_workers))
    return max(1, fits)


class _Progress(tune.Callback):
    """One line per epoch and per finished trial, instead of Tune's status tables."""

    def __init__(self, say: Callable[[str], None], keys: list[str], out: Path):
        self.say, self.keys, self.out = say, keys, out

    def _name(self, trial: Any) -> str:
        return f"trial {trial.trial_id} (" + ", ".join(f"{k}={trial.config.get(k)}" for k in self.keys) + ")"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if OBJECTIVE in result:
            self.say(f"{self._name(trial)} epoch {result['training_iteration']}: {OBJECTIVE} {result[OBJECTIVE]:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{self._name(trial)} done")
        release_placement_groups(self.out / "trials" / trial.trial_id / PLACEMENT_GROUPS_FILE)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{self._name(trial)} failed")
        release_placement_groups(self.out / "trials" / trial.trial_id / PLACEMENT_GROUPS_FILE)


def release_placement_groups(path: Path) -> list[str]:
    """Remove the Ray Train placement groups a finished trial recorded, where they still exist.

    Ray 2.60 with Train V2 inside Tune: a trial that ASHA stops leaves its Train controller alive
    and the worker group's placement group reserved (ray issue 54305). On a small cluster the
    next trial's data tasks then wait forever for the CPUs it holds (seen on 2 cores: the third
    trial of quickstart_sweep.yaml stalled at 0 rows). Returns the ids removed."""
    from ray.util.placement_group import PlacementGroup, placement_group_table

    if not path.exists():
        return []
    removed = []
    table = placement_group_table()
    for group_id in dict.fromkeys(path.read_text().split()):
        if table.get(group_id, {}).get("state") not in (None, "REMOVED"):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            removed.append(group_id)
    return removed


def _tune(cfg: PipelineConfig, sweep: SweepConfig, shared: Shared, out: Path, resume: bool,
          say: Callable[[str], None]) -> tune.ResultGrid:
    # Tune needs a non-empty bundle per trial; the trial process only waits on its trainer, so it
    # reserves memory rather than a CPU the trainer's data tasks need (0.01 CPU starved them on 2 cores).
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared),
                                    {"CPU": sweep.trial_cpus, "memory": TRIAL_MEMORY})
    path = out / "tune"
    if resume and tune.Tuner.can_restore(str(path)):
        say(f"restoring the Tune experiment in {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True).fit()
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(max_t=max_epochs(cfg, sweep), grace_period=sweep.grace_period,
                                  reduction_factor=sweep.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrency = concurrent_trials(cfg, sweep)
    say(f"sweeping {', '.join(sweep.space)} ({sweep.scheduler}, {concurrency} trial(s) at a time)")
    tuner = tune.Tuner(
        trainable,
        param_space={key: _domain(domain) for key, domain in sweep.space.items()},
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", scheduler=scheduler,
                                    num_samples=sweep.num_samples, max_concurrent_trials=concurrency,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_Progress(say, list(sweep.space), out)]),
    )
    return tuner.fit()


def choose_best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest objective at its last epoch, among those that trained to the
    end (ASHA stopped the others below a rung's cut-off, on fewer epochs); if none did, among
    those stopped early. Failed trials never count."""
    scored = [t for t in trials if t["status"] != "failed" and t["objective"] is not None]
    if not scored:
        reasons = "\n  ".join(f"trial {t['trial_id']} ({_params_text(t['params'])}): {t['error']}" for t in trials)
        raise SweepError(f"all {len(trials)} trials failed; nothing to choose from:\n  {reasons}")
    completed = [t for t in scored if t["status"] == "completed"]
    return max(completed or scored, key=lambda t: t["objective"])


def _summarize(cfg: PipelineConfig, sweep: SweepConfig, run: Run, trials: list[dict[str, Any]],
               teacher: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    best = choose_best(trials)
    best_cfg = with_params(cfg, best["params"], source="best trial")
    best_cfg = best_cfg.model_copy(update={"output_dir": str(run.out / "best")})
    test = None  # a trial stopped early left no final model to test
    if best["model_dir"]:
        test = evaluate(run.sets.test, best["model_dir"], cfg.scoring, cfg.data.image_size, len(run.sets.classes))
    config_path = run.out / "best_config.yaml"
    atomic_write_text(config_path, f"# selftrain run {config_path}\n# best trial {best['trial_id']} of the sweep in "
                           f"{run.out} ({OBJECTIVE} {best['objective']:.4f})\n"
                           + yaml.safe_dump(best_cfg.model_dump(), sort_keys=False))
    passes = (1 if run.ledger.get("iter1/scores") else 0) + sum(t["teacher_scoring_passes"] for t in trials)
    summary = {
        "mlflow_run_id": run.parent_id, "tracking_uri": run.tracker.display_uri, "experiment": cfg.name,
        "objective": OBJECTIVE, "labeled_train_images": len(run.sets.labeled),
        "teacher": None if teacher is None else {k: teacher[k] for k in ("model", "test_accuracy", "val_accuracy",
                                                                         "mlflow_run_id", "model_dir")},
        "trials": trials, "best_trial": best["trial_id"], "best_params": best["params"],
        "best_val_accuracy": best["objective"], "best_test_accuracy": test.accuracy if test else None,
        "best_config": str(config_path), "teacher_scoring_passes": passes,
        "trials_by_status": {s: sum(t["status"] == s for t in trials) for s in ("completed", "stopped_early", "failed")},
        "wall_seconds": round(seconds, 1),
        "tracking_errors": tracking_errors(run.tracker, run.out),  # what MLflow lacks, if anything
    }
    atomic_write_json(run.out / "summary.json", redact_tree(summary), indent=2, default=str)
    tracker, parent = run.tracker, run.parent_id
    tracker.log_metrics(parent, {"sweep/best_val_accuracy": best["objective"], "sweep/teacher_scoring_passes": passes,
                                 "sweep/wall_seconds": seconds,
                                 **({"sweep/best_test_accuracy": test.accuracy} if test else {}),
                                 **{f"sweep/trials_{k}": v for k, v in summary["trials_by_status"].items()}})
    tracker.set_tags(parent, {"selftrain.best_trial": best["trial_id"]})
    tracker.log_artifact(parent, config_path)
    tracker.log_figure(parent, plots.sweep_objective(pd.DataFrame([{**t["params"], OBJECTIVE: t["objective"],
                                                                     "status": t["status"]} for t in trials]),
                                                     list(sweep.space), OBJECTIVE), "sweep_objective.png")
    tracker.log_artifact(parent, run.out / "summary.json")
    return summary


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def sweep_table(summary: dict[str, Any]) -> str:
    rows = [{**t["params"], "status": t["status"], "epochs": t["epochs"], OBJECTIVE: t["objective"],
             "trial": t["trial_id"]} for t in summary["trials"]]
    table = pd.DataFrame(rows).sort_values(OBJECTIVE, ascending=False, na_position="last")
    test = summary["best_test_accuracy"]
    test_text = f"{test:.4f}" if test is not None else "none (ASHA stopped every trial early: no final model)"
    errors = "".join(f"\n{e['message']}" for e in summary.get("tracking_errors", []))
    return (f"{table.to_string(index=False, float_format=lambda v: f'{v:.4f}')}\n"
            f"best trial {summary['best_trial']} ({_params_text(summary['best_params'])}): {OBJECTIVE} "
            f"{summary['best_val_accuracy']:.4f}, test accuracy {test_text}; "
            f"teacher-scoring passes: {summary['teacher_scoring_passes']}; best config: {summary['best_config']}"
            + errors)
