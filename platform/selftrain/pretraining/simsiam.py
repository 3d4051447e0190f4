"""SimSiam (Chen & He 2021): BYOL without the momentum encoder. The prediction of one view
regresses the projection of the other with a stop-gradient on the target (Eq. 3-4, the
stop-gradient is what prevents collapse, Sec. 4.1); prediction MLP with a bottleneck of a
quarter of the projection width (Sec. 3)."""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views
from selftrain.pretraining.simclr import embedding_std


class SimSiam(PretrainMethod):
    name = "simsiam"
    defaults = {"projection_dim": 512, "hidden_dim": 512}

    def heads(self, feature_dim):
        self.criterion = NegativeCosineSimilarity()
        dim = self.knob("projection_dim")
        return (SimSiamProjectionHead(feature_dim, self.knob("hidden_dim"), dim),
                SimSiamPredictionHead(dim, max(dim // 4, 1), dim))

    def loss(self, network, batch, step):
        out = two_views(network, batch)
        (z0, z1), (p0, p1) = out["z"], out["p"]
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(z0)}
