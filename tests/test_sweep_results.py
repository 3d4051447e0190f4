"""The sweep's bookkeeping: validation split, choosing the best trial, reading trial errors."""

from __future__ import annotations

import pandas as pd
import pytest

from selftrain import plots
from selftrain.errors import DataError, SweepError
from selftrain.sweep import choose_best, sweep_table
from selftrain.sweep_results import _first_line, split_validation


def _labeled(per_class: list[int]) -> pd.DataFrame:
    rows = [(f"/x/{c}/{i}.png", c) for c, n in enumerate(per_class) for i in range(n)]
    return pd.DataFrame(rows, columns=["path", "label"])


def test_validation_split_is_stratified_disjoint_and_seeded():
    labeled = _labeled([10, 10, 4, 2])
    train, validation = split_validation(labeled, 0.3, seed=0)
    assert validation["label"].value_counts().sort_index().tolist() == [3, 3, 1, 1]
    assert train["label"].value_counts().sort_index().tolist() == [7, 7, 3, 1]
    assert not set(train["path"]) & set(validation["path"])
    assert len(train) + len(validation) == len(labeled)
    again, _ = split_validation(labeled, 0.3, seed=0)
    assert again.equals(train)
    other, _ = split_validation(labeled, 0.3, seed=1)
    assert set(other["path"]) != set(train["path"])


def test_a_class_with_one_labeled_image_cannot_be_split():
    with pytest.raises(DataError, match=r"\[1\]"):
        split_validation(_labeled([5, 1, 5]), 0.2, seed=0)


def _trial(trial_id, objective, status="completed", error=None, threshold=0.5):
    return {"trial_id": trial_id, "params": {"pseudo_label.threshold": threshold}, "objective": objective,
            "status": status, "error": error}


def test_best_trial_is_the_highest_objective_among_trials_that_trained_to_the_end():
    trials = [_trial("a", 0.7), _trial("b", 0.9, "stopped_early"), _trial("c", None, "failed", "boom"),
              _trial("d", 0.8)]
    assert choose_best(trials)["trial_id"] == "d"
    stopped = [_trial("a", 0.6, "stopped_early"), _trial("b", 0.7, "stopped_early"), _trial("c", None, "failed", "x")]
    assert choose_best(stopped)["trial_id"] == "b"  # none trained to the end: the best of the rest


def test_every_trial_failing_is_one_error_listing_each_trial_and_why():
    trials = [_trial("a", None, "failed", "pseudo_label.threshold=0.99 keeps 0 of 1297 pool images", 0.99),
              _trial("b", None, "failed", "loss became nan", 0.5)]
    with pytest.raises(SweepError) as info:
        choose_best(trials)
    message = str(info.value)
    assert "all 2 trials failed" in message
    assert "trial a (pseudo_label.threshold=0.99): pseudo_label.threshold=0.99 keeps 0" in message
    assert "trial b (pseudo_label.threshold=0.5): loss became nan" in message


def test_trial_errors_are_cut_to_our_own_message():
    wrapped = RuntimeError("ray::ImplicitFunc.train()\n  File x\nselftrain.errors.PseudoLabelError: "
                           "pseudo_label.threshold=0.99 keeps 0 of 10 pool images\n\nmore")
    assert _first_line(wrapped) == "pseudo_label.threshold=0.99 keeps 0 of 10 pool images"
    assert _first_line(ValueError("a\nlast line")) == "last line"
    assert _first_line(None) is None


def test_objective_plot_has_one_panel_per_swept_key():
    trials = pd.DataFrame({"pseudo_label.threshold": [0.3, 0.3, 0.8, 0.8], "pseudo_label.temperature": [0.5, 2.0, 0.5, 2.0],
                           "val/accuracy": [0.8, 0.9, None, 0.7],
                           "status": ["completed", "stopped_early", "failed", "completed"]})
    fig = plots.sweep_objective(trials, ["pseudo_label.threshold", "pseudo_label.temperature"], "val/accuracy")
    axes = fig.get_axes()
    assert [ax.get_xlabel() for ax in axes] == ["pseudo_label.threshold", "pseudo_label.temperature"]
    assert sum(len(c.get_offsets()) for c in axes[0].collections) == 3  # the failed trial is left out
    plots.close(fig)


def test_sweep_table_when_no_trial_left_a_final_model_and_mlflow_went_away():
    """Printed after the whole sweep has run: it must not crash on a missing test accuracy."""
    trials = [{"params": {"pseudo_label.threshold": t}, "status": "stopped_early", "epochs": 1,
               "objective": o, "trial_id": i} for i, (t, o) in enumerate([(0.3, 0.61), (0.8, 0.72)])]
    summary = {"trials": trials, "best_trial": 1, "best_params": {"pseudo_label.threshold": 0.8},
               "best_val_accuracy": 0.72, "best_test_accuracy": None, "teacher_scoring_passes": 1,
               "best_config": "out/best_config.yaml",
               "tracking_errors": [{"message": "MLflow at http://h:5000 stopped answering; not logged: 3 tags"}]}
    text = sweep_table(summary)
    assert "test accuracy none (ASHA stopped every trial early" in text
    assert text.index("0.7200") < text.index("0.6100")  # best first
    assert text.endswith("not logged: 3 tags")


def test_a_finished_trials_leftover_placement_group_is_removed(ray_session, tmp_path):
    """What a trial stopped by ASHA leaves reserved (ray issue 54305) is given back, once."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from selftrain.sweep import release_placement_groups

    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)
    record = tmp_path / "placement_groups.txt"
    record.write_text(group.id.hex() + "\n" + group.id.hex() + "\n")  # a restarted worker group writes again
    assert placement_group_table()[group.id.hex()]["state"] == "CREATED"
    assert release_placement_groups(record) == [group.id.hex()]
    assert placement_group_table()[group.id.hex()]["state"] == "REMOVED"
    assert release_placement_groups(record) == []  # already gone: nothing to do
    assert release_placement_groups(tmp_path / "none.txt") == []
