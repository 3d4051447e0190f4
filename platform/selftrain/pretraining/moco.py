"""MoCo v2 (Chen et al. 2020, "Improved baselines"; He et al. 2020): the query is the online
projection of view 0, its positive key the momentum encoder's projection of view 1, negatives a
queue of earlier keys (InfoNCE, temperature 0.2, 2-layer MLP head). The queue (lightly's memory
bank inside the loss) and the momentum encoder are checkpointed. A queue larger than the pool
would hold copies of the query's own image as negatives: keep `queue_size` below the pool."""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views
from selftrain.pretraining.simclr import embedding_std


class MoCoV2(PretrainMethod):
    name = "moco_v2"
    defaults = {"temperature": 0.2, "momentum": 0.99, "queue_size": 4096, "projection_dim": 128, "hidden_dim": 512}
    momentum_encoder = True

    def heads(self, feature_dim):
        dim = self.knob("projection_dim")
        self.criterion = NTXentLoss(temperature=self.knob("temperature"),
                                    memory_bank_size=(self.knob("queue_size"), dim), gather_distributed=True)
        return MoCoProjectionHead(feature_dim, self.knob("hidden_dim"), dim), None

    def momentum(self, step):  # MoCo keeps its momentum constant
        return self.knob("momentum")

    # lightly keeps the queue in non-persistent buffers (left out of `state_dict`): saved here.
    def state_dict(self):
        bank = self.criterion.memory_bank
        return {"step": self.step, "queue": bank.bank.clone(), "queue_pointer": bank.bank_ptr.clone()}

    def load_state_dict(self, state):
        self.step = state.get("step", 0)
        if "queue" in state:
            self.criterion.memory_bank.bank.copy_(state["queue"])
            self.criterion.memory_bank.bank_ptr.copy_(state["queue_pointer"])

    def loss(self, network, batch, step):
        out = two_views(network, batch)
        query, key = out["z"][0], out["z_momentum"][1]
        loss = self.criterion(query, key)
        return loss, {"loss": loss.detach(), "pretrain/embedding_std": embedding_std(query)}
