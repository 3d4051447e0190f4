"""The Noisy Student objective: cross-entropy against (soft) targets.

Labeled rows carry one-hot targets and pseudo-labeled rows the teacher's (soft) targets, so the
teacher and every student train with the same objective (Xie et al. 2020, Eq. 1 and 2); the
noise lives in the data (RandAugment) and the model (dropout, stochastic depth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum_c targets[c] * log softmax(logits)[c]."""
    return F.cross_entropy(logits, targets)


def noisy_student_objective(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(images)
    loss = soft_target_cross_entropy(logits, targets)
    agree = (logits.argmax(dim=1) == targets.argmax(dim=1)).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": agree}
