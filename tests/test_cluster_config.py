"""cluster.yaml passes the validation that `ray up` runs before it starts any machine."""

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


@pytest.fixture
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray_up(cluster):
    validate_config(prepare_config(cluster))
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head takes no training work
    assert any(t["resources"].get("GPU", 0) >= 1 for t in cluster["available_node_types"].values())


def test_a_typo_in_cluster_yaml_is_refused(cluster):
    broken = copy.deepcopy(cluster)
    broken["idle_timout_minutes"] = broken.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        validate_config(prepare_config(broken))
