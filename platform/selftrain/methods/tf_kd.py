"""Teacher-free KD with a hand-made virtual teacher (Yuan et al. 2020, "Revisiting Knowledge
Distillation via Label Smoothing Regularization", Sec. 5, Tf-KD_reg, Eq. 8-9):

    p^d(k) = a if k = c else (1 − a)/(K − 1)                     (a 100 %-accurate "teacher")
    L = (1 − α) · CE(z, c) + α · T² · KL(p^d_T ‖ softmax(z / T)),    p^d_T ∝ (p^d)^(1/T)

c is the row's class (argmax of its target). This is label smoothing seen as distillation: the
teacher adds no knowledge of class similarity, only a regularising soft target.

Choices and what the reference does differently (checked against the authors' repository,
yuanli2333/Teacher-free-Knowledge-Distillation, CIFAR-100 configs):
- Tempering: here both sides are tempered exactly as in KD (`kd.py`), p^d_T = (p^d)^(1/T)
  renormalised, which equals softmax(log p^d / T), with the T² gradient scale. The repository
  applies softmax to the *probabilities* divided by T (softmax(p^d / T), nearly uniform for T ≥ 10)
  against the untempered student and replaces T² by a per-model "multiplier" (1, 50 or 100); that
  is not the paper's formula, so it is not copied.
- T = 20: the repository's CIFAR-100 setting for ResNet-18 (it uses 10, 20 or 40 per model; 20
  is the middle one). a = 0.9: a confident virtual teacher, as the paper asks for; the repository
  hard-codes 0.99. α = 0.5: the repository's α (0.1 with a large multiplier, 0.95 without) is
  tied to its own scaling, which does not carry over here; equal weights are a neutral default.
"""

from __future__ import annotations

import torch

from selftrain.methods.base import Batch, Method
from selftrain.methods.kd import kd_loss, retemper  # the same KD formula as `kd`


def virtual_teacher(labels: torch.Tensor, num_classes: int, correct: float) -> torch.Tensor:
    """p^d per row: `correct` on the row's class, the rest spread evenly over the other K − 1."""
    dist = torch.full((len(labels), num_classes), (1.0 - correct) / (num_classes - 1), device=labels.device)
    return dist.scatter_(1, labels[:, None], correct)


class TeacherFreeKD(Method):
    name = "tf_kd"
    needs_unlabeled = False
    defaults = {"alpha": 0.5, "temperature": 20.0, "virtual_correct": 0.9}

    def loss(self, model, batch: Batch, step: int):
        logits = model(batch.labeled)
        temperature = float(self.knob("temperature"))
        labels = batch.targets.argmax(dim=1)
        teacher = retemper(virtual_teacher(labels, self.num_classes, self.knob("virtual_correct")), temperature)
        loss, supervised, distill = kd_loss(logits, teacher, labels, self.knob("alpha"), temperature)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(1) == labels).float().mean(),
                      "sup/loss": supervised.detach(), "kd/loss": distill.detach()}
