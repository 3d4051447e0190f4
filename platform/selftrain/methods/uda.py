"""Unsupervised Data Augmentation (Xie et al. 2020, Eq. 1; TSA and sharpening in Sec. 3): soft
consistency between a weak and a strongly augmented view, with confidence masking, sharpening and
optional training-signal annealing (TSA).

    L = CE_TSA(labeled) + λu · mean_b 1[max p_b ≥ β] · CE(softmax(weak_b / T), softmax(strong_b))

- Sharpening: the target is softmax(weak / T), T = 0.4, detached (Sec. 3, "Sharpening
  Predictions"). USB's port computes T but never applies it; here it is applied.
- Confidence mask β = 0.8 on the UNsharpened p = softmax(weak) (the paper's masking, as in its
  code); ≥ rather than the code's >, the convention of every other method here.
- The paper writes a KL divergence; KL(q̂ ‖ p_s) = CE(q̂, p_s) − H(q̂) and H(q̂) does not depend on
  the weights (the target is detached), so CE has the same gradients. The reported loss is the CE.
- The masked loss averages over all μB unlabeled images (masked ones count as zeros), as the
  paper's code does.
- Training Signal Annealing (Sec. 3): at t = step / total_steps, η_t = α_t·(1 − 1/K)
  + 1/K with α_t = t (linear), 1 − exp(−5t) (log) or exp(5(t − 1)) (exp); labeled rows whose
  probability of their class (argmax of the row's target) exceeds η_t are dropped, and the
  supervised loss is averaged over the rows kept (at least 1), as the paper's code normalises it.
  tsa = "none" is η = 1: no row is ever dropped, the plain mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def tsa_threshold(schedule: str, progress: float, num_classes: int) -> float:
    """η_t of training-signal annealing at `progress` = step / total_steps (clipped to [0, 1])."""
    t = min(max(progress, 0.0), 1.0)
    if schedule == "none":
        return 1.0
    alpha = {"linear": lambda: t,
             "log": lambda: 1.0 - math.exp(-5.0 * t),
             "exp": lambda: math.exp(5.0 * (t - 1.0))}[schedule]()
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def uda_unsupervised(logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mask, argmax of p): masked soft-target cross-entropy of the strong view."""
    weak = logits_weak.detach().float()
    probs = torch.softmax(weak, dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    targets = torch.softmax(weak / temperature, dim=1)  # sharpened target, no gradient
    per_row = -(targets * F.log_softmax(logits_strong.float(), dim=1)).sum(dim=1)
    return (per_row * mask).mean(), mask, pseudo


class UDA(Method):
    name = "uda"
    needs_unlabeled = True
    defaults = {"temperature": 0.4, "threshold": 0.8, "lambda_u": 1.0, "tsa": "none", "ema_decay": 0.999}

    def loss(self, model, batch: Batch, step: int):
        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        targets = batch.targets.float()

        # TSA: drop labeled rows the model is already confident on, so the few labels are not
        # overfitted before the unlabeled signal catches up.
        eta = tsa_threshold(self.knob("tsa"), step / self.total_steps, self.num_classes)
        label = targets.argmax(dim=1)
        correct_prob = torch.softmax(logits_x.detach().float(), dim=1).gather(1, label[:, None]).squeeze(1)
        keep = (correct_prob <= eta).float()
        per_row = -(targets * F.log_softmax(logits_x.float(), dim=1)).sum(dim=1)
        supervised = (per_row * keep).sum() / keep.sum().clamp_min(1.0)

        threshold = float(self.knob("threshold"))
        unsupervised, mask, pseudo = uda_unsupervised(logits_w, logits_s, self.knob("temperature"), threshold)
        loss = supervised + self.knob("lambda_u") * unsupervised
        return loss, {"loss": loss.detach(),
                      "accuracy": (logits_x.argmax(1) == label).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "sup/tsa_threshold": torch.tensor(eta), "sup/tsa_kept": keep.mean(),
                      "unsup/threshold": torch.tensor(threshold),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}
