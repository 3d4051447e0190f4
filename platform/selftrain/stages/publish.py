"""What MLflow keeps of a pipeline beyond metrics: each trained model as an MLflow model, the
final one registered, and the datasets every run read (the runs table's Dataset column).

Datasets are described from what the pipeline already holds, never by reading the pool on the
driver: the labeled and test indexes (small by premise: their digest covers every file name and
label), the pool's counts from the pool index or the teacher's scoring pass (its digest: source
and counts), and each pseudo-label pass's record (its digest: provenance and counts per class).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from selftrain.data.augment import to_model_input
from selftrain.data.decode import decode_image, read_file_bytes
from selftrain.tracking import DatasetRecord
from selftrain.training.loop import MODEL_FILE, SPEC_FILE, load_model

if TYPE_CHECKING:
    from selftrain.self_training import Run

TRAINING, EVALUATION, PSEUDO_LABELING = "training", "evaluation", "pseudo_labeling"


def fingerprint(value: Any) -> str:
    """8 hex digits of sha256 over `value` as JSON, the length of MLflow's own dataset digests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def folder_dataset(name: str, root: str, index: pd.DataFrame, context: str) -> DatasetRecord:
    """A class-folder set from its index (`path`, `label`): the digest covers every file, named
    relative to the root, so the same folder copied elsewhere has the same digest."""
    rows = sorted((os.path.relpath(p, root), int(label)) for p, label in zip(index["path"], index["label"]))
    return DatasetRecord(name, root, len(rows), fingerprint(rows), context)


def pool_dataset(run: Run, context: str) -> DatasetRecord | None:
    """The unlabeled pool, with the readable and unreadable counts of whichever pass read it
    first (the pool index, else the first scoring pass); None when nothing read it yet."""
    record = run.ledger.get("pool_index")
    if record:
        rows, unreadable = record["rows"], record["rejected_count"]
    elif pseudo := run.ledger.get("iter1/pseudo_labels"):
        rows, unreadable = pseudo["stats"]["scored"], pseudo["stats"]["rejected_count"]
    else:
        return None
    source = run.paths.unlabeled
    return DatasetRecord("unlabeled", source, rows, fingerprint([source, rows, unreadable]), context,
                         {"unreadable": unreadable})


def pseudo_label_dataset(iteration: int, pseudo: dict[str, Any]) -> DatasetRecord:
    stats = pseudo["stats"]
    return DatasetRecord(f"pseudo_labels_iter{iteration}", pseudo["dir"], pseudo["rows"],
                         fingerprint([pseudo["dir"], pseudo["rows"], stats["kept_per_class"], stats["histogram_kept"]]),
                         TRAINING, {"kept_before_balancing": pseudo["kept"], "pool_scored": stats["scored"]})


def stage_datasets(run: Run, iteration: int, pseudo: dict[str, Any] | None, pool_read: bool) -> list[DatasetRecord]:
    """What one trained model read: labeled (+ pseudo-labels, the pool they came from, the
    pool itself when the method reads it every step), and the test set it is evaluated on."""
    datasets = [labeled_dataset(run), test_dataset(run)]
    if pseudo:
        datasets.append(pseudo_label_dataset(iteration, pseudo))
    if pool_read or pseudo:
        pool = pool_dataset(run, TRAINING if pool_read else PSEUDO_LABELING)
        datasets += [pool] if pool else []
    return datasets


def pretrain_datasets(run: Run) -> list[DatasetRecord]:
    """The pool self-supervised pretraining learns from; the labeled -> test probes of its features."""
    return [pool_dataset(run, TRAINING), replace(labeled_dataset(run), context=EVALUATION), test_dataset(run)]


def pipeline_datasets(run: Run) -> list[DatasetRecord]:
    """Every dataset of the pipeline, for its parent run and `summary.json`."""
    pool = pool_dataset(run, TRAINING)
    pseudo = [pseudo_label_dataset(i, run.ledger.get(f"iter{i}/pseudo_labels"))
              for i in range(1, run.cfg.iterations + 1) if run.ledger.get(f"iter{i}/pseudo_labels")]
    return [labeled_dataset(run), *([pool] if pool else []), *pseudo, test_dataset(run)]


def labeled_dataset(run: Run) -> DatasetRecord:
    return folder_dataset("labeled", run.paths.labeled, run.sets.labeled, TRAINING)


def test_dataset(run: Run) -> DatasetRecord:
    return folder_dataset("test", run.paths.test, run.sets.test, EVALUATION)


def log_trained_model(run: Run, run_id: str | None, model_dir: str) -> str | None:
    """The model in `model_dir` as the MLflow model of run `run_id`, its input example the first
    labeled image as the model sees it; the LoggedModel id (None when MLflow missed it)."""
    if run_id is None:
        return None
    model, spec = load_model(model_dir)
    image = decode_image(read_file_bytes(run.sets.labeled["path"].iloc[0]), spec["image_size"])
    example = to_model_input(torch.from_numpy(image[None]).permute(0, 3, 1, 2)).numpy()
    return run.tracker.log_model(run_id, model, example, spec["num_classes"],
                                 [str(Path(model_dir) / MODEL_FILE), str(Path(model_dir) / SPEC_FILE)])


def register_final(run: Run, final: dict[str, Any]) -> dict[str, Any] | None:
    """The final model as a new version of `registry.model_name`, tagged with its test accuracy,
    once per logged model: a resumed run that finished before registers nothing new (the
    registry finds the version it made) and reports the recorded one if MLflow is down."""
    name = run.cfg.registered_model_name
    entry = run.tracker.register_model(name, final.get("mlflow_model_id"), final["mlflow_run_id"], final["test_accuracy"], {
        "selftrain.pipeline_run_id": run.parent_id, "selftrain.output_dir": str(run.out),
        "selftrain.role": final["role"], "selftrain.iteration": final["iteration"], "selftrain.model": final["model"]})
    if entry is None:
        return run.ledger.get("registry")
    run.ledger.put("registry", entry)
    run.say(f"final model registered as {entry['uri']}; {entry['best_uri']} is version {entry['best_version']} "
            "(the highest test accuracy)")
    return entry
