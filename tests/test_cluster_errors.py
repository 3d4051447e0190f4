"""Joining a cluster that cannot run the pipeline fails early, naming what is wrong."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, run_smoke_subprocess
from selftrain.errors import ClusterError
from selftrain.ray_runtime import REQUIRED_MODULES, check_cluster_dependencies


def test_no_cluster_at_ray_address_fails_in_seconds(tmp_path):
    # A fresh process: ray.init state is per process. Ray 2.60's ray.init alone retries for minutes.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": str(REPO / "platform"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done, elapsed = run_smoke_subprocess(env, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "selftrain: error: no Ray cluster answers at 127.0.0.1:1 (RAY_ADDRESS)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_every_node_is_checked_and_a_missing_module_is_named(ray_session):
    check_cluster_dependencies()  # the local Ray's node has the project: passes
    with pytest.raises(ClusterError) as raised:
        check_cluster_dependencies((*REQUIRED_MODULES, "selftrain_missing_dependency"))
    message = str(raised.value)
    assert "selftrain_missing_dependency (ModuleNotFoundError" in message
    assert message.count("Error") == 1  # only the missing module is listed, once (one node)
    assert "setup_commands in cluster.yaml" in message and "--working-dir" in message
