from pathlib import Path

import pytest

from selftrain.config import (PipelineConfig, SweepConfig, build_config, diff_configs, load_config, load_sweep,
                              parse_overrides)
from selftrain.errors import ConfigError

from conftest import REPO

PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


def test_pipelines_exist():
    names = {p.name for p in PIPELINES}
    assert {"quickstart.yaml", "smoke.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_loads_and_is_headed_by_its_command(path: Path):
    if "\nsweep:" in path.read_text():
        cfg, sweep = load_sweep(path)
        assert isinstance(sweep, SweepConfig) and sweep.space
        assert path.read_text().splitlines()[0] == f"# selftrain sweep pipelines/{path.name}"
    else:
        cfg = load_config(path)
        assert path.read_text().splitlines()[0] == f"# selftrain run pipelines/{path.name}"
    assert isinstance(cfg, PipelineConfig)


def test_overrides_are_yaml_scalars_at_dotted_keys():
    assert parse_overrides(["iterations=3", "pseudo_label.threshold=0.8", "data.test=/x", "pseudo_label.soft=false"]) == {
        "iterations": 3, "pseudo_label": {"threshold": 0.8, "soft": False}, "data": {"test": "/x"}}


def test_exponent_floats_are_floats_in_files_and_overrides(tmp_path):
    assert parse_overrides(["train.lr=1e-3", "train.weight_decay=5E+4", "seed=12"]) == {
        "train": {"lr": 0.001, "weight_decay": 50000.0}, "seed": 12}
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 2e-2\n")
    assert load_config(path).train.lr == 0.02


def test_override_changes_loaded_config():
    cfg = load_config(REPO / "pipelines/quickstart.yaml", ["iterations=3", "pseudo_label.threshold=0.8"])
    assert (cfg.iterations, cfg.pseudo_label.threshold) == (3, 0.8)


@pytest.mark.parametrize("override", ["iterations", "=3", "a..b=1"])
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides([override])


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"pseudo_label": {"treshold": 0.8}})
    assert "pseudo_label.treshold: unknown key" in str(err.value)
    assert "allowed: threshold, temperature" in str(err.value)


@pytest.mark.parametrize("raw, message", [
    ({"iterations": "3"}, "iterations: Input should be a valid integer (got '3')"),
    ({"iterations": -1}, "iterations: Input should be greater than or equal to 0 (got -1)"),
    ({"pseudo_label": {"threshold": 1.5}}, "pseudo_label.threshold: Input should be less than 1 (got 1.5)"),
    ({"pseudo_label": {"temperature": 0}}, "pseudo_label.temperature: Input should be greater than 0"),
    ({"data": {"builtin": "mnist"}}, "data.builtin: Input should be 'digits', 'cifar10', 'stl10' or 'svhn'"),
    ({"train": {"use_gpu": "yes"}}, "train.use_gpu"),
])
def test_wrong_type_or_range_is_named(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert message in str(err.value)


def test_own_folders_replace_the_builtin_in_the_resolved_config():
    cfg = build_config({"data": {"builtin": "digits", "labeled": "/l", "unlabeled": "/u", "test": "/t"}})
    assert cfg.data.builtin is None and cfg.data.labeled == "/l"


def test_partial_data_paths_name_the_missing_ones():
    with pytest.raises(ConfigError, match=r"data.unlabeled, data.test must be set too"):
        build_config({"data": {"labeled": "/l"}})


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_student_for_each_iteration_repeats_the_last():
    cfg = build_config({"model": {"teacher": "resnet18", "students": ["resnet18", "resnet34"]}})
    assert [cfg.model.student(i) for i in (1, 2, 3)] == ["resnet18", "resnet34", "resnet34"]


def test_diff_configs_names_changed_keys():
    assert diff_configs({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: 2 -> 3"]


@pytest.mark.parametrize("raw, message", [
    ({"scoring": {"num_actors": 0}}, "scoring: Value error, num_actors must be 'auto' or at least 1 (got 0)"),
    ({"scoring": {"num_actors": "many"}}, "scoring.num_actors"),
    ({"scoring": {"max_rejected_fraction": 1.5}}, "scoring.max_rejected_fraction: Input should be less than or equal to 1"),
    ({"scoring": {"gpus_per_actor": 0}}, "scoring.gpus_per_actor: Input should be greater than 0"),
    ({"scoring": {"concurrent_batches": 0}},
     "scoring: Value error, concurrent_batches must be 'auto' or at least 1 (got 0)"),
    ({"scoring": {"concurrent_batches": "lots"}}, "scoring.concurrent_batches"),
])
def test_scoring_knobs_are_checked(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert message in str(err.value)
    assert build_config({"scoring": {"num_actors": 4}}).scoring.num_actors == 4
    assert build_config({}).scoring.num_actors == "auto"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_names_models_and_methods_that_exist(path: Path):
    from selftrain.methods import METHODS
    from selftrain.models.registry import available_models, check_student_sizes
    from selftrain.self_training import check_method_knobs

    cfg, sweep = load_sweep(path) if "\nsweep:" in path.read_text() else (load_config(path), None)
    check_method_knobs(cfg, list(sweep.space) if sweep else [])
    assert {cfg.model.teacher, *cfg.model.students} <= set(available_models())
    assert {cfg.teacher.method, cfg.students.method} <= set(METHODS)
    check_student_sizes(cfg.model.teacher, cfg.model.students, 10)


def test_method_sections_are_strict_and_unset_knobs_stay_unset():
    cfg = build_config({"teacher": {"method": "fixmatch", "threshold": 0.9}})
    assert cfg.teacher.online and not cfg.students.online and cfg.students.method == "noisy_student"
    assert cfg.teacher.knobs() == {"threshold": 0.9, "mu": 7}  # the rest: the method's paper defaults
    with pytest.raises(ConfigError, match=r"teacher.method: Input should be 'supervised', .*'fixmatch'"):
        build_config({"teacher": {"method": "fixmach"}})
    with pytest.raises(ConfigError, match=r"students.threshold: Input should be less than or equal to 1"):
        build_config({"students": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match=r"teacher.tau: unknown key; allowed: method, threshold"):
        build_config({"teacher": {"tau": 0.9}})


def test_warm_started_students_need_their_teachers_architecture():
    assert build_config({"train": {"student_init": "teacher"}}).train.student_init == "teacher"
    with pytest.raises(ConfigError, match=r"student_init=teacher needs each student to have its teacher's "
                                          r"architecture, but student 1 is wrn_28_8 and its teacher wrn_28_2"):
        build_config({"train": {"student_init": "teacher"},
                      "model": {"teacher": "wrn_28_2", "students": ["wrn_28_8"]}})


def test_a_knob_the_method_never_reads_is_refused_before_any_compute():
    from selftrain.self_training import check_method_knobs

    with pytest.raises(ConfigError, match=r"teacher.threshold: method 'freematch' does not read this knob; "
                                          r"it reads: ema_decay, fairness_weight, lambda_u, mu, stats_momentum"):
        check_method_knobs(build_config({"teacher": {"method": "freematch", "threshold": 0.9}}))
    with pytest.raises(ConfigError, match=r"students.temperature: method 'fixmatch' does not read"):
        check_method_knobs(build_config({"students": {"method": "fixmatch"}}), ["students.temperature"])
    check_method_knobs(build_config({"students": {"method": "uda"}}), ["students.temperature", "students.tsa"])


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_config_show_lists_every_key_with_value_default_and_range(path: Path, capsys):
    from selftrain.cli import main

    assert main(["config", "show", str(path), "train.lr=0.123"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line[2:].split(":", 1)[0]: line for line in lines[1:]}
    leaf_keys = _leaves(PipelineConfig().model_dump())
    assert set(leaf_keys) <= set(shown)  # every key of a pipeline, dotted
    assert shown["train.lr"] == "* train.lr: 0.123  # default 0.05; > 0.0"
    assert shown["train.max_failures"].startswith("  train.max_failures: None  # default None; >= 0; times Ray Train")
    if "\nsweep:" in path.read_text():
        assert "sweep.scheduler" in shown


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def test_version(capsys):
    from selftrain import __version__
    from selftrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"selftrain {__version__}"


def test_registered_model_name_defaults_to_the_experiment_name_mlflow_accepts():
    assert build_config({"name": "digits"}).registered_model_name == "digits"
    assert build_config({"name": "/Users/me/exp:1"}).registered_model_name == "-Users-me-exp-1"
    assert build_config({"name": "x", "registry": {"model_name": "prod"}}).registered_model_name == "prod"
    with pytest.raises(ConfigError, match="registry.model_name: String should match pattern"):
        build_config({"registry": {"model_name": "team/prod"}})
