"""Shared fixtures: one local Ray per test session, real image files, a private MLflow store."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (ray.init costs ~5-10 s); stopped by this process."""
    import ray

    from selftrain.ray_runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The built-in digits written as class folders (5 labels per class), shared read-only."""
    from selftrain.data.builtin import materialize_builtin

    return materialize_builtin("digits", str(tmp_path_factory.mktemp("cache")), 5, seed=0)


def digits_overrides(digits, unlabeled=None) -> list[str]:
    """`dotted.key=value` overrides that point a pipeline at the `digits` folders."""
    return [f"data.labeled={digits.labeled}", f"data.unlabeled={unlabeled or digits.unlabeled}",
            f"data.test={digits.test}", "data.unlabeled_has_class_folders=true"]


def experiment_runs(client, experiment: str, filter_string: str = "") -> list:
    """Every run of `experiment` (matching `filter_string`), oldest first."""
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string, order_by=["attributes.start_time ASC"])


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_corrupt_files(folder: Path) -> dict[str, str]:
    """Three unreadable 'images' in `folder`; returns {path: what is wrong}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(np.full((8, 8), 128, dtype=np.uint8))
    files = {
        folder / "empty.png": b"",
        folder / "truncated.png": good[: len(good) // 2],
        folder / "text.jpg": b"this is not an image",
    }
    for path, data in files.items():
        path.write_bytes(data)
    return {str(p): "corrupt" for p in files}


def copy_tree(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def pool_subset(source: str, target: Path, per_class: int) -> Path:
    """The first `per_class` images of each class folder of `source`, copied to `target`: a
    smaller pool where the story under test needs no more (every image is trained on per epoch)."""
    for folder in sorted(p for p in Path(source).iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy2(image, target / folder.name / image.name)
    return target


def run_smoke_subprocess(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`selftrain run pipelines/smoke.yaml` in a fresh process (Ray and MLflow state are per
    process); returns the finished process and its wall time in seconds."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "selftrain.cli", "run", str(REPO / "pipelines" / "smoke.yaml"),
                           f"output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    return done, time.monotonic() - start


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    """predicate()'s first truthy value, polled every 0.2 s; fails naming `what` after `timeout`
    seconds, or at once when `process` (whose output is shown) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended while waiting for {what}:\n{process.stdout.read()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def tracking_uri_set(uri: str):
    """MLFLOW_TRACKING_URI for a module-scoped fixture (monkeypatch is function-scoped)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def chromium_path() -> str:
    """Debian's Chromium (`.ci/run` installs it); Playwright's own download needs a CDN."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 and not os.environ.get("SELFTRAIN_REQUIRE_UI_TEST"):  # CI sets it: fail, never skip
        pytest.skip("chromium is not installed and this user cannot install it (apt-get install -y chromium)")
    pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does it before pytest)")


class _DataElements(HTMLParser):
    """Every element with data- attributes: its attributes (without `data-`) and its text."""

    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []
        self.open: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag, attrs):
        data = {k[5:]: v for k, v in attrs if k.startswith("data-")}
        if tag in self.VOID:
            if data:
                self.found.append({**data, "tag": tag, "text": ""})
            return
        self.open.append((tag, data, []))

    def handle_endtag(self, tag):
        while self.open:
            name, data, text = self.open.pop()
            if data:
                self.found.append({**data, "tag": name, "text": "".join(text).strip()})
            if name == tag:
                return

    def handle_data(self, data):
        for _, _, text in self.open:
            text.append(data)


def page_data(html: str) -> list[dict[str, str]]:
    """The elements of a report page that carry data- attributes (numbers: `value` exact, `text` shown)."""
    parser = _DataElements()
    parser.feed(html)
    parser.close()
    return parser.found


def external_references(html: str) -> list[str]:
    """Every src/href/url() of a page that is not inline data or an in-page anchor."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)|url\(\s*["']?([^"')]+)""", html, flags=re.I)
    return [ref for pair in refs for ref in pair if ref and not ref.startswith(("data:", "#"))]
