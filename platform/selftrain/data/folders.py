"""Class-folder image sets (`root/<class>/.../<image>`): indexing and validation.

Labeled and test sets are small by the premise of the product (a few labeled images), so they
are indexed and decoded once on the driver; the unlabeled pool never is (see `pool.py`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from selftrain.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, local_id, read_file_bytes
from selftrain.errors import DataError


def is_image_file(path: Path) -> bool:
    """An image by its extension: a file, or a symlink that may lead nowhere (then it is read,
    fails and is named with the others, rather than left out without a word)."""
    return (path.is_file() or path.is_symlink()) and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def class_names(root: str | Path, role: str) -> list[str]:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data.{role}: path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data.{role}: expected a folder with one subfolder per class: {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"data.{role}: no class subfolders in {root} (expected {root}/<class>/…)")
    return names


def index_class_folders(root: str | Path, classes: list[str], role: str) -> pd.DataFrame:
    """One row per image file: `path` (absolute; a `local_id`: a name that is not UTF-8 becomes a
    file URI, which Arrow, Parquet and JSON can hold), `label` (index into `classes`)."""
    root = Path(root).expanduser().resolve()
    rows = [
        (local_id(str(path)), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if is_image_file(path)
    ]
    if not rows:
        raise DataError(
            f"data.{role}: no image files under {root} "
            f"(looked for extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return pd.DataFrame(rows, columns=["path", "label"])


def _check(path: str, size: int) -> str:
    try:
        decode_image(read_file_bytes(path), size)
        return ""
    except (OSError, ImageDecodeError) as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad file is rejected, never fatal
        return f"{type(exc).__name__}: {exc}"


def drop_unreadable(index: pd.DataFrame, size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an index into readable rows and rejected rows (`path`, `reason`)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = pd.Series(list(pool.map(_check, index["path"], [size] * len(index))))
    bad = reasons != ""
    rejected = pd.DataFrame({"path": index["path"][bad.values], "reason": reasons[bad].values})
    return index[~bad.values].reset_index(drop=True), rejected


@dataclass(frozen=True)
class LabeledSets:
    classes: list[str]
    labeled: pd.DataFrame
    test: pd.DataFrame
    rejected: pd.DataFrame  # path, reason: unreadable files of either set


def load_labeled_sets(labeled: str, test: str, image_size: int) -> LabeledSets:
    """Index and validate the labeled and test folders; their class names must agree."""
    classes = class_names(labeled, "labeled")
    test_classes = class_names(test, "test")
    if classes != test_classes:
        only_l = sorted(set(classes) - set(test_classes))
        only_t = sorted(set(test_classes) - set(classes))
        raise DataError(
            "data.labeled and data.test must have the same class folders; "
            f"only in labeled: {only_l or 'none'}; only in test: {only_t or 'none'}"
        )
    if len(classes) < 2:
        raise DataError(f"data.labeled: need at least 2 classes, found {classes}")
    labeled_index, bad_l = drop_unreadable(index_class_folders(labeled, classes, "labeled"), image_size)
    test_index, bad_t = drop_unreadable(index_class_folders(test, classes, "test"), image_size)
    for role, index, root in (("labeled", labeled_index, labeled), ("test", test_index, test)):
        if index.empty:
            raise DataError(f"data.{role}: every image under {root} is unreadable")
    return LabeledSets(classes, labeled_index, test_index, pd.concat([bad_l, bad_t], ignore_index=True))
