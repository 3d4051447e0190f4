"""Pseudo-label policies on plain arrays: temperature, threshold, per-class balancing.

Pure numpy/pandas, so they test in milliseconds; `stages/pseudo_label.py` runs them over the
scored pool with Ray Data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(z / T), computed stably. T < 1 sharpens, T > 1 softens."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def targets(logits: np.ndarray, temperature: float, soft: bool) -> np.ndarray:
    """The student's target per row: softmax(z/T), or one-hot of the teacher's argmax.

    Noisy Student (Xie et al. 2020, Sec. 2) uses soft or hard pseudo-labels; soft ones worked
    slightly better, notably for out-of-domain unlabeled data (Sec. 4.1).
    """
    if soft:
        return softmax(logits, temperature).astype(np.float32)
    hard = np.zeros(np.shape(logits), dtype=np.float32)
    hard[np.arange(len(hard)), np.argmax(logits, axis=1)] = 1.0
    return hard


def confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's predicted class and its probability at T = 1 (what τ is compared with)."""
    probs = softmax(logits)
    label = probs.argmax(axis=1)
    return label, probs[np.arange(len(label)), label]


def default_per_class(kept_counts: pd.Series) -> int:
    """k when the user gives none: the median kept count over classes that kept any."""
    nonzero = kept_counts[kept_counts > 0]
    return max(int(np.median(nonzero)), 1) if len(nonzero) else 0


def balance_class(rows: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """Exactly k rows of one class: the k most confident, or all of them plus random repeats.

    This is the data balancing of Noisy Student (Sec. 3.1): "we duplicate images in classes
    where there are not enough images. For classes where we have too many images, we take the
    images with the highest confidence."
    """
    if len(rows) == 0 or k <= 0:
        return rows.iloc[0:0]
    ranked = rows.sort_values("confidence", ascending=False, kind="stable")
    if len(ranked) >= k:
        return ranked.iloc[:k]
    repeats = np.random.default_rng(seed).integers(0, len(ranked), size=k - len(ranked))
    return pd.concat([ranked, ranked.iloc[repeats]], ignore_index=True)
