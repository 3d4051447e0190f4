"""What every self-supervised pretraining method shares: the network it trains and the loop's
contract (the same as `methods.base.Method`'s, so `training/loop.py` runs both).

A pretraining method trains a *network*: the classifier's backbone (its last linear layer
split off, `models/backbone.py`), a projection head, optionally a prediction head, and for the
momentum methods (MoCo, BYOL, DINO) a momentum copy of backbone and projection that follows the
online weights by an exponential moving average after every step (`after_step`), outside the
optimizer. The loop optimises and checkpoints the whole network (momentum copy included, so a
resumed run continues the same target), and saves `eval_model`: the backbone in its
classifier's format, which initialises a teacher (`model.init`).

Each batch holds two augmented views of μ·B pool images (`Batch.views`), made by Ray Data on CPU
(`data/augment.py`, `contrastive_transform`). Losses, heads and the momentum update come from
lightly (one loss per file, tested against the papers; contrastive losses gather the other
workers' embeddings for negatives under DDP). No Ray, no MLflow here.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from selftrain.methods.base import Batch, Comm
from selftrain.models.backbone import strip_classifier, with_classifier


class Network(nn.Module):
    """backbone -> projection (-> prediction); with `projection_momentum` (a second projection
    head), a momentum copy of backbone and projection, without gradients. `forward(x, momentum_x)` returns `z` (projections of `x`),
    `p` (predictions of `z`, when there is a prediction head) and `z_momentum` (the momentum
    branch on `momentum_x`, default `x`)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, prediction: nn.Module | None = None,
                 projection_momentum: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projection, self.prediction = backbone, projection, prediction
        self.backbone_momentum = self.projection_momentum = None
        if projection_momentum is not None:  # a second head, not a deepcopy: DINO's is weight-normed
            self.backbone_momentum = copy.deepcopy(backbone)
            projection_momentum.load_state_dict(projection.state_dict())
            self.projection_momentum = projection_momentum
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)

    def forward(self, x: torch.Tensor, momentum_x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.projection(self.backbone(x))
        out = {"z": z}
        if self.prediction is not None:
            out["p"] = self.prediction(z)
        if self.backbone_momentum is not None:
            with torch.no_grad():
                out["z_momentum"] = self.projection_momentum(self.backbone_momentum(x if momentum_x is None else momentum_x))
        return out

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        update_momentum(self.backbone, self.backbone_momentum, momentum)
        update_momentum(self.projection, self.projection_momentum, momentum)


class PretrainMethod:
    """Base of every pretraining method (one level of inheritance). Subclasses set `name`,
    `defaults` (the knobs they read, at the paper's or the small-image convention's value) and
    `momentum_encoder` (a momentum copy of backbone and projection, decay: the `momentum` knob),
    and override `heads` and `loss`."""

    name: ClassVar[str] = ""
    needs_unlabeled: ClassVar[bool] = False  # the pool is its only stream, the loop's `train`
    defaults: ClassVar[dict[str, Any]] = {}
    momentum_encoder: ClassVar[bool] = False

    def __init__(self, num_classes: int, knobs: dict[str, Any] | None = None, total_steps: int = 1,
                 pool_size: int | None = None, comm: Comm | None = None):
        self.num_classes = num_classes
        self.knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
        self.total_steps = max(total_steps, 1)
        self.comm = comm or Comm()
        self.step = 0
        self.criterion: nn.Module | None = None
        self._classifier: tuple[nn.Linear, str] | None = None

    def knob(self, key: str) -> Any:
        if key in self.knobs:
            return self.knobs[key]
        if key in self.defaults:
            return self.defaults[key]
        raise KeyError(f"pretraining method {self.name!r} has no value for knob {key!r}")

    def resolved_knobs(self) -> dict[str, Any]:
        return {key: self.knob(key) for key in self.defaults}

    # -- what a subclass provides ------------------------------------------------------------
    def heads(self, feature_dim: int) -> tuple[nn.Module, nn.Module | None]:
        """(projection, prediction or None) on top of `feature_dim`-wide features."""
        raise NotImplementedError

    def loss(self, network: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- the loop's contract -----------------------------------------------------------------
    def network(self, model: nn.Module) -> Network:
        """The network to train, around `model`'s backbone (its classifier is kept aside, for
        saving the backbone in the classifier's format)."""
        backbone, linear, name = strip_classifier(model)
        self._classifier = (linear, name)
        projection, prediction = self.heads(linear.in_features)
        momentum = self.heads(linear.in_features)[0] if self.momentum_encoder else None
        return Network(backbone, projection, prediction, momentum)

    def setup(self, network: nn.Module) -> None:
        """Loss modules with state (DINO's centre, MoCo's queue) live beside the network."""
        if self.criterion is not None:
            self.criterion.to(next(network.parameters()).device)

    def momentum(self, step: int) -> float:
        """BYOL's target decay (Grill et al. 2020, Sec. 3.2): from `momentum` to 1 on a cosine."""
        return cosine_schedule(step, self.total_steps, self.knob("momentum"), 1.0)

    @torch.no_grad()
    def after_step(self, network: Network) -> None:
        if network.backbone_momentum is not None:
            network.update_momentum(self.momentum(self.step))
        self.step += 1

    def features_model(self, network: Network) -> nn.Module:
        """The backbone whose features are monitored (kNN) and saved."""
        return network.backbone

    def eval_model(self, network: Network) -> nn.Module:
        """The saved model: the monitored backbone with the (untrained) classifier put back."""
        linear, name = self._classifier
        return with_classifier(self.features_model(network), linear, name)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "criterion": self.criterion.state_dict() if self.criterion is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", 0)
        if self.criterion is not None and state.get("criterion"):
            self.criterion.load_state_dict(state["criterion"])


def two_views(network: nn.Module, batch: Batch) -> dict[str, tuple[torch.Tensor, ...]]:
    """Both views through the network in one forward pass (one DDP forward per step, one set
    of BatchNorm statistics); each output split back into (view 0, view 1), as float32."""
    return {key: tuple(value.float().chunk(2)) for key, value in network(torch.cat(batch.views)).items()}
