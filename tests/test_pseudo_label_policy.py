import numpy as np
import pandas as pd
import pytest

from selftrain.methods.pseudo_label import balance_class, confidence, default_per_class, softmax, targets


def test_softmax_with_temperature_matches_hand_computation():
    logits = np.array([[2.0, 0.0, 0.0]])
    # T=1: e^2 / (e^2 + 2) ; T=2: e^1 / (e^1 + 2)
    assert softmax(logits)[0, 0] == pytest.approx(np.e**2 / (np.e**2 + 2))
    assert softmax(logits, 2.0)[0, 0] == pytest.approx(np.e / (np.e + 2))
    assert softmax(logits, 0.5)[0, 0] == pytest.approx(np.e**4 / (np.e**4 + 2))


def test_softmax_is_stable_for_large_logits():
    probs = softmax(np.array([[1000.0, 999.0]]))
    assert np.isfinite(probs).all() and probs[0, 0] == pytest.approx(1 / (1 + np.e**-1))


def test_soft_and_hard_targets():
    logits = np.array([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    hard = targets(logits, temperature=5.0, soft=False)
    np.testing.assert_array_equal(hard, [[0, 1, 0], [1, 0, 0]])
    soft = targets(logits, temperature=1.0, soft=True)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    assert soft[0, 1] == pytest.approx(np.e / (np.e + 2), rel=1e-6)


def test_confidence_is_the_argmax_probability_at_t1():
    label, conf = confidence(np.array([[0.0, np.log(3.0)], [0.0, 0.0]]))
    np.testing.assert_array_equal(label, [1, 0])
    np.testing.assert_allclose(conf, [0.75, 0.5])


def _rows(confidences):
    return pd.DataFrame({"path": [f"p{i}" for i in range(len(confidences))], "confidence": confidences})


def test_balance_keeps_the_k_most_confident():
    out = balance_class(_rows([0.6, 0.9, 0.7, 0.95]), k=2, seed=0)
    assert out["path"].tolist() == ["p3", "p1"]


def test_balance_duplicates_a_short_class_to_exactly_k():
    out = balance_class(_rows([0.6, 0.9]), k=5, seed=0)
    assert len(out) == 5
    assert set(out["path"]) == {"p0", "p1"}  # every original row kept, the rest are repeats
    assert out["path"].iloc[:2].tolist() == ["p1", "p0"]


def test_balance_duplication_is_seeded():
    a = balance_class(_rows([0.6, 0.9, 0.8]), k=10, seed=3)["path"].tolist()
    b = balance_class(_rows([0.6, 0.9, 0.8]), k=10, seed=3)["path"].tolist()
    assert a == b


def test_default_k_is_the_median_of_nonzero_counts():
    assert default_per_class(pd.Series([0, 10, 30, 40])) == 30
    assert default_per_class(pd.Series([0, 0])) == 0
