"""Linear probe: a multinomial logistic regression fitted on frozen features of the labeled
images, scored on the test images (the linear evaluation protocol of SimCLR, Chen et al. 2020,
Sec. B.6, with L-BFGS on the whole set: the labeled set is small by premise). scikit-learn's
`LogisticRegression` does the fitting; features are standardised on the training set first.
No Ray, no MLflow.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

C = 1.0  # inverse L2 strength; sklearn's default, fine for a few hundred standardised features


def linear_probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                          c: float = C, max_iter: int = 1000) -> float:
    if len(np.unique(train_labels)) < 2:
        raise ValueError("a linear probe needs labeled images of at least two classes")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(train, train_labels)
    return float((probe.predict(test) == test_labels).mean()) if len(test_labels) else float("nan")
