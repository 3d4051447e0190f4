"""The evaluation protocols of representation learning, on any saved model or backbone:

- `knn`: weighted kNN (k = 200, T = 0.1) of the test images among the labeled ones, on frozen
  features (`evaluation/knn.py`);
- `linear`: a logistic-regression probe fitted on the labeled images' frozen features
  (`evaluation/linear_probe.py`);
- `finetune`: the whole network trained `supervised` from the model's backbone (a new
  classifier) on a fraction of the labeled images, then scored on the test images.

Features come from the same Ray Data path as teacher scoring (`stages/features.py`): CPU tasks
decode, an actor pool runs the backbone. Only the labeled and test sets' features reach the
driver (small by premise), never the pool's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from selftrain.config import MethodConfig, PipelineConfig
from selftrain.errors import ConfigError
from selftrain.evaluation.knn import knn_accuracy
from selftrain.evaluation.linear_probe import linear_probe_accuracy
from selftrain.stages.evaluate import evaluate
from selftrain.stages.features import extract_features
from selftrain.stages.train import train_model, training_streams
from selftrain.training.loop import SPEC_FILE

PROTOCOLS = ("knn", "linear", "finetune")


def frozen_protocols(model_dir: str, labeled: pd.DataFrame, test: pd.DataFrame, cfg: PipelineConfig,
                     num_classes: int, protocols: tuple[str, ...] = ("knn", "linear"), k: int = 200,
                     temperature: float = 0.1) -> dict[str, dict[str, Any]]:
    """`knn` and/or `linear` on the frozen features of `model_dir`'s backbone, labeled -> test,
    from one feature pass over both sets."""
    both = pd.concat([labeled[["path", "label"]].assign(split="labeled"), test[["path", "label"]].assign(split="test")],
                     ignore_index=True)
    out = extract_features(both, model_dir, cfg.scoring, cfg.data.image_size, cfg.data.parquet_image_column)
    sets = {}
    for split in ("labeled", "test"):
        part = out[out["split"] == split]
        sets[split] = (np.stack(part["features"].to_list()).astype(np.float32), part["label"].to_numpy(copy=True))
    (train_x, train_y), (test_x, test_y) = sets["labeled"], sets["test"]
    counts = {"labeled_images": len(train_x), "test_images": len(test_x), "feature_dim": int(train_x.shape[1])}
    results = {}
    if "knn" in protocols:
        accuracy = knn_accuracy(torch.from_numpy(test_x), torch.from_numpy(test_y), torch.from_numpy(train_x),
                                torch.from_numpy(train_y), num_classes, k, temperature)
        results["knn"] = {"protocol": "knn", "accuracy": accuracy, "k": min(k, len(train_x)),
                          "temperature": temperature, **counts}
    if "linear" in protocols:
        results["linear"] = {"protocol": "linear", "accuracy": linear_probe_accuracy(train_x, train_y, test_x, test_y),
                             **counts}
    return results


def label_fraction(labeled: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """`fraction` of the labeled images, per class (at least one image of each class)."""
    parts = [group.sample(max(1, round(fraction * len(group))), random_state=seed)
             for _, group in labeled.groupby("label", sort=True)]
    return pd.concat(parts, ignore_index=True)


def finetune_protocol(model_dir: str, labeled: pd.DataFrame, test: pd.DataFrame, cfg: PipelineConfig,
                      classes: list[str], fraction: float, out_dir: Path) -> dict[str, Any]:
    """The whole network trained `supervised` from `model_dir`'s backbone on `fraction` of the
    labeled images (the teacher's budget and architecture of `cfg`), scored on `test`."""
    spec = json.loads((Path(model_dir) / SPEC_FILE).read_text())
    subset = label_fraction(labeled, fraction, cfg.seed)
    supervised = cfg.model_copy(update={"teacher": MethodConfig(method="supervised")})
    streams = training_streams(supervised, supervised.teacher, subset, len(classes), None, None)
    trained = train_model(supervised, "finetune", spec["arch"], streams,
                          {"num_classes": len(classes), "classes": classes, "image_size": cfg.data.image_size},
                          student=False, out_dir=out_dir, seed=cfg.seed, init_backbone_dir=model_dir)
    result = evaluate(test, trained.model_dir, cfg.scoring, cfg.data.image_size, len(classes))
    return {"protocol": "finetune", "accuracy": result.accuracy, "label_fraction": fraction,
            "labeled_images": len(subset), "test_images": result.count, "model_dir": trained.model_dir}



def evaluate_backbone(model_dir: str, cfg: PipelineConfig, protocols: list[str], out_dir: Path, k: int = 200,
                      temperature: float = 0.1, fraction: float = 0.1) -> list[dict[str, Any]]:
    """`selftrain eval`: each of `protocols` on `model_dir`, with the labeled and test images of
    `cfg.data` (validated as a run validates them)."""
    from selftrain.data.folders import load_labeled_sets
    from selftrain.self_training import data_paths

    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"--protocol {','.join(unknown)}: unknown; choose from {', '.join(PROTOCOLS)}")
    paths = data_paths(cfg)
    sets = load_labeled_sets(paths.labeled, paths.test, cfg.data.image_size)
    results = []
    frozen = tuple(p for p in protocols if p != "finetune")
    if frozen:
        by_name = frozen_protocols(model_dir, sets.labeled, sets.test, cfg, len(sets.classes), frozen, k, temperature)
        results += [by_name[p] for p in frozen]
    if "finetune" in protocols:  # a fresh folder: Ray Train would resume an earlier run of the same name
        work = out_dir / f"finetune-{fraction:g}"
        shutil.rmtree(work, ignore_errors=True)
        results.append(finetune_protocol(model_dir, sets.labeled, sets.test, cfg, sets.classes, fraction, work / "model"))
    return results
