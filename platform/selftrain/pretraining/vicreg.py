"""VICReg (Bardes et al. 2022): invariance (MSE between the views' embeddings, weight 25), a
variance hinge keeping every dimension's std above 1 (weight 25), and a covariance penalty on
the off-diagonal terms (weight 1), Eq. 6; the expander is Barlow Twins' 3-layer MLP (Sec. 4)."""

from __future__ import annotations

from lightly.loss import VICRegLoss
from lightly.models.modules import BarlowTwinsProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views
from selftrain.pretraining.simclr import embedding_std


class VICReg(PretrainMethod):
    name = "vicreg"
    defaults = {"invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0,
                "projection_dim": 1024, "hidden_dim": 1024}

    def heads(self, feature_dim):
        self.criterion = VICRegLoss(lambda_param=self.knob("invariance_weight"), mu_param=self.knob("variance_weight"),
                                    nu_param=self.knob("covariance_weight"), gather_distributed=True)
        return BarlowTwinsProjectionHead(feature_dim, self.knob("hidden_dim"), self.knob("projection_dim")), None

    def loss(self, network, batch, step):
        z0, z1 = two_views(network, batch)["z"]
        loss = self.criterion(z0, z1)
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(z0)}
