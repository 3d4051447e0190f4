"""BYOL (Grill et al. 2020): the online network's prediction of one view regresses the
momentum target's projection of the other (negative cosine similarity, symmetrised, Eq. 2),
the target's decay going from 0.99 to 1 on a cosine (Sec. 3.2). Heads narrowed for small
backbones."""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views
from selftrain.pretraining.simclr import embedding_std


class BYOL(PretrainMethod):
    name = "byol"
    defaults = {"momentum": 0.99, "projection_dim": 256, "hidden_dim": 1024}
    momentum_encoder = True

    def heads(self, feature_dim):
        self.criterion = NegativeCosineSimilarity()
        dim, hidden = self.knob("projection_dim"), self.knob("hidden_dim")
        return BYOLProjectionHead(feature_dim, hidden, dim), BYOLPredictionHead(dim, hidden, dim)

    def loss(self, network, batch, step):
        out = two_views(network, batch)
        (p0, p1), (t0, t1) = out["p"], out["z_momentum"]
        loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(out["z"][0])}
