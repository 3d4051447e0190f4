"""Mean Teacher (Tarvainen & Valpola 2017, Sec. 2 and Eq. 1): a consistency cost between the
student and an exponential moving average of the student's own weights.

    J = CE(labeled) + w(t) · mean_b ‖ softmax(student(x′_b)) − softmax(teacher(x″_b)) ‖² / K

x′ and x″ are TWO DIFFERENT noisy views of the same image (here the strong and the weak view):
with one view on both sides the cost measures only the EMA lag, and where both sides are computed
from the same logits (USB's port, its issues 102 and 226) it is exactly zero and the method
degrades to supervised training.

- The teacher is `self.ema` (the base class's EMA with BatchNorm buffers averaged too), run in
  eval mode and under no_grad: the paper updates it only by the EMA, never by gradients.
- Reduction: squared error averaged over classes and over the batch (the paper's ‖·‖² / K), as
  Tarvainen's and USB's code compute it, so λu = 50 weighs the cost as USB's λu = 50 does.
- w(t) = λu · clip(step / (unsup_warmup · total_steps), 0, 1): the paper ramps the consistency
  weight up (sigmoid-shaped) because the teacher is poor early; a linear ramp as USB uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics
from selftrain.methods.online_pseudo_label import linear_rampup


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """mean over rows and classes of (softmax(student) − teacher)²."""
    return ((torch.softmax(student_logits.float(), dim=1) - teacher_probs) ** 2).mean()


class MeanTeacher(Method):
    name = "mean_teacher"
    needs_unlabeled = True
    defaults = {"lambda_u": 50.0, "unsup_warmup": 0.4, "ema_decay": 0.999}

    def setup(self, model):
        if not self.knob("ema_decay"):
            raise ValueError("mean_teacher needs ema_decay > 0: the EMA model is its teacher")
        super().setup(model)

    def loss(self, model, batch: Batch, step: int):
        # Student: labeled + strong views in one pass (one set of BatchNorm statistics).
        n = len(batch.labeled)
        logits = model(torch.cat([batch.labeled, batch.strong]))
        logits_x, logits_s = logits[:n], logits[n:]
        supervised = F.cross_entropy(logits_x.float(), batch.targets.float())

        # Teacher on the other view: eval mode (averaged BatchNorm statistics, no dropout) and
        # no graph, so the loss cannot reach the EMA weights.
        self.ema.eval()
        with torch.no_grad():
            teacher_probs = torch.softmax(self.ema(batch.weak).float(), dim=1)
        consistency = softmax_mse(logits_s, teacher_probs)

        weight = self.knob("lambda_u") * linear_rampup(step, self.total_steps, self.knob("unsup_warmup"))
        loss = supervised + weight * consistency
        # No mask: every unlabeled image counts; the "pseudo-label" is the teacher's argmax.
        mask = torch.ones(len(teacher_probs), device=teacher_probs.device)
        return loss, {"loss": loss.detach(),
                      "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": consistency.detach(),
                      "unsup/weight": torch.tensor(float(weight)),
                      "unsup/threshold": torch.tensor(0.0),
                      **pseudo_label_metrics(mask, teacher_probs.argmax(1), batch.truth, self.num_classes)}
