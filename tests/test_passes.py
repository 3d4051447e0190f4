"""Seeded augmentation (`stages/passes.py`): a row's random ops depend on its seed alone."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from selftrain.config import NoiseConfig
from selftrain.data.augment import augment_images, strong_transform, train_transform
from selftrain.seeds import relative_key, seed_of
from selftrain.stages.passes import row_seeds, stream_passes_actor


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def test_a_rows_augmentation_depends_on_its_seed_alone_not_on_its_batch_or_process_state():
    images, noise = _images(3), NoiseConfig(randaugment_num_ops=2, randaugment_magnitude=9)
    transform = train_transform(16, noise, randaugment=True)
    seeds = np.array([11, 22, 33], dtype=np.uint64)
    whole = augment_images(images, transform, seeds=seeds)
    alone = augment_images(images[2:], transform, seeds=seeds[2:])  # another batch, other draws before
    np.testing.assert_array_equal(whole[2], alone[0])
    np.testing.assert_array_equal(whole, augment_images(images, transform, seeds=seeds))
    other = augment_images(images, transform, seeds=seeds + np.uint64(1))
    assert all(not np.array_equal(a, b) for a, b in zip(whole, other))  # another seed, other ops
    # Cutout's square is drawn from the seed too (the strong view of FixMatch).
    strong = strong_transform(noise)
    np.testing.assert_array_equal(augment_images(whole, strong, channels_first=True, seeds=seeds),
                                  augment_images(whole, strong, channels_first=True, seeds=seeds))


def test_row_seeds_follow_the_pass_the_loop_started(ray_session):
    passes = stream_passes_actor()
    with pytest.raises(ray.exceptions.RayTaskError, match="no pass was started"):
        ray.get(ray.remote(row_seeds).remote(passes, "train", 0, ["a|0"]))
    ray.get(passes.start.remote("train", 3))
    got = ray.get(ray.remote(row_seeds).remote(passes, "train", 7, ["a|0", "a|1"]))  # in a task, as the streams call it
    assert got.tolist() == [seed_of(7, "train", 3, "a|0"), seed_of(7, "train", 3, "a|1")]
    ray.get(passes.start.remote("train", 4))
    assert row_seeds(passes, "train", 7, ["a|0"]).tolist() == [seed_of(7, "train", 4, "a|0")]
    assert row_seeds(None, "train", 7, ["a|0"]) is None
    ray.kill(passes)


def test_what_ray_trains_helpers_unpickle_imports_no_torch():
    """Ray Train's controller, DatasetManager and SplitCoordinator import the module of every
    function in the training streams and every callback (cloudpickle pickles them by reference);
    torch and torchvision there cost each of them seconds per fit (`stages/rows.py`)."""
    import subprocess
    import sys

    probe = ("import sys, selftrain.stages.rows; "
             "print(sorted(m for m in ('torch', 'torchvision', 'selftrain.training.loop') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_a_rows_key_is_its_path_below_the_data_root(tmp_path, monkeypatch):
    from selftrain.config import DataConfig
    from selftrain.data.listing import data_roots

    assert relative_key("/data/pool/a/b.png", "/data/pool") == "a/b.png"
    assert relative_key("/data/pool/a/b.png", "/data/pool/") == "a/b.png"
    assert relative_key("/data/poolside/b.png", "/data/pool") == "/data/poolside/b.png"  # not below it
    assert relative_key("/data/pool.parquet#row=3", "/data/pool.parquet") == "pool.parquet#row=3"
    assert relative_key("s3://bucket/pool/x.jpg", "s3://bucket/pool") == "x.jpg"
    assert relative_key("/data/pool/a.png", "") == "/data/pool/a.png"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labeled").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    roots = data_roots(DataConfig(labeled="link", unlabeled="pool/**/*.png", test="t"))
    assert roots == (str(tmp_path / "real"), str(tmp_path / "pool"))  # as the rows' paths name them
    assert data_roots(DataConfig(labeled="l", unlabeled="s3://b/pool/*.jpg", test="t")).pool == "s3://b/pool"
    cache = data_roots(DataConfig(builtin="digits", cache_dir=str(tmp_path / "cache")))
    assert cache == (str(tmp_path / "cache"),) * 2
