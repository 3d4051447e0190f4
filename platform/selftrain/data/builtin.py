"""Built-in datasets, written once to ordinary class folders so they take the user's path.

`digits` ships inside scikit-learn (1,797 real 8x8 handwritten digits) and works offline;
`cifar10`, `stl10` and `svhn` are downloaded by torchvision where the network allows.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selftrain.errors import DataError


@dataclass(frozen=True)
class DataPaths:
    labeled: str
    unlabeled: str
    test: str
    pool_has_class_folders: bool


@dataclass(frozen=True)
class _Arrays:
    classes: list[str]
    train_images: np.ndarray  # N x H x W (x C) uint8
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    extra_unlabeled: np.ndarray | None = None  # e.g. STL-10's unlabeled split


def _digits() -> _Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 17 grey levels
    order = np.random.default_rng(1234).permutation(len(images))  # fixed train/test split
    test, train = order[:450], order[450:]
    return _Arrays([str(c) for c in range(10)], images[train], digits.target[train],
                   images[test], digits.target[test])


def _torchvision(name: str, root: Path) -> _Arrays:
    from torchvision import datasets

    def arrays(ds, attr):  # torchvision keeps images in different attributes and layouts
        data = np.asarray(getattr(ds, attr))
        return data.transpose(0, 2, 3, 1) if data.ndim == 4 and data.shape[1] == 3 else data

    try:
        if name == "cifar10":
            train = datasets.CIFAR10(root, train=True, download=True)
            test = datasets.CIFAR10(root, train=False, download=True)
            return _Arrays(list(train.classes), arrays(train, "data"), np.asarray(train.targets),
                           arrays(test, "data"), np.asarray(test.targets))
        if name == "svhn":
            train = datasets.SVHN(root, split="train", download=True)
            test = datasets.SVHN(root, split="test", download=True)
            return _Arrays([str(c) for c in range(10)], arrays(train, "data"), train.labels,
                           arrays(test, "data"), test.labels)
        train = datasets.STL10(root, split="train", download=True)
        test = datasets.STL10(root, split="test", download=True)
        pool = datasets.STL10(root, split="unlabeled", download=True)
        return _Arrays(list(train.classes), arrays(train, "data"), train.labels,
                       arrays(test, "data"), test.labels, arrays(pool, "data"))
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"data.builtin={name}: could not download or read it under {root}: {exc}. "
            "Offline, use data.builtin=digits or point data.labeled/unlabeled/test at folders."
        ) from None


def _write(images: np.ndarray, labels: np.ndarray | None, root: Path, classes: list[str]) -> None:
    for i, image in enumerate(images):
        folder = root / (classes[labels[i]] if labels is not None else f"{i // 1000:05d}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def materialize_builtin(name: str, cache_dir: str, labels_per_class: int, seed: int) -> DataPaths:
    """Write `name` as labeled/unlabeled/test folders (once; later calls reuse them).

    The labeled set is `labels_per_class` images per class drawn with `seed`; the rest of the
    training split is the unlabeled pool, kept in class folders so pseudo-label accuracy can be
    measured. STL-10 adds its own unlabeled split (no true labels) instead.
    """
    cache = Path(cache_dir).expanduser().resolve()
    target = cache / f"{name}-{labels_per_class}per-class-seed{seed}"
    paths = DataPaths(str(target / "labeled"), str(target / "unlabeled"), str(target / "test"),
                      pool_has_class_folders=name != "stl10")
    if (target / "COMPLETE").exists():
        return paths
    arrays = _digits() if name == "digits" else _torchvision(name, cache / "downloads" / name)
    rng = np.random.default_rng(seed)
    labels = np.asarray(arrays.train_labels)
    labeled = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:labels_per_class]
        for c in range(len(arrays.classes))
    ])
    rest = np.setdiff1d(np.arange(len(labels)), labeled)
    staging = Path(str(target) + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    _write(arrays.train_images[labeled], labels[labeled], staging / "labeled", arrays.classes)
    _write(arrays.test_images, np.asarray(arrays.test_labels), staging / "test", arrays.classes)
    if arrays.extra_unlabeled is not None:
        _write(arrays.extra_unlabeled, None, staging / "unlabeled", arrays.classes)
    else:
        _write(arrays.train_images[rest], labels[rest], staging / "unlabeled", arrays.classes)
    (staging / "COMPLETE").touch()
    try:
        staging.rename(target)  # atomic: a concurrent writer that lost the race just reuses it
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
