"""Barlow Twins (Zbontar et al. 2021): the cross-correlation matrix of the two views' batch-
normalised embeddings is pushed to the identity, the off-diagonal (redundancy) terms weighted
by λ = 5e-3 (Eq. 1). Under DDP the statistics cover every worker's batch (lightly gathers)."""

from __future__ import annotations

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views
from selftrain.pretraining.simclr import embedding_std


class BarlowTwins(PretrainMethod):
    name = "barlow_twins"
    defaults = {"redundancy_weight": 5e-3, "projection_dim": 1024, "hidden_dim": 1024}

    def heads(self, feature_dim):
        self.criterion = BarlowTwinsLoss(lambda_param=self.knob("redundancy_weight"), gather_distributed=True)
        return BarlowTwinsProjectionHead(feature_dim, self.knob("hidden_dim"), self.knob("projection_dim")), None

    def loss(self, network, batch, step):
        z0, z1 = two_views(network, batch)["z"]
        loss = self.criterion(z0, z1)
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(z0)}
