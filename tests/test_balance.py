"""Streaming per-class balancing against the pandas reference `balance_class`."""

import numpy as np
import pandas as pd
import ray.data

from selftrain.methods.pseudo_label import balance_class
from selftrain.stages import balance as balancing


def _kept(confidences: dict[int, np.ndarray]) -> pd.DataFrame:
    frames = [pd.DataFrame({"path": [f"/pool/{c}/{i:05d}.png" for i in range(len(conf))], "prediction": c,
                            "confidence": conf.astype(np.float32), "error": ""})
              for c, conf in confidences.items()]
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0)  # classes interleaved


def _balanced(kept: pd.DataFrame, k: int, seed: int = 0, root: str = "/pool") -> pd.DataFrame:
    counts = np.bincount(kept["prediction"], minlength=3).tolist()
    dataset = ray.data.from_pandas(kept).repartition(7)  # several blocks, as a scored pool has
    return balancing.balance(dataset, counts, k, seed, root).to_pandas()


def test_top_k_and_duplicates_are_exact_per_class(ray_session):
    rng = np.random.default_rng(1)
    kept = _kept({0: rng.random(300), 1: rng.random(40), 2: rng.random(25)})
    out = _balanced(kept, k=100)
    assert out.groupby("prediction").size().to_dict() == {0: 100, 1: 100, 2: 100}
    reference = balance_class(kept[kept["prediction"] == 0], 100, seed=0)
    assert sorted(out[out["prediction"] == 0]["path"]) == sorted(reference["path"])  # the 100 most confident
    copies = out[out["prediction"] == 1]["path"].value_counts()
    assert len(copies) == 40 and set(copies) == {2, 3} and (copies == 3).sum() == 100 % 40  # 2 each, 20 thrice
    again = _balanced(kept, k=100)
    assert sorted(again["path"]) == sorted(out["path"])  # the seed fixes which rows repeat
    assert sorted(_balanced(kept, k=100, seed=5)["path"]) != sorted(out["path"])


def test_the_same_pool_in_another_folder_repeats_the_same_images(ray_session):
    """Which images of a short class get a copy more (and how ties split) is drawn from their
    paths below the pool's root, so a pool copied or mounted elsewhere gives the same labels."""
    rng = np.random.default_rng(3)
    kept = _kept({0: np.ones(120), 1: rng.random(40), 2: rng.random(25)})  # class 0: all tied
    moved = kept.assign(path="/mnt/elsewhere" + kept["path"])

    def copies(out: pd.DataFrame, prefix: str) -> pd.Series:
        return out["path"].str.removeprefix(prefix).value_counts().sort_index()

    here = copies(_balanced(kept, k=100), "")
    assert (here == 3).sum() == 100 % 40 + 100 % 25  # short classes: some rows thrice
    assert copies(_balanced(moved, k=100, root="/mnt/elsewhere/pool"), "/mnt/elsewhere").equals(here)
    # Ranked by the whole path instead (what this replaced), the moved pool repeats other images.
    assert not copies(_balanced(moved, k=100, root=""), "/mnt/elsewhere").equals(here)


def test_skewed_and_tied_confidences_need_radix_passes(ray_session, monkeypatch):
    # Most confidences saturate at 1.0 (ties) or crowd just below it, as a trained teacher's do;
    # with a tiny EDGE_ROWS the cut-off must be found by radix passes, and ties split by hash.
    monkeypatch.setattr(balancing, "EDGE_ROWS", 5)
    rng = np.random.default_rng(2)
    conf = np.concatenate([np.ones(150), 1.0 - rng.random(150) * 1e-4, rng.random(100)])
    out = _balanced(_kept({0: conf, 1: rng.random(80), 2: rng.random(90)}), k=170)
    chosen = out[out["prediction"] == 0]
    assert len(chosen) == 170 and chosen["path"].is_unique
    assert (chosen["confidence"] == 1.0).sum() == 150  # every tie at the top is in
    assert chosen["confidence"].min() >= np.sort(conf.astype(np.float32))[::-1][169]
    assert out.groupby("prediction").size().to_dict() == {0: 170, 1: 170, 2: 170}
