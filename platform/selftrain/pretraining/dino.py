"""DINO (Caron et al. 2021): the student's softmax over K prototypes (temperature 0.1) matches
the momentum teacher's centred and sharpened softmax (temperature 0.04) of the other view
(Eq. 1-3); the centre is an EMA (0.9) of the teacher's outputs, the teacher's decay goes 0.996
→ 1 on a cosine (Sec. 3.1). Two global views only (no multi-crop: the pool's images are small).
The teacher's backbone is the one evaluated and saved, as in the paper. The centre is part of
the checkpoint (the loss module's state)."""

from __future__ import annotations

from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead

from selftrain.pretraining.base import PretrainMethod, two_views


class DINO(PretrainMethod):
    name = "dino"
    defaults = {"momentum": 0.996, "prototypes": 1024, "hidden_dim": 512, "projection_dim": 128,
                "teacher_temperature": 0.04, "temperature": 0.1, "center_momentum": 0.9}
    momentum_encoder = True

    def heads(self, feature_dim):
        self.criterion = DINOLoss(output_dim=self.knob("prototypes"), warmup_teacher_temp=self.knob("teacher_temperature"),
                                  teacher_temp=self.knob("teacher_temperature"), student_temp=self.knob("temperature"),
                                  center_momentum=self.knob("center_momentum"))
        return DINOProjectionHead(feature_dim, self.knob("hidden_dim"), self.knob("projection_dim"),
                                  self.knob("prototypes")), None

    def loss(self, network, batch, step):
        out = two_views(network, batch)
        loss = self.criterion(list(out["z_momentum"]), list(out["z"]))
        teacher_probs = out["z_momentum"][0].softmax(dim=1)
        return loss, {"loss": loss.detach(),
                      # collapse shows as one prototype taking every image (near 1)
                      "pretrain/top_prototype_fraction": teacher_probs.argmax(1).bincount().max() / len(teacher_probs)}

    def features_model(self, network):
        return network.backbone_momentum
