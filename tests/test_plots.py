import numpy as np
import pandas as pd
from PIL import Image

from selftrain import plots


def _pixels(fig, tmp_path, name):
    path = tmp_path / name
    fig.savefig(path)
    plots.close(fig)
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def test_each_figure_renders_something(tmp_path):
    figures = {
        "cm.png": plots.confusion_matrix(np.array([[5, 1], [0, 4]]), ["a", "b"], "cm"),
        "hist.png": plots.confidence_histogram([0] * 50 + [3] * 50, [2] * 50 + [0] * 50, 0.5, "h"),
        "counts.png": plots.class_counts([3, 7], ["a", "b"], "c"),
        "acc.png": plots.accuracy_per_iteration([0.8, 0.9], ["resnet18", "resnet34"]),
        "acc_baseline.png": plots.accuracy_per_iteration([0.8, 0.9], ["resnet18", "resnet34"], baseline=0.7),
        "trials.png": plots.objective_per_trial(pd.DataFrame({
            "trial_id": ["a", "b", "c"], "status": ["completed", "stopped_early", "failed"],
            "val/accuracy": [0.8, 0.5, None]}), "val/accuracy", best="a"),
    }
    for name, fig in figures.items():
        pixels = _pixels(fig, tmp_path, name)
        assert pixels.std() > 10, name  # not a blank canvas


def test_logged_figures_land_under_plots(mlflow_store):
    from selftrain.tracking import Tracker

    tracker = Tracker("exp")
    run = tracker.start_run("r")
    tracker.log_figure(run, plots.class_counts([1, 2], ["a", "b"], "c"), "counts.png")
    assert [a.path for a in tracker.client.list_artifacts(run, "plots")] == ["plots/counts.png"]
