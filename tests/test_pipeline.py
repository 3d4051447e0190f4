"""The smoke pipeline end to end through the CLI, on the shared local Ray and a real MLflow store."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from PIL import Image
from playwright.sync_api import sync_playwright

from selftrain.cli import main
from selftrain.data.augment import to_model_input
from selftrain.data.decode import decode_image
from selftrain.training.loop import load_model

from conftest import (REPO, chromium_path, copy_tree, digits_overrides, experiment_runs, external_references,
                      page_data, tracking_uri_set, write_corrupt_files)

SMOKE = str(REPO / "pipelines" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke(ray_session, digits, tmp_path_factory):
    """smoke.yaml over folders whose pool holds three corrupt files. Its first driver is SIGKILLed
    (no handler runs, as with the OOM killer) while it scores the pool; the same command again
    finishes the run. Every test below checks that resumed run."""
    root = tmp_path_factory.mktemp("smoke")
    # Rows are seeded by their paths below the data's roots, so the seeded run's numbers are the
    # same under any of pytest's numbered temp folders.
    data = SimpleNamespace(labeled=copy_tree(digits.labeled, root / "data" / "labeled"),
                           test=copy_tree(digits.test, root / "data" / "test"))
    pool = copy_tree(digits.unlabeled, root / "data" / "pool")
    bad = write_corrupt_files(pool / "4")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [SMOKE, f"output_dir={root / 'run'}", *digits_overrides(data, pool)]
    # The first driver joins this session's Ray, so killing it leaves the cluster running, as a
    # crashed `ray job` driver would.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "selftrain.cli", "run", *args], env=env, cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in first.stdout:  # until the teacher is done and the pool pass has begun
            seen.append(line)
            if "scores the pool" in line:
                break
    finally:
        first.send_signal(signal.SIGKILL)
        seen.append(first.communicate(timeout=60)[0])
    console = io.StringIO()  # what a user sees, not a terminal (a Ray job's log, CI)
    with tracking_uri_set(uri):
        with contextlib.redirect_stdout(console):
            code = main(["run", *args])
        yield {"code": code, "args": args, "root": root, "bad": bad, "client": MlflowClient(uri),
               "summary_path": root / "run" / "summary.json", "console": console.getvalue(),
               "killed_console": "".join(seen), "killed_code": first.returncode}


def _summary(smoke):
    return json.loads(smoke["summary_path"].read_text())


def _runs(smoke):
    return experiment_runs(smoke["client"], "smoke")


def test_summary_reports_every_iteration_and_every_unreadable_file(smoke, capsys):
    assert smoke["code"] == 0
    summary = _summary(smoke)
    assert [(e["iteration"], e["role"], e["model"]) for e in summary["iterations"]] == [
        (0, "teacher", "cnn_tiny"), (1, "student", "cnn_tiny")]
    teacher, student = summary["iterations"]
    assert teacher["pseudo_labels_kept"] == 0 and student["pseudo_labels_kept"] == 1297  # τ = 0 keeps all
    # Learned, not guessed: 10 classes, chance 0.10. Noisy Student's point, on this seeded run:
    # the student at least matches its teacher (measured: teacher 0.83, student 0.86).
    assert teacher["test_accuracy"] >= 0.5 and student["test_accuracy"] >= teacher["test_accuracy"]
    assert summary["final_test_accuracy"] == student["test_accuracy"]
    assert sorted(r["path"] for r in summary["rejected"]) == sorted(smoke["bad"])
    assert all(r["reason"] for r in summary["rejected"])
    assert summary["rejected_count"] == len(smoke["bad"])
    labels = pd.read_parquet(student["pseudo_labels"])
    assert len(labels) == student["train_rows"] - 50 and labels["iteration"].eq(1).all()
    # The reported pseudo-label accuracy is the teacher's scores against the pool's class folders,
    # over every kept image (τ = 0: every readable one), recomputed here from the scores Parquet.
    scores = pd.read_parquet(smoke["root"] / "run" / "iter1" / "scoring" / "scores")
    good = scores[scores["error"] == ""]
    assert len(good) == 1297
    assert student["pseudo_label_accuracy"] == pytest.approx((good["prediction"] == good["label"]).mean())
    assert student["pseudo_label_accuracy"] >= 0.5


def _by(elements, metric, key="key"):
    """{the `key` attribute: (exact value, shown text)} of the page's elements of `metric`."""
    return {e.get(key): (e["value"], e["text"]) for e in elements if e.get("metric") == metric}


def _check_report_numbers(elements, smoke):
    """The page shows what the run wrote: accuracies, pseudo-label counts and stage seconds of
    summary.json, per-class counts of state.json, each confusion matrix as recounted from that
    model's test_predictions.parquet (whose accuracy is the summary's)."""
    summary = _summary(smoke)
    models = {f"iter{r['iteration']}": r for r in summary["iterations"]}
    assert _by(elements, "test_accuracy") == {k: (repr(r["test_accuracy"]), f"{r['test_accuracy']:.4f}")
                                              for k, r in models.items()}
    assert _by(elements, "pseudo_labels_kept") == {k: (str(r["pseudo_labels_kept"]),) * 2 for k, r in models.items()}
    state = json.loads((smoke["root"] / "run" / "state.json").read_text())
    per_class = state["records"]["iter1/pseudo_labels"]["stats"]["kept_per_class"]
    assert _by(elements, "pseudo_kept_class", "class-index") == {str(c): (str(n),) * 2 for c, n in enumerate(per_class)}
    assert _by(elements, "pseudo_kept_total", "iteration") == {"1": (str(models["iter1"]["pseudo_labels_kept"]),) * 2}
    assert _by(elements, "stage_seconds", "stage") == {k: (repr(v), f"{v:.1f}") for k, v in summary["stage_seconds"].items()}
    assert _by(elements, "rejected-count", "metric")["rejected-count"][0] == str(summary["rejected_count"]) == "3"
    for key, record in models.items():
        rows = pd.read_parquet(record["test_predictions"])
        good = rows[rows["error"] == ""]
        expected = np.zeros((10, 10), dtype=int)
        np.add.at(expected, (good["label"], good["prediction"]), 1)
        assert np.trace(expected) / expected.sum() == record["test_accuracy"]
        shown = np.full((10, 10), -1)
        for e in elements:
            if e.get("metric") == "confusion" and e["key"] == key:
                shown[int(e["true"]), int(e["predicted"])] = int(e["value"])
        assert (shown == expected).all(), key


def test_report_shows_the_runs_own_numbers_in_one_self_contained_file(smoke, capsys):
    run_dir = smoke["root"] / "run"
    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    html = (run_dir / "report.html").read_text()
    assert external_references(html) == [] and "<script" not in html.lower()
    assert "default-src 'none'" in html  # the browser may fetch nothing, not even by mistake
    elements = page_data(html)
    _check_report_numbers(elements, smoke)
    figures = sorted(e["figure"] for e in elements if e["tag"] == "img")
    assert figures == ["accuracy", "class-counts", "confidence", "confusion", "confusion"]
    assert [e["status"] for e in elements if "status" in e] == ["finished"]


def test_report_renders_in_headless_chromium(smoke, tmp_path):
    """The page as a reader sees it: every figure decodes, no request leaves the file, and the
    numbers read back from the rendered DOM are summary.json's."""
    chromium = chromium_path()
    target = tmp_path / "shared" / "smoke-report.html"  # --out: anywhere, e.g. to attach
    assert main(["report", str(smoke["root"] / "run"), "--out", str(target)]) == 0
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(target.as_uri(), wait_until="load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            elements = page.eval_on_selector_all(
                "[data-metric], [data-figure], [data-status]",
                "els => els.map(e => ({...e.dataset, tag: e.tagName.toLowerCase(), text: e.innerText.trim()}))")
            screenshot = tmp_path / "smoke-report.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
        finally:
            browser.close()
    assert requests == [target.as_uri()]
    assert len(sizes) == 5 and all(done and w >= 400 and h >= 300 for done, w, h in sizes), sizes
    summary = _summary(smoke)
    assert _by(elements, "test_accuracy") == {f"iter{r['iteration']}": (repr(r["test_accuracy"]), f"{r['test_accuracy']:.4f}")
                                              for r in summary["iterations"]}
    assert _by(elements, "pseudo_labels_kept")["iter1"] == ("1297", "1297")
    assert _by(elements, "pseudo_kept_total", "iteration") == {"1": ("1297", "1297")}
    with Image.open(screenshot) as image:
        assert image.width == 1200 and image.height > 2000
        assert np.asarray(image.convert("L")).std() > 20  # drawn, not a blank page


def test_report_of_an_unfinished_run_shows_what_is_done_and_names_what_is_missing(smoke, tmp_path):
    partial = copy_tree(smoke["root"] / "run", tmp_path / "run")
    (partial / "summary.json").unlink()
    state = json.loads((partial / "state.json").read_text())
    for key in ("iter1/result", "seconds/iter1/student"):  # stopped while the student trained
        del state["records"][key]
    (partial / "state.json").write_text(json.dumps(state))
    assert main(["report", str(partial)]) == 0
    html = (partial / "report.html").read_text()
    elements = page_data(html)
    teacher = _summary(smoke)["iterations"][0]
    assert _by(elements, "test_accuracy") == {"iter0": (repr(teacher["test_accuracy"]), f"{teacher['test_accuracy']:.4f}")}
    assert _by(elements, "pseudo_kept_total", "iteration") == {"1": ("1297", "1297")}  # its pseudo-labels are done
    assert [e["status"] for e in elements if "status" in e] == ["unfinished"]
    assert "iteration 1 (cnn_tiny): student" in html and "summary.json: the run has not finished" in html
    assert sorted(e["figure"] for e in elements if e["tag"] == "img") == ["accuracy", "class-counts", "confidence",
                                                                          "confusion"]


def test_mlflow_holds_one_parent_and_one_child_per_model(smoke):
    summary, client = _summary(smoke), smoke["client"]
    runs = _runs(smoke)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    assert [r.info.run_id for r in parent] == [summary["mlflow_run_id"]]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert parent[0].data.params["pseudo_label.threshold"] == "0.0"
    assert parent[0].data.metrics["eval/final_accuracy"] == pytest.approx(summary["final_test_accuracy"])
    teacher, student = children
    assert teacher.data.params["role"] == "teacher" and student.data.params["role"] == "student"
    assert len(client.get_metric_history(teacher.info.run_id, "train/loss")) == 15  # one per epoch
    assert student.data.metrics["eval/accuracy"] == pytest.approx(summary["final_test_accuracy"])
    assert student.data.metrics["pseudo/kept_fraction"] == 1.0
    assert "pseudo/accuracy" in student.data.metrics and "pseudo/confidence_p50" in student.data.metrics
    artifacts = {a.path for a in client.list_artifacts(student.info.run_id)}
    assert {"config.json", "confusion_matrix.json"} <= artifacts
    # Each model is an MLflow model of its run (a LoggedModel in the run's experiment), with
    # selftrain's own model.pt + model.json inside.
    for child, record in zip(children, summary["iterations"]):
        [output] = child.outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        assert (logged.name, logged.source_run_id, logged.status) == ("model", child.info.run_id, LoggedModelStatus.READY)
        assert logged.experiment_id == parent[0].info.experiment_id and output.model_id == record["mlflow_model_id"]
    files = {a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=f"runs:/{student.info.run_id}/model")}
    assert {"model/MLmodel", "model/requirements.txt", "model/input_example.json", "model/code",
            "model/extra_files"} <= files
    assert {a.path for a in client.list_artifacts(student.info.run_id, "plots")} == {
        "plots/confusion_matrix.png", "plots/confidence_histogram.png", "plots/pseudo_label_counts.png"}
    assert {a.path for a in client.list_artifacts(teacher.info.run_id, "plots")} == {"plots/confusion_matrix.png"}
    assert "plots/accuracy_per_iteration.png" in {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")}


def test_a_driver_killed_while_scoring_resumes_with_one_mlflow_run_per_stage(smoke):
    killed = smoke["killed_console"]
    assert smoke["killed_code"] == -signal.SIGKILL and "[iteration 1] teacher cnn_tiny scores the pool" in killed
    assert "summary: " not in killed  # it died mid-run
    console = smoke["console"]  # the same command again: the teacher is done, the pool pass is redone
    assert smoke["code"] == 0 and "resuming" in console
    assert "training teacher" not in console and "scores the pool" in console
    runs = _runs(smoke)
    assert sorted(r.data.tags["selftrain.role"] for r in runs) == ["pipeline", "student", "teacher"]
    assert {r.info.status for r in runs} == {"FINISHED"}  # the dead driver's RUNNING runs were re-opened


def test_console_shows_progress_and_the_table_and_sends_ray_output_to_the_log(smoke):
    lines = smoke["console"].splitlines()
    assert len(lines) < 60, smoke["console"]
    text = smoke["console"]
    # Progress of each long stage, as lines (not a terminal): the teacher's last epoch (shown by
    # the first driver), the scoring pass and the student's (by the one that resumed).
    assert "[iteration 0] teacher cnn_tiny: epoch 15/15  loss" in smoke["killed_console"]
    assert "[iteration 1] student cnn_tiny: epoch 5/5  loss" in text
    scored = [line for line in lines if "[iteration 1] scoring the pool: " in line]
    assert scored and "1,300 images" in scored[-1] and "3 unreadable" in scored[-1]  # 1,297 good + 3 corrupt
    # The pseudo-labelling pass over the same scores, counted from its parts as they arrive.
    labelled = [line for line in lines if "[iteration 1] pseudo-labelling: " in line]
    assert labelled and "1,300 images" in labelled[-1] and "3 unreadable" in labelled[-1]
    assert "iteration    role    model" in text and "summary: " in text
    # Ray's own output (execution plans, training reports) is in the run's log file, not here.
    assert "Execution plan" not in text and "Reporting training result" not in text
    logs = sorted((smoke["root"] / "run" / "logs").glob("run-*.log"))  # one per command
    assert len(logs) == 2 and f"log: {logs[-1]}" in text and f"log: {logs[0]}" in smoke["killed_console"]
    assert "Execution plan" in logs[-1].read_text()


def test_registered_final_model_loads_as_pyfunc_and_gives_the_final_models_logits(smoke, digits):
    summary, client = _summary(smoke), smoke["client"]
    final = summary["iterations"][-1]
    best = client.get_model_version_by_alias("smoke", "best")
    assert summary["registered_model"]["uri"] == f"models:/smoke/{best.version}"
    assert (best.run_id, best.source) == (final["mlflow_run_id"], f"models:/{final['mlflow_model_id']}")
    assert float(best.tags["test_accuracy"]) == final["test_accuracy"]
    # Real test images of every class, decoded and normalised as the scorer does.
    paths = [next(iter(sorted(Path(digits.test, c).glob("*.png")))) for c in summary["classes"]]
    images = torch.from_numpy(np.stack([decode_image(p.read_bytes(), 16) for p in paths])).permute(0, 3, 1, 2)
    batch = to_model_input(images).numpy()
    pyfunc = mlflow.pyfunc.load_model("models:/smoke@best")
    assert [s.shape for s in pyfunc.metadata.signature.inputs.inputs] == [(-1, 3, 16, 16)]
    model, _ = load_model(final["model_dir"])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(pyfunc.predict(batch), expected, rtol=1e-5, atol=1e-5)
    # Pinned, never inferred: MLflow, torch and torchvision as installed (without a +cu label).
    import torchvision

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/smoke@best")).read_text().split()
    assert requirements == [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                            f"torchvision=={torchvision.__version__.split('+')[0]}"]


def test_every_run_names_its_datasets_and_its_source(smoke, digits):
    summary, runs = _summary(smoke), _runs(smoke)
    teacher, student = summary["iterations"]
    test_images = len(list(Path(digits.test).rglob("*.png")))
    expected = {"labeled": teacher["train_rows"], "unlabeled": 1297,  # readable pool images (3 unreadable)
                "pseudo_labels_iter1": student["train_rows"] - teacher["train_rows"], "test": test_images}
    assert {name: d["rows"] for name, d in summary["datasets"].items()} == expected
    assert summary["datasets"]["unlabeled"]["unreadable"] == len(smoke["bad"])

    def inputs(run):
        return {d.dataset.name: (json.loads(d.dataset.profile)["num_rows"], d.dataset.digest,
                                 [t.value for t in d.tags if t.key == "mlflow.data.context"])
                for d in run.inputs.dataset_inputs}

    by_role = {r.data.tags["selftrain.role"]: inputs(r) for r in runs}
    for role, names in (("pipeline", set(expected)), ("teacher", {"labeled", "test"}), ("student", set(expected))):
        assert {n: v[0] for n, v in by_role[role].items()} == {n: expected[n] for n in names}, role
        assert all(v[1] == summary["datasets"][n]["digest"] for n, v in by_role[role].items())
    assert by_role["student"]["unlabeled"][2] == ["pseudo_labeling"] and by_role["student"]["test"][2] == ["evaluation"]
    # MLflow's source tags: who ran what, from which commit (of this checkout, when it is one).
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
        if commit.returncode == 0:
            assert tags["mlflow.source.git.commit"] == commit.stdout.strip()


def test_rerun_resumes_without_redoing_stages_or_duplicating_runs(smoke, capsys):
    before = _summary(smoke)
    capsys.readouterr()
    assert main(["run", *smoke["args"]]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "scores the pool" not in out and "training" not in out
    assert _summary(smoke) == before
    assert len(_runs(smoke)) == 3
    assert len(smoke["client"].search_model_versions("name = 'smoke'")) == 1  # not registered twice


def test_another_mlflow_store_for_the_same_output_dir_is_refused(smoke, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert main(["run", *smoke["args"]]) == 2
    assert "was tracked in MLflow store" in capsys.readouterr().err


def test_a_different_config_in_the_same_output_dir_is_refused(smoke, capsys):
    assert main(["run", *smoke["args"], "pseudo_label.threshold=0.3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and "pseudo_label.threshold: 0.0 -> 0.3" in err


def test_nan_loss_stops_with_a_clear_message_and_a_failed_run(smoke, tmp_path, capsys):
    args = [SMOKE, f"output_dir={tmp_path / 'nan'}", "train.lr=1e30", "name=smoke-nan",
            *[a for a in smoke["args"] if a.startswith("data.")]]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err.lower() and "lower train.lr" in err
    client = smoke["client"]
    experiment = client.get_experiment_by_name("smoke-nan")
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"FAILED"}
