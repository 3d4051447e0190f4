"""The MLflow UI, in real headless Chromium, shows what a pipeline records: a parent run with its
child runs and a plot that renders. The store is filled through the project's own Tracker and
served by a real `mlflow server`; Chromium is Debian's (`.ci/run` installs it), driven by Playwright."""

from __future__ import annotations

import time

from playwright.sync_api import expect, sync_playwright

from conftest import chromium_path
from mlflow_server import mlflow_server
from selftrain.plots import accuracy_per_iteration
from selftrain.tracking import DatasetRecord, Tracker

CHILDREN = ["iter0-teacher-resnet18", "iter1-student-resnet18"]
START = time.monotonic()
WAIT_MS = 45_000  # the React app renders after its API calls; on a loaded 2-core machine, slowly


def _fill(tracker: Tracker) -> tuple[str, str]:
    parent = tracker.start_run("pipeline-parent")
    children = [tracker.start_run(name, parent_id=parent) for name in CHILDREN]
    tracker.log_metrics(children[1], {"eval/accuracy": 0.9})
    tracker.log_datasets(parent, [DatasetRecord("labeled", "/data/labeled", 50, "0123abcd", "training")])
    tracker.log_figure(children[1], accuracy_per_iteration([0.8, 0.9], ["resnet18", "resnet18"]),
                       "accuracy_per_iteration.png")  # 5 x 3.5 in at 100 dpi: 500 x 350 px
    for run in [*children, parent]:
        tracker.finish(run)
    return parent, children[1]


def test_mlflow_ui_shows_the_run_tree_and_a_plot(tmp_path):
    chromium = chromium_path()
    with mlflow_server(tmp_path) as (url, _), sync_playwright() as playwright:
        tracker = Tracker("ui-check", url)
        parent, student = _fill(tracker)
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            experiment = f"{url}/#/experiments/{tracker.experiment_id}"

            page.goto(f"{experiment}/runs")
            expect(page.get_by_text("pipeline-parent").first).to_be_visible(timeout=WAIT_MS)
            # The Dataset column names what the run read (the pipelines log theirs as dataset inputs).
            expect(page.get_by_text("labeled (0123abcd)").first).to_be_visible(timeout=WAIT_MS)
            _screenshot(page, tmp_path / "runs.png")

            page.goto(f"{experiment}/runs/{parent}")  # the parent's overview lists its child runs
            expect(page.get_by_text("Child runs", exact=True)).to_be_visible(timeout=WAIT_MS)
            for child in CHILDREN:
                expect(page.get_by_role("link", name=child)).to_be_visible(timeout=WAIT_MS)
            _screenshot(page, tmp_path / "parent_run.png")

            page.goto(f"{experiment}/runs/{student}/artifacts/plots/accuracy_per_iteration.png")
            plot = page.locator("img[src^='blob:']").first  # the UI fetches the artifact, shows a blob
            expect(plot).to_be_visible(timeout=WAIT_MS)
            size = plot.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            _screenshot(page, tmp_path / "plot.png")
            assert size == [500, 350], size
        finally:
            browser.close()


def _screenshot(page, path) -> None:
    page.screenshot(path=str(path))
    print(f"screenshot: {path} ({time.monotonic() - START:.0f} s)")
