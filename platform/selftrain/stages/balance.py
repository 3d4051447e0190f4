"""Per-class balancing of pseudo-labels in streaming passes, exact to k rows per class.

Noisy Student (Xie et al. 2020, Sec. 3.1): "we duplicate images in classes where there are not
enough images. For classes where we have too many images, we take the images with the highest
confidence." `groupby(...).map_groups` does this with one task per class holding the whole
class in one block: a class of millions of rows must fit in one worker and runs serially.
Here each class is a rank selection instead, in streaming passes over three columns:

1. radix passes: per class, a sparse histogram of the next RADIX_BITS bits of each row's 64-bit
   rank key narrows down the bucket holding the cut-off (usually 2-3 passes);
2. once that bucket holds at most EDGE_ROWS rows, those rows (only) go to the driver, which
   sorts them by (key, path) and fixes the exact cut-off;
3. a filter keeps each row `repeats` times, plus once more if it ranks up to the cut-off.

Rank keys (lower first, ties by path): for a class with at least k rows, descending
confidence (then a seeded hash), so the k most confident stay; for a short class, a seeded
hash of the path picks which k mod n rows get one copy more than the k // n every row gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray.data

from selftrain.seeds import relative_key

RADIX_BITS = 16
EDGE_ROWS = 2_000  # the most rows per class that reach the driver (bounded, whatever the pool)


@dataclass(frozen=True)
class ClassPlan:
    repeats: int  # every row of the class appears this many times ...
    extra: int  # ... and the `extra` first-ranked rows once more
    by_confidence: bool  # rank: descending confidence, else a seeded hash of the path


def plans(kept_per_class: list[int], k: int) -> dict[int, ClassPlan]:
    out = {}
    for c, n in enumerate(kept_per_class):
        if n >= k:
            out[c] = ClassPlan(0, k, True)
        elif n > 0:
            out[c] = ClassPlan(k // n, k % n, False)
    return out


def rank_keys(batch: pd.DataFrame, by_confidence: np.ndarray, seed: int, root: str) -> np.ndarray:
    """uint64 per row, lower ranks first. Confidence rows: the inverted float32 bit pattern
    (monotone for non-negative floats) in the high 32 bits, hash bits below as a tie-break.
    The hash is of the path below the pool's `root`: the same wherever the pool lies."""
    below_root = batch["path"].astype(str).map(lambda path: relative_key(path, root))
    hashed = pd.util.hash_pandas_object(below_root, index=False,
                                        hash_key=f"{seed % 10**16:016d}").to_numpy(dtype=np.uint64)
    bits = batch["confidence"].to_numpy(np.float32).view(np.uint32).astype(np.uint64)
    by_conf = ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | (hashed >> np.uint64(32))
    return np.where(by_confidence, by_conf, hashed)


@dataclass
class _Search:
    """Where one class's cut-off lies: rows whose key starts with `prefix` (the top `bits`
    bits) hold it, `need` of them rank up to it."""

    prefix: int = 0
    bits: int = 0
    need: int = 0
    rows: int = 0  # how many rows share the prefix


def _keys(batch: pd.DataFrame, plan_of: dict[int, ClassPlan], seed: int, root: str) -> tuple[np.ndarray, np.ndarray]:
    classes = batch["prediction"].to_numpy()
    by_confidence = np.array([plan_of[c].by_confidence if c in plan_of else True for c in classes], dtype=bool)
    return classes, rank_keys(batch, by_confidence, seed, root)


def _in_search(classes: np.ndarray, keys: np.ndarray, search: dict[int, _Search]) -> np.ndarray:
    inside = np.zeros(len(keys), dtype=bool)
    for c, s in search.items():
        mine = classes == c
        if s.bits:
            mine &= (keys >> np.uint64(64 - s.bits)) == np.uint64(s.prefix)
        inside |= mine
    return inside


def _histogram(batch: pd.DataFrame, plan_of, seed: int, root: str, search: dict[int, _Search]) -> pd.DataFrame:
    classes, keys = _keys(batch, plan_of, seed, root)
    inside = _in_search(classes, keys, search)
    shifts = np.array([64 - search[c].bits - RADIX_BITS if c in search else 0 for c in classes[inside]], dtype=np.uint64)
    digits = (keys[inside] >> shifts) & np.uint64(2**RADIX_BITS - 1)
    pairs, counts = np.unique(np.stack([classes[inside], digits.astype(np.int64)]), axis=1, return_counts=True)
    return pd.DataFrame({"prediction": pairs[0], "digit": pairs[1], "count": counts})


def _edge_rows(batch: pd.DataFrame, plan_of, seed: int, root: str, search: dict[int, _Search]) -> pd.DataFrame:
    classes, keys = _keys(batch, plan_of, seed, root)
    inside = _in_search(classes, keys, search)
    return pd.DataFrame({"prediction": classes[inside], "key": keys[inside],
                         "path": batch["path"][inside].astype(str).to_numpy()})


def _narrow(columns: ray.data.Dataset, args: dict[str, Any], search: dict[int, _Search]) -> None:
    """Radix passes until every class's cut-off bucket is small enough to collect."""
    while open_ := {c: s for c, s in search.items() if s.rows > EDGE_ROWS and s.bits < 64}:
        counts = columns.map_batches(_histogram, batch_format="pandas",
                                     fn_kwargs={**args, "search": open_}).to_pandas()
        counts = counts.groupby(["prediction", "digit"], as_index=False)["count"].sum()
        for c, s in open_.items():
            mine = counts[counts["prediction"] == c].sort_values("digit")
            cumulative = mine["count"].cumsum().to_numpy()
            at = int(np.searchsorted(cumulative, s.need))  # first digit whose rows reach `need`
            s.need -= int(cumulative[at - 1]) if at else 0
            s.prefix = (s.prefix << RADIX_BITS) | int(mine["digit"].iloc[at])
            s.bits += RADIX_BITS
            s.rows = int(mine["count"].iloc[at])


def _select(batch: pd.DataFrame, plan_of, seed: int, root: str, cutoff: dict[int, tuple[int, str]]) -> pd.DataFrame:
    classes, keys = _keys(batch, plan_of, seed, root)
    copies = np.zeros(len(batch), dtype=np.int64)
    for i, (c, key, path) in enumerate(zip(classes, keys, batch["path"].astype(str))):
        if c in plan_of:
            copies[i] = plan_of[c].repeats + (c in cutoff and (int(key), path) <= cutoff[c])
    return batch.iloc[np.repeat(np.arange(len(batch)), copies)]


def balance(kept: ray.data.Dataset, kept_per_class: list[int], k: int, seed: int, root: str) -> ray.data.Dataset:
    """Lazy: exactly k rows for every class that kept any (the search passes run now). Rows
    are ranked by their paths below the pool's `root`."""
    plan_of = plans(kept_per_class, k)
    args: dict[str, Any] = {"plan_of": plan_of, "seed": seed, "root": root}
    columns = kept.select_columns(["prediction", "confidence", "path"])
    search = {c: _Search(need=p.extra, rows=kept_per_class[c]) for c, p in plan_of.items() if p.extra}
    _narrow(columns, args, search)
    edge = columns.map_batches(_edge_rows, batch_format="pandas",
                               fn_kwargs={**args, "search": search}).to_pandas() if search else None
    cutoff = {}
    for c, s in search.items():
        rows = edge[edge["prediction"] == c].sort_values(["key", "path"], kind="stable")
        last = rows.iloc[s.need - 1]
        cutoff[c] = (int(last["key"]), str(last["path"]))
    return kept.map_batches(_select, batch_format="pandas", fn_kwargs={**args, "cutoff": cutoff})
