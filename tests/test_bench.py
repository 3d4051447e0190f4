"""`selftrain bench`'s plumbing part on the shared local Ray: the real scoring pipeline feeding
a stand-in device (its numbers are measured by the bench; here only what must always hold)."""

from selftrain.bench import ratios, table
from selftrain.bench.plumbing import run_plumbing
from selftrain.config import ScoringConfig
from selftrain.stages.score import GPU_CONCURRENT_BATCHES


def test_plumbing_scores_every_image_and_the_device_is_never_busier_than_its_span(ray_session):
    result = run_plumbing(1024, 32, ScoringConfig(batch_size=128), device_images_per_s=20_000.0)
    by_calls = result["by_concurrent_batches"]
    assert sorted(by_calls) == sorted({"1", str(GPU_CONCURRENT_BATCHES)})
    for measured in by_calls.values():
        assert measured["images"] == 1024
        # One device: batches took turns on it, so busy time <= span and images/s <= its speed.
        assert 0.0 < measured["plumbing_ratio"] <= 1.0
        assert measured["pipeline_images_per_s"] <= 20_000.0 * (1 + 1e-6)
    assert result["plumbing_ratio"] == by_calls[str(GPU_CONCURRENT_BATCHES)]["plumbing_ratio"]

    results = {"mode": "quick", "device": "CPU", "plumbing": result}
    results["ratios"] = ratios(results)
    assert results["ratios"] == {}  # no goal of its own
    printed = table(results)
    assert "stand-in device of 20,000 img/s (32 px, batch 128; no goal)" in printed
    assert f"scoring.concurrent_batches={GPU_CONCURRENT_BATCHES}" in printed
