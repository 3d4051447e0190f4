"""Linear probe: a multinomial logistic regression fitted on frozen features of the labeled
images, scored on the test images (the linear evaluation protocol of SimCLR, Chen et al. 2020,
Sec. B.6, with L-BFGS on the whole set: the labeled set is small by premise). scikit-learn's
`LogisticRegression` does the fitting; features are standardised on the training set first.

The same probe, folded into one linear map of the raw features (`as_linear`), starts a
fine-tuned classifier (LP-FT, Kumar et al. 2022: a new head fitted before the backbone moves
distorts the pretrained features less than a random one). No Ray, no MLflow.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

C = 1.0  # inverse L2 strength; sklearn's default, fine for a few hundred standardised features
ABSENT_CLASS_MARGIN = 10.0  # logits below the lowest fitted bias for a class with no labeled image


def fit_probe(train: np.ndarray, train_labels: np.ndarray, c: float = C, max_iter: int = 1000,
              standardise: bool = True) -> Pipeline:
    """The probe; `standardise=False` fits the raw features, so the L2 penalty bounds the
    weights a fine-tuned classifier starts from (standardising divides by each feature's std,
    and a near-constant feature of a briefly trained backbone gets a huge weight)."""
    if len(np.unique(train_labels)) < 2:
        raise ValueError("a linear probe needs labeled images of at least two classes")
    scaler = StandardScaler(with_mean=standardise, with_std=standardise)
    return make_pipeline(scaler, LogisticRegression(C=c, max_iter=max_iter)).fit(train, train_labels)


def linear_probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                          c: float = C, max_iter: int = 1000) -> float:
    probe = fit_probe(train, train_labels, c, max_iter)
    return float((probe.predict(test) == test_labels).mean()) if len(test_labels) else float("nan")


def as_linear(probe: Pipeline, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight `num_classes` x dim, bias) of one linear layer on the raw features whose softmax
    equals the probe's probabilities: the standardisation folded into the weights. A class the
    probe never saw gets zero weights and a bias `ABSENT_CLASS_MARGIN` below the lowest one."""
    scaler, logistic = probe[0], probe[-1]
    coef, intercept = logistic.coef_, logistic.intercept_
    if len(logistic.classes_) == 2:  # sklearn keeps one row for two classes: logit(p1) = w.x + b
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    if scaler.scale_ is not None:
        coef = coef / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    if scaler.mean_ is not None:
        intercept = intercept - coef @ scaler.mean_
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, intercept.min() - ABSENT_CLASS_MARGIN)
    weight[logistic.classes_], bias[logistic.classes_] = coef, intercept
    return weight.astype(np.float32), bias.astype(np.float32)
