"""Class-folder image sets (`root/<class>/.../<image>`): indexing and validation.

Labeled and test sets are small by the premise of the product (a few labeled images), so they
are indexed and decoded once on the driver; the unlabeled pool never is (see `pool.py`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from selftrain.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, local_id, read_file_bytes
from selftrain.data.listing import SKIPPED, folder_identity, walk_local
from selftrain.errors import DataError


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
    """One row per image file below each class folder: `path` (absolute; a `local_id`: a name
    that is not UTF-8 becomes a file URI, which Arrow, Parquet and JSON can hold), `label` (index
    into `classes`), `skip` (why it cannot be read, known before reading it; else "").

    Walked as the pool is (`listing.walk_local`): a symlink to a folder is followed, one back
    to a folder above it is a loop, and that loop, a folder that cannot be listed and an image
    name that is a FIFO or device get a row with their reason, so they are named with the
    unreadable files instead of being left out without a word (as are dangling links, which
    fail when read)."""
    root = Path(root).expanduser().resolve()
    rows = []
    for label, name in enumerate(classes):
        folder = str(root / name)
        found = []
        # A link back to the root or to the class folder is a loop: named, not followed.
        above = {folder_identity(os.stat(root)): str(root), folder_identity(os.stat(folder)): folder}
        for path, reason in walk_local(folder, above):
            if Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS or os.path.isdir(path):  # or a folder not walked
                found.append((Path(path), reason if reason.startswith(SKIPPED) else ""))
        rows += [(local_id(str(path)), label, skip) for path, skip in sorted(found)]
    if not rows:
        raise DataError(
            f"data.{role}: no image files under {root} "
            f"(looked for extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return pd.DataFrame(rows, columns=["path", "label", "skip"])


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
        checked = list(pool.map(_check, index["path"], [size] * len(index)))
    skips = index["skip"] if "skip" in index else pd.Series([""] * len(index))
    reasons = pd.Series([skip[len(SKIPPED):] if skip else found for skip, found in zip(skips, checked)])
    bad = reasons != ""
    rejected = pd.DataFrame({"path": index["path"][bad.values], "reason": reasons[bad].values})
    return index[~bad.values].drop(columns="skip", errors="ignore").reset_index(drop=True), rejected


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
