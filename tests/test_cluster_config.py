"""The cluster configs pass the validation that `ray up` runs before it starts any machine, keep
the job API on loopback, and the KubeRay RayJob names a pipeline of this repository."""

import copy
import shlex

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def _load(name):
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture
def cluster():
    return _load("cluster.yaml")


def test_cluster_yaml_is_valid_for_ray_up(cluster):
    validate_config(prepare_config(cluster))
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head takes no training work
    assert any(t["resources"].get("GPU", 0) >= 1 for t in cluster["available_node_types"].values())


def test_onprem_cluster_yaml_is_valid_for_ray_up():
    onprem = _load("cluster-onprem.yaml")
    prepared = prepare_config(onprem)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(onprem["provider"]["worker_ips"]) == 2


@pytest.mark.parametrize("name", CONFIGS)
def test_the_job_api_stays_on_loopback(name):
    # prepare_config merges the provider's defaults, as `ray up` does (AWS's say 0.0.0.0).
    commands = " ".join(prepare_config(_load(name))["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands
    assert "RAY_AUTH_MODE=disabled" not in (REPO / name).read_text()


def test_a_typo_in_cluster_yaml_is_refused(cluster):
    broken = copy.deepcopy(cluster)
    broken["idle_timout_minutes"] = broken.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_runs_a_pipeline_of_this_repository():
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["selftrain", "run"] and (REPO / command[2]).is_file(), command
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert "@" not in runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]  # no credentials in the manifest
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
