"""Pseudo-labels from the scored pool: threshold τ, temperature T, per-class balancing.

Reads the teacher's scores (Parquet), keeps rows with confidence >= τ, balances classes to k
rows each (Noisy Student, Sec. 3.1), computes targets softmax(z/T) (or one-hot), and writes
`pseudo_labels/` as Parquet. Statistics come from one streaming pass; nothing scales with the
pool on the driver (unreadable files are counted, and the first `LISTED` named; so are images
whose teacher logits are NaN or infinite, which are never pseudo-labelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data

from selftrain.config import PseudoLabelConfig
from selftrain.console import post
from selftrain.data.parquet import read_parquet_per_file
from selftrain.errors import PseudoLabelError
from selftrain.methods.pseudo_label import default_per_class, targets
from selftrain.stages.balance import balance

BINS = 100  # confidence histogram resolution: quantiles are exact to 0.01
ROWS_PER_FILE = 50_000  # pseudo-label Parquet shards: ~20 files for 1M rows, never one per class
LISTED = 1000  # unreadable files named on the driver: a bounded list, however large the pool
NON_FINITE = "teacher logits NaN or infinite: not pseudo-labelled"


@dataclass
class PoolStats:
    scored: int = 0
    kept_per_class: list[int] = field(default_factory=list)
    kept_correct: int = 0  # kept rows whose known true label equals the pseudo-label
    kept_with_truth: int = 0
    histogram_kept: list[int] = field(default_factory=lambda: [0] * BINS)
    histogram_dropped: list[int] = field(default_factory=lambda: [0] * BINS)
    rejected: list[dict[str, str]] = field(default_factory=list)  # path, reason: the first LISTED by path
    rejected_count: int = 0  # every unreadable file (the scores Parquet lists them all)
    # Read images whose teacher logits hold NaN or inf (confidence NaN, `stages.score.scored`):
    # never pseudo-labelled, not in `scored`; the first LISTED by path named.
    non_finite: list[dict[str, str]] = field(default_factory=list)
    non_finite_count: int = 0

    @property
    def kept(self) -> int:
        return int(sum(self.kept_per_class))

    def confidence_quantile(self, q: float) -> float:
        counts = np.add(self.histogram_kept, self.histogram_dropped)
        if counts.sum() == 0:
            return float("nan")
        index = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
        return (min(index, BINS - 1) + 1) / BINS  # upper edge of the bin holding quantile q


def _batch_stats(batch: pd.DataFrame, threshold: float, num_classes: int) -> pd.DataFrame:
    bad = batch["error"] != ""
    finite = np.isfinite(batch["confidence"].to_numpy(dtype=np.float64))
    non_finite = ~bad & ~finite
    good = batch[~bad & finite]
    kept = good["confidence"] >= threshold
    bins = np.linspace(0.0, 1.0, BINS + 1)
    truth = good["label"] >= 0
    return pd.DataFrame([{
        "scored": len(good),
        "kept_per_class": np.bincount(good["prediction"][kept], minlength=num_classes).tolist(),
        "kept_correct": int(((good["prediction"] == good["label"]) & kept & truth).sum()),
        "kept_with_truth": int((kept & truth).sum()),
        "histogram_kept": np.histogram(good["confidence"][kept], bins)[0].tolist(),
        "histogram_dropped": np.histogram(good["confidence"][~kept], bins)[0].tolist(),
        "rejected": [{"path": p, "reason": r} for p, r in sorted(zip(batch["path"][bad], batch["error"][bad]))[:LISTED]],
        "rejected_count": int(bad.sum()),
        "non_finite": [{"path": p, "reason": NON_FINITE} for p in sorted(batch["path"][non_finite])[:LISTED]],
        "non_finite_count": int(non_finite.sum()),
    }])


def _first_by_path(named: list[dict[str, str]]) -> list[dict[str, str]]:
    """The LISTED first by path: the same files named whatever order the blocks come in."""
    return sorted(named, key=lambda row: row["path"])[:LISTED]


def pool_stats(scores: ray.data.Dataset, threshold: float, num_classes: int,
               progress: dict[str, Any] | None = None) -> PoolStats:
    """The pool's counts and histograms, in one streaming pass over the scores; `progress`
    (`console.progress_task`) gets the scores read so far."""
    stats = PoolStats(kept_per_class=[0] * num_classes)
    columns = ["path", "label", "error", "prediction", "confidence"]
    parts = scores.select_columns(columns).map_batches(
        _batch_stats, batch_format="pandas", fn_kwargs={"threshold": threshold, "num_classes": num_classes}
    )
    for part in parts.iter_rows():  # one small row per block
        stats.scored += int(part["scored"])
        stats.kept_correct += int(part["kept_correct"])
        stats.kept_with_truth += int(part["kept_with_truth"])
        for name in ("kept_per_class", "histogram_kept", "histogram_dropped"):
            setattr(stats, name, np.add(getattr(stats, name), part[name]).astype(int).tolist())
        stats.rejected = _first_by_path(stats.rejected + list(part["rejected"]))
        stats.rejected_count += int(part["rejected_count"])
        stats.non_finite = _first_by_path(stats.non_finite + list(part["non_finite"]))
        stats.non_finite_count += int(part["non_finite_count"])
        if progress:
            post(progress["board"], {"task": progress["task"], "unit": "img", "total": progress.get("total"),
                                     "done": int(part["scored"]) + int(part["rejected_count"]) + int(part["non_finite_count"]),
                                     "unreadable": int(part["rejected_count"])})
    return stats


def _keep(batch: pd.DataFrame, threshold: float) -> pd.DataFrame:
    confidence = batch["confidence"].to_numpy(dtype=np.float64)
    return batch[(batch["error"] == "") & np.isfinite(confidence) & (confidence >= threshold)]


def _to_pseudo_labels(batch: pd.DataFrame, cfg: PseudoLabelConfig, meta: dict[str, Any]) -> pd.DataFrame:
    logits = np.stack(batch["logits"].to_numpy())
    return pd.DataFrame({
        "path": batch["path"].to_numpy(),
        "pseudo_label": batch["prediction"].to_numpy(),
        "confidence": batch["confidence"].to_numpy(),
        "soft_target": list(targets(logits, cfg.temperature, cfg.soft)),
        "true_label": batch["label"].to_numpy(),
        **{key: [value] * len(batch) for key, value in meta.items()},
    })


def tta_name(tta: Sequence[str]) -> str:
    """The `tta` column: the views the teacher's scores average, e.g. "plain+flip+shift", or
    "plain" without `scoring.tta`."""
    return "+".join(("plain", *tta))


def check_usable(stats: PoolStats, cfg: PseudoLabelConfig, classes: list[str]) -> None:
    """Stop before training on nothing, saying why (scores stay on disk for another τ)."""
    if stats.scored == 0:
        raise PseudoLabelError(
            f"no pool image could be scored ({stats.rejected_count} unreadable"
            + (f"; the teacher gave NaN or infinite logits for {stats.non_finite_count} images, e.g. "
               + ", ".join(r["path"] for r in stats.non_finite[:3]) + ": retrain it (lower train.lr)"
               if stats.non_finite_count else "") + "); see 'rejected'"
        )
    if stats.kept == 0:
        top = max((i for i, c in enumerate(np.add(stats.histogram_kept, stats.histogram_dropped)) if c), default=0)
        raise PseudoLabelError(
            f"pseudo_label.threshold={cfg.threshold} keeps 0 of {stats.scored} pool images "
            f"(the teacher's highest confidence is below {(top + 1) / BINS:.2f}); lower the threshold"
        )
    present = [classes[i] for i, n in enumerate(stats.kept_per_class) if n > 0]
    if len(present) < 2:
        raise PseudoLabelError(
            f"pseudo-labels collapsed onto one class ({present[0]!r}: all {stats.kept} kept images); "
            f"a student trained on them learns nothing. Lower pseudo_label.threshold "
            f"(now {cfg.threshold}) or train a better teacher (more train.teacher_epochs or labels)"
        )


def select_pseudo_labels(
    scores_dir: str, cfg: PseudoLabelConfig, classes: list[str], out_dir: Path, seed: int,
    meta: dict[str, Any], progress: dict[str, Any] | None = None, *, pool_root: str,
) -> tuple[str, PoolStats, int]:
    """Write `out_dir/pseudo_labels/`; return its path, the pool stats and the rows written.
    With `cfg.balance`, rows are ranked by their paths below `pool_root` (`data.listing.data_roots`).

    Each `meta` item becomes a constant column (provenance: teacher, iteration, threshold,
    temperature, ...); `meta["tta"]`, the `scoring.tta` list that scored the pool, is written
    as its `tta_name` string. `progress` shows the pass over the scores."""
    if isinstance(meta.get("tta"), (list, tuple)):
        meta = {**meta, "tta": tta_name(meta["tta"])}
    scores = read_parquet_per_file(scores_dir)
    stats = pool_stats(scores, cfg.threshold, len(classes), progress)
    check_usable(stats, cfg, classes)
    kept = scores.map_batches(_keep, batch_format="pandas", fn_kwargs={"threshold": cfg.threshold})
    rows = stats.kept
    if cfg.balance:
        k = cfg.per_class or default_per_class(pd.Series(stats.kept_per_class))
        kept = balance(kept, stats.kept_per_class, k, seed, pool_root)
        rows = k * sum(1 for n in stats.kept_per_class if n > 0)
    labels = kept.map_batches(_to_pseudo_labels, batch_format="pandas",
                              fn_kwargs={"cfg": cfg, "meta": meta})
    target = out_dir / "pseudo_labels"
    labels.write_parquet(str(target), min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0.5})
    return str(target), stats, rows


def stats_metrics(stats: PoolStats, rows: int, classes: list[str]) -> dict[str, float]:
    """Namespaced MLflow metrics for one pseudo-labelling pass."""
    metrics = {
        "pseudo/scored": stats.scored,
        "pseudo/kept": stats.kept,
        "pseudo/kept_fraction": stats.kept / stats.scored if stats.scored else 0.0,
        "pseudo/rows_after_balance": rows,
        "pseudo/rejected": stats.rejected_count,
        "pseudo/non_finite_logits": stats.non_finite_count,
    }
    for q in (0.1, 0.5, 0.9):
        metrics[f"pseudo/confidence_p{int(q * 100)}"] = stats.confidence_quantile(q)
    for name, count in zip(classes, stats.kept_per_class):
        metrics[f"pseudo/kept_class_{name}"] = count
    if stats.kept_with_truth:
        metrics["pseudo/accuracy"] = stats.kept_correct / stats.kept_with_truth
    return metrics


def stats_record(stats: PoolStats) -> dict[str, Any]:
    record = asdict(stats)
    record.pop("rejected")
    record.pop("non_finite")
    return record
