"""SimCLR (Chen et al. 2020): NT-Xent over the 2N views of a batch, each view's positive the
other view of its image, the other 2N - 2 views its negatives (gathered from every DDP worker),
cosine similarity / temperature, on a 2-layer projection MLP (Sec. 2.1). Temperature 0.5 is the
paper's CIFAR-10 value (Sec. B.9); the projection is narrowed for small backbones."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views


class SimCLR(PretrainMethod):
    name = "simclr"
    defaults = {"temperature": 0.5, "projection_dim": 128, "hidden_dim": 512}

    def heads(self, feature_dim):
        self.criterion = NTXentLoss(temperature=self.knob("temperature"), gather_distributed=True)
        return SimCLRProjectionHead(feature_dim, self.knob("hidden_dim"), self.knob("projection_dim")), None

    def loss(self, network, batch, step):
        z0, z1 = two_views(network, batch)["z"]
        loss = self.criterion(z0, z1)
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(z0)}


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the L2-normalised embeddings: near 0 when they collapse to a
    point, near 1/sqrt(dim) when spread (SimSiam, Chen & He 2021, Sec. 4.1)."""
    return torch.nn.functional.normalize(z.detach(), dim=1).std(dim=0).mean()
