"""Cross-entropy on the labeled stream only: the baseline every other method must beat.

Also the Noisy Student objective (Xie et al. 2020, Eq. 1 and 2): the student's stream holds
labeled rows with one-hot targets and pseudo-labeled rows with the teacher's (soft) targets, so
teacher and students minimise the same soft-target cross-entropy; Noisy Student's noise lives in
the data (RandAugment) and the model (dropout, stochastic depth), not in the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum_c targets[c] * log softmax(logits)[c]."""
    return F.cross_entropy(logits, targets)


class Supervised(Method):
    name = "supervised"

    def loss(self, model, batch: Batch, step: int):
        logits = model(batch.labeled)
        loss = soft_target_cross_entropy(logits, batch.targets)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(1) == batch.targets.argmax(1)).float().mean()}

