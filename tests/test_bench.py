"""`selftrain bench`'s plumbing and consistency parts on the shared local Ray: the real scoring pipeline feeding
a stand-in device, and FixMatch through Ray Train vs a bare loop (their numbers are measured by
the bench; here only what must always hold)."""

import numpy as np
import pytest

from selftrain.bench import RATIO_OF, ratios, repeated, table
from selftrain.bench.plumbing import run_plumbing
from selftrain.config import ScoringConfig
from selftrain.stages.score import GPU_CONCURRENT_BATCHES


def test_plumbing_scores_every_image_and_measures_a_device_that_is_the_bottleneck_as_busy(ray_session):
    # A stand-in device of 100 img/s is far slower than the pipeline that feeds it 32 px images
    # (1.28 s a batch: at 400 img/s a CI run under load once read 0.62): it should be busy nearly
    # all the time, and its busy time is exactly its nominal work.
    result = run_plumbing(384, 32, ScoringConfig(batch_size=128), device_images_per_s=100.0)
    by_calls = result["by_concurrent_batches"]
    assert sorted(by_calls) == sorted({"1", str(GPU_CONCURRENT_BATCHES)})
    for measured in by_calls.values():
        assert measured["images"] == 384
        assert measured["device_busy_seconds"] == pytest.approx(384 / 100.0)  # not the oversleep
        assert 0.8 <= measured["plumbing_ratio"] <= 1.0
    assert result["plumbing_ratio"] == by_calls[str(GPU_CONCURRENT_BATCHES)]["plumbing_ratio"]

    results = {"mode": "quick", "device": "CPU", "plumbing": result}
    results["ratios"] = ratios(results)
    assert results["ratios"] == {}  # no goal of its own
    printed = table(results)
    assert "stand-in device of 100 img/s (32 px, batch 128; no goal)" in printed
    assert f"scoring.concurrent_batches={GPU_CONCURRENT_BATCHES}" in printed


def test_consistency_runs_every_fixmatch_step_on_both_sides_and_reports_their_ratio(ray_session):
    from selftrain.bench.consistency import materialised_pool, pool_views, run_consistency

    rows = materialised_pool(64, 8, 10).take_batch(64)  # Ray's pool holds the bare loop's rows
    order = np.argsort(rows["index"])
    for name, values in pool_views(np.arange(64), 8, 10).items():
        np.testing.assert_array_equal(np.asarray(rows[name])[order], values)

    result = run_consistency("cnn_small", labeled_rows=32, pool_size=64, size=8, epochs=3, steps_per_epoch=3,
                             batch_size=8, cpus=1.0, use_gpu=False, mu=2)
    history = result["ray_train_history"]
    assert len(history) == 3 and [epoch["train/steps"] for epoch in history] == [3, 3, 3]
    assert result["ray_train_steps"] == result["bare_steps"] == 9
    # FixMatch ran in the worker: its loop read both streams (labeled + mu * B unlabeled per step).
    assert all("unsup/mask_rate" in epoch for epoch in history)
    assert all(epoch["train/images_per_s"] * epoch["train/epoch_seconds"] == pytest.approx(3 * (8 + 2 * 8))
               for epoch in history)
    assert len(result["ray_train_steps_per_s_by_epoch"]) == len(result["bare_steps_per_s_by_epoch"]) == 3
    assert result["ray_train_steps_per_s"] == pytest.approx(np.mean(result["ray_train_steps_per_s_by_epoch"][1:]))
    assert result["bare_steps_per_s"] == pytest.approx(np.mean(result["bare_steps_per_s_by_epoch"][1:]))
    assert result["consistency_training_ratio"] == pytest.approx(
        result["ray_train_steps_per_s"] / result["bare_steps_per_s"])

    results = {"mode": "quick", "device": "CPU", "consistency": result}
    results["ratios"] = ratios(results)
    assert results["ratios"] == {"consistency_training_ratio": result["consistency_training_ratio"]}
    assert "5. FixMatch steps, Ray Train 1 worker vs bare" in table(results)


def test_pretrain_runs_every_simclr_step_on_both_sides_and_reports_their_ratio(ray_session):
    from selftrain.bench.pretrain import materialised_views, run_pretrain, two_views

    view0, view1 = two_views(40, 8)
    rows = materialised_views(view0, view1).take_batch(40)  # Ray holds exactly the bare loop's view pairs
    pairs = sorted(a.tobytes() + b.tobytes() for a, b in zip(rows["view0"], rows["view1"], strict=True))
    assert pairs == sorted(a.tobytes() + b.tobytes() for a, b in zip(view0, view1, strict=True))
    result = run_pretrain("simclr", "cnn_tiny", count=48, size=8, epochs=3, batch_size=16, cpus=1.0, use_gpu=False)
    assert result["steps_per_epoch"] == 3
    assert len(result["ray_train_steps_per_s_by_epoch"]) == len(result["bare_steps_per_s_by_epoch"]) == 3
    assert result["ray_train_steps_per_s"] == pytest.approx(np.mean(result["ray_train_steps_per_s_by_epoch"][1:]))
    assert result["pretrain_ratio"] == pytest.approx(result["ray_train_steps_per_s"] / result["bare_steps_per_s"])
    results = {"mode": "quick", "device": "CPU", "pretrain": result}
    results["ratios"] = ratios(results)
    assert results["ratios"] == {"pretrain_ratio": result["pretrain_ratio"]}
    assert "6. SimCLR steps, Ray Train 1 worker vs bare" in table(results)


def test_each_ratio_is_the_median_of_repeats_with_its_own_run_and_the_spread_in_the_table():
    runs = iter([{"pipeline_images_per_s": 80.0, "bare_images_per_s": 100.0, "scoring_ratio": 0.80},
                 {"pipeline_images_per_s": 95.0, "bare_images_per_s": 100.0, "scoring_ratio": 0.95},
                 {"pipeline_images_per_s": 63.0, "bare_images_per_s": 90.0, "scoring_ratio": 0.70}])
    said = []
    result = repeated("scoring", 3, lambda: next(runs), said.append)
    assert result["scoring_ratio"] == 0.80 and result["pipeline_images_per_s"] == 80.0  # the median run, whole
    assert result["repeats"] == [0.80, 0.95, 0.70] and len(said) == 3
    # each run's rates are in the log as it ends, so a bench cut short keeps them
    assert said[2] == "   scoring run 3/3: scoring_ratio 0.700 (pipeline_images_per_s 63.0, bare_images_per_s 90.0)"
    results = {"mode": "quick", "device": "CPU", "scoring": {**result, "pipeline_cpu_decode_images_per_s": 50.0,
                                                             "cpu_decode_images_per_s_one_process": 70.0}}
    results["ratios"] = ratios(results)
    results["ratio_ranges"] = {RATIO_OF["scoring"]: [0.70, 0.95, 3]}
    line = next(line for line in table(results).splitlines() if line.startswith("1. scoring"))
    assert line.endswith("0.800  >= 0.95  NOT met  (median of 3: 0.700-0.950)")  # on CPU
    on_gpu = next(line for line in table({**results, "use_gpu": True}).splitlines() if line.startswith("1. scoring"))
    assert on_gpu.endswith("0.800  >= 0.9  NOT met  (median of 3: 0.700-0.950)")
    results["ratios"]["scoring_ratio"] = 0.93  # between the two goals
    assert "0.930  >= 0.95  NOT met" in table(results)
    assert "0.930  >= 0.9  met" in table({**results, "use_gpu": True})


def test_the_pool_pass_scores_every_file_into_parquet_and_is_printed_over_the_model_rate(ray_session, tmp_path):
    """The end-to-end figure: JPEG files on disk through the real read_pool and score_pool; every
    file becomes a scores row, and the table prints its rate over the bare loop's."""
    from selftrain.bench import _model_dir
    from selftrain.bench.scoring import pool_pass, synthetic_jpegs

    jpegs = synthetic_jpegs(5, 24)
    passed = pool_pass(_model_dir(tmp_path, "cnn_tiny", 16), jpegs * 61, ScoringConfig(batch_size=64), 16,
                       str(tmp_path))
    assert passed["images"] == 305  # every file, none lost or doubled
    assert passed["images_per_s"] == pytest.approx(305 / passed["seconds"])
    # the batches' own stamps (the actor's clock, this node's) fall inside the timed pass
    assert 0 < passed["first_scored_seconds"] <= passed["last_scored_seconds"] < passed["seconds"]
    assert not list(tmp_path.glob("selftrain-bench-pool-*"))  # the files and scores are removed

    scoring = {"pipeline_images_per_s": 90.0, "bare_images_per_s": 100.0, "scoring_ratio": 0.9,
               "pipeline_cpu_decode_images_per_s": 50.0, "cpu_decode_images_per_s_one_process": 70.0,
               "pool_pass_images": 305, "pool_pass_seconds": 12.5, "pool_pass_images_per_s": 24.4,
               "pool_pass_over_model": 0.244, "pool_pass_first_scored_seconds": 4.25,
               "pool_pass_last_scored_seconds": 9.0}
    results = {"mode": "quick", "device": "CPU", "scoring": scoring}
    results["ratios"] = ratios(results)
    line = next(line for line in table(results).splitlines() if "pool pass" in line)
    assert "305 files -> scores Parquet" in line and line.rstrip().endswith("24.4 img/s     100.0 img/s    0.244")
    assert "(first batch scored 4.2 s in, the last 9.0 s in, 3.5 s after it to the checked Parquet)" in table(results)


def test_the_cuda_graph_experiment_is_printed_beside_scoring_or_its_failure_is_named():
    scoring = {"pipeline_images_per_s": 90.0, "bare_images_per_s": 100.0, "scoring_ratio": 0.9,
               "pipeline_cpu_decode_images_per_s": 50.0, "cpu_decode_images_per_s_one_process": 70.0,
               "gpu_decode_images_per_s": 900.0, "pipeline_gpu_decode_images_per_s": 80.0,
               "graphs_pipeline_images_per_s": 95.0, "graphs_bare_images_per_s": 110.0, "graphs_ratio": 95 / 110}
    results = {"mode": "full", "device": "GPU", "use_gpu": True, "scoring": scoring}
    results["ratios"] = ratios(results)
    line = next(line for line in table(results).splitlines() if "CUDA graphs" in line)
    assert line.rstrip().endswith("95.0 img/s     110.0 img/s    0.864")
    assert results["ratios"] == {"scoring_ratio": 0.9}  # the experiment is no goal's ratio
    failed = {k: v for k, v in scoring.items() if not k.startswith("graphs_")} | {"graphs_error": "RuntimeError: x"}
    results = {**results, "scoring": failed}
    assert "both sides with CUDA graphs (experiment): failed, RuntimeError: x" in table(results)


def test_the_gpu_experiments_beside_scoring_and_training_are_printed_and_are_no_goals_ratio():
    scoring = {"pipeline_images_per_s": 90.0, "bare_images_per_s": 100.0, "scoring_ratio": 0.9,
               "pipeline_cpu_decode_images_per_s": 50.0, "cpu_decode_images_per_s_one_process": 70.0,
               "more_calls": 8, "more_calls_pipeline_images_per_s": 88.0, "more_calls_bare_images_per_s": 104.0,
               "more_calls_ratio": 88 / 104}
    training = {"ray_train_images_per_s": 80.0, "bare_images_per_s": 100.0, "training_ratio": 0.8,
                "pinned_ray_train_images_per_s": 92.0, "pinned_training_ratio": 0.92}
    results = {"mode": "full", "device": "GPU", "use_gpu": True, "scoring": scoring, "training": training}
    results["ratios"] = ratios(results)
    lines = table(results).splitlines()
    two = next(line for line in lines if "concurrent_batches=8 (experiment)" in line)
    assert two.rstrip().endswith("88.0 img/s     104.0 img/s    0.846")
    pinned = next(line for line in lines if "pinned host memory" in line)
    assert pinned.rstrip().endswith("92.0 img/s     100.0 img/s    0.920")
    assert results["ratios"] == {"scoring_ratio": 0.9, "training_ratio": 0.8}
    failed = {**{k: v for k, v in training.items() if not k.startswith("pinned_")}, "pinned_error": "TypeError: y"}
    assert "pinned host memory (experiment): failed, TypeError: y" in table({**results, "training": failed})
