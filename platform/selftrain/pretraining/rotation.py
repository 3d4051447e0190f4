"""Rotation prediction (Gidaris et al. 2018): every image is shown at 0, 90, 180 and 270
degrees in the same batch and a linear head on the backbone predicts which (4-way
cross-entropy, Sec. 3.1, "all four rotations of each image" in one batch, Sec. 2.2). The
rotations are made on the worker's device from the first view (the crop and flip of Ray Data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selftrain.pretraining.base import PretrainMethod

ROTATIONS = 4


def rotated(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(all four rotations of each NCHW image, stacked by rotation; their rotation labels)."""
    views = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return views, labels


class Rotation(PretrainMethod):
    name = "rotation"
    defaults = {}

    def heads(self, feature_dim):
        return nn.Linear(feature_dim, ROTATIONS), None

    def loss(self, network, batch, step):
        views, labels = rotated(batch.views[0])
        logits = network(views)["z"].float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.detach(), "pretrain/rotation_accuracy": (logits.argmax(1) == labels).float().mean()}
