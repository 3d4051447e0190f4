"""Sweep files: the search space is checked against the config before anything runs."""

from __future__ import annotations

import pytest
from ray import tune

from selftrain.config import load_config, load_sweep, with_params
from selftrain.errors import ConfigError
from selftrain.ledger import Ledger
from selftrain.sweep import _domain, changes_teacher, max_epochs

from conftest import REPO

BASE = "name: s\ntrain: {student_epochs: 4}\n"


def _sweep(tmp_path, space: str, extra: str = ""):
    path = tmp_path / "sweep.yaml"
    path.write_text(BASE + "sweep:\n" + extra + "  space:\n" + "".join(f"    {line}\n" for line in space.splitlines()))
    return load_sweep(path)


def _error(tmp_path, space: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        _sweep(tmp_path, space, extra)
    return str(info.value)


def test_space_domains_map_to_ray_tune_domains(tmp_path):
    cfg, sweep = _sweep(tmp_path, "pseudo_label.threshold: {grid: [0.3, 0.8]}\n"
                                  "pseudo_label.temperature: {loguniform: [0.5, 4]}\n"
                                  "noise.randaugment_magnitude: {randint: [5, 15]}\n"
                                  "noise.dropout: {uniform: [0.1, 0.5]}\n"
                                  "model.students: {choice: [[resnet18], [resnet34]]}")
    domains = {key: _domain(d) for key, d in sweep.space.items()}
    assert domains["pseudo_label.threshold"] == {"grid_search": [0.3, 0.8]}
    assert isinstance(domains["pseudo_label.temperature"], tune.search.sample.Float)
    assert (domains["pseudo_label.temperature"].lower, domains["pseudo_label.temperature"].upper) == (0.5, 4.0)
    assert isinstance(domains["noise.randaugment_magnitude"], tune.search.sample.Integer)
    assert domains["model.students"].categories == [["resnet18"], ["resnet34"]]
    assert sweep.scheduler == "asha" and cfg.train.student_epochs == 4


def test_unknown_key_in_the_space_is_named_with_the_allowed_keys(tmp_path):
    message = _error(tmp_path, "pseudo_label.treshold: {grid: [0.3]}")
    assert "'pseudo_label.treshold'" in message and "threshold, temperature" in message
    assert "'nosie.dropout'" in _error(tmp_path, "nosie.dropout: {grid: [0.3]}")


def test_a_value_the_key_does_not_allow_is_named(tmp_path):
    message = _error(tmp_path, "pseudo_label.threshold: {grid: [0.3, 1.5]}")
    assert "pseudo_label.threshold" in message and "1.5" in message and "less than 1" in message
    assert "'a'" in _error(tmp_path, "iterations: {choice: [1, a]}")
    assert "low must be below high" in _error(tmp_path, "train.lr: {loguniform: [0.1, 0.01]}")


def test_a_domain_needs_exactly_one_kind_and_a_section_is_not_a_key(tmp_path):
    assert "exactly one of grid" in _error(tmp_path, "train.lr: {grid: [0.1], choice: [0.2]}")
    assert "is a section" in _error(tmp_path, "pseudo_label: {grid: [1]}")


def test_empty_space_and_missing_section_are_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(BASE + "sweep: {num_samples: 2}\n")
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        load_sweep(path)
    path.write_text(BASE)
    with pytest.raises(ConfigError, match="no 'sweep:' section"):
        load_sweep(path)
    assert "sweep.schedular: unknown key" in _error(tmp_path, "train.lr: {grid: [0.1]}", "  schedular: fifo\n").replace(
        "sweep.schedular: Extra inputs are not permitted", "sweep.schedular: unknown key")


def test_a_sweep_file_is_not_a_pipeline():
    with pytest.raises(ConfigError, match="selftrain sweep"):
        load_config(REPO / "pipelines" / "quickstart_sweep.yaml")


def test_trial_params_are_applied_and_validated():
    cfg = load_config(REPO / "pipelines" / "smoke.yaml")
    trial = with_params(cfg, {"pseudo_label.threshold": 0.7, "model.students": ["resnet34"]})
    assert (trial.pseudo_label.threshold, trial.model.students, trial.iterations) == (0.7, ["resnet34"], cfg.iterations)
    with pytest.raises(ConfigError, match="pseudo_label.temperature"):
        with_params(cfg, {"pseudo_label.temperature": -1.0})


def test_which_keys_need_a_teacher_of_their_own():
    assert not any(map(changes_teacher, ["pseudo_label.threshold", "pseudo_label.temperature",
                                         "noise.randaugment_magnitude", "noise.dropout", "model.students",
                                         "iterations", "train.student_epochs"]))
    assert all(map(changes_teacher, ["model.teacher", "train.teacher_epochs", "data.image_size", "seed", "train.lr"]))


def test_asha_horizon_is_the_longest_trial(tmp_path):
    cfg, sweep = _sweep(tmp_path, "iterations: {grid: [1, 3]}\ntrain.student_epochs: {choice: [2, 5]}")
    assert max_epochs(cfg, sweep) == 15
    cfg, sweep = _sweep(tmp_path, "pseudo_label.threshold: {grid: [0.3]}")
    assert max_epochs(cfg, sweep) == 4 * cfg.iterations


def test_resuming_with_a_changed_search_space_is_refused_naming_the_change(tmp_path):
    cfg, sweep = _sweep(tmp_path, "pseudo_label.threshold: {grid: [0.3, 0.8]}")
    Ledger(tmp_path / "out", {"pipeline": cfg.model_dump(), "sweep": sweep.model_dump()}, kind="sweep").put(
        "mlflow_run_id", "r1")  # the first record writes the ledger
    _, changed = _sweep(tmp_path, "pseudo_label.threshold: {grid: [0.3, 0.9]}")
    with pytest.raises(ConfigError) as info:
        Ledger(tmp_path / "out", {"pipeline": cfg.model_dump(), "sweep": changed.model_dump()}, kind="sweep")
    assert "holds a sweep with a different config" in str(info.value)
    assert "sweep.space.pseudo_label.threshold.grid: [0.3, 0.8] -> [0.3, 0.9]" in str(info.value)
