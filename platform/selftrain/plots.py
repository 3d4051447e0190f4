"""Figures for each run (matplotlib, headless). Pure: arrays in, a Figure out; no MLflow here."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(classes), 1 + 0.45 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
           yticklabels=classes, xlabel="predicted", ylabel="true", title=title)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
    fig.tight_layout()
    return fig


def confidence_histogram(kept: Sequence[int], dropped: Sequence[int], threshold: float, title: str) -> Figure:
    """The teacher's confidence over the pool; bars right of τ were kept as pseudo-labels."""
    edges = np.linspace(0.0, 1.0, len(kept) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], dropped, width=np.diff(edges), align="edge", color="tab:gray", label="dropped")
    ax.bar(edges[:-1], kept, width=np.diff(edges), align="edge", bottom=dropped, color="tab:blue", label="kept")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"τ = {threshold}")
    ax.set(xlabel="teacher confidence", ylabel="pool images", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def class_counts(counts: Sequence[int], classes: Sequence[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes)), 3.5))
    ax.bar(range(len(classes)), counts, color="tab:blue")
    ax.set(xticks=range(len(classes)), xticklabels=classes, xlabel="pseudo-label", ylabel="kept images", title=title)
    fig.tight_layout()
    return fig


def accuracy_per_iteration(accuracies: Sequence[float], models: Sequence[str], baseline: float | None = None) -> Figure:
    """Test accuracy of the teacher (0) and each student; `baseline`, the teacher's architecture
    trained on the labeled images alone, as a dashed line when there is one."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(accuracies)), accuracies, marker="o", label="teacher, students")
    if baseline is not None:
        ax.axhline(baseline, color="tab:gray", linestyle="--", label="baseline (labeled only)")
        ax.legend(fontsize=7)
    ax.set(xticks=range(len(accuracies)), xticklabels=[f"{i}\n{m}" for i, m in enumerate(models)],
           xlabel="iteration (0 = teacher)", ylabel="test accuracy", title="test accuracy per iteration")
    fig.tight_layout()
    return fig


def sweep_objective(trials: pd.DataFrame, keys: Sequence[str], objective: str) -> Figure:
    """The objective against each swept key, one panel per key; failed trials are left out,
    trials ASHA stopped early are hollow (their objective is from fewer epochs)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.5), squeeze=False)
    scored = trials[trials[objective].notna()]
    for ax, key in zip(axes[0], keys):
        values = scored[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        positions = values.astype(float) if numeric else values.astype(str).map(
            {v: i for i, v in enumerate(sorted(values.astype(str).unique()))})
        early = (scored["status"] == "stopped_early").to_numpy()
        ax.scatter(positions[~early], scored[objective][~early], color="tab:blue", label="completed")
        ax.scatter(positions[early], scored[objective][early], facecolors="none", edgecolors="tab:blue",
                   label="stopped early")
        if not numeric:
            ax.set_xticks(range(values.astype(str).nunique()), sorted(values.astype(str).unique()))
        ax.set(xlabel=key, ylabel=objective)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep: {objective} per trial")
    fig.tight_layout()
    return fig


def objective_per_trial(trials: pd.DataFrame, objective: str, best: str | None = None) -> Figure:
    """One bar per trial (`trial_id`, `status`, `objective`): completed solid, stopped early
    hatched, the best one orange; failed trials have no bar."""
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.3 * len(trials)))
    values = trials[objective].astype(float).fillna(0.0)
    colors = ["tab:orange" if t == best else "tab:blue" for t in trials["trial_id"]]
    bars = ax.barh(range(len(trials)), values, color=colors)
    for bar, status in zip(bars, trials["status"]):
        if status == "stopped_early":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.set(yticks=range(len(trials)), yticklabels=[f"{t} ({s})" for t, s in zip(trials["trial_id"], trials["status"])],
           xlabel=objective, title=f"sweep: {objective} per trial")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
