"""FixMatch (Sohn et al. 2020, Eq. 2-4): consistency between a weak and a strong view.

    L = CE(labeled) + λu · mean_b 1[max p_b ≥ τ] · CE(strong_b, argmax p_b),   p = softmax(weak)

with hard pseudo-labels from the weak view, which gives no gradient (Sec. 2.2). τ = 0.95,
λu = 1, μ = 7 and an EMA of the weights (0.999) for evaluation are the paper's defaults
(Sec. 4, Appendix B.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def fixmatch_unsupervised(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                          threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mask, pseudo-labels): the masked hard-label cross-entropy, averaged over all μB
    unlabeled images (masked ones count as zeros, as in the paper's Eq. 4)."""
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    return loss, mask, pseudo


class FixMatch(Method):
    name = "fixmatch"
    needs_unlabeled = True
    defaults = {"threshold": 0.95, "lambda_u": 1.0, "ema_decay": 0.999}

    def loss(self, model, batch: Batch, step: int):
        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        supervised = F.cross_entropy(logits_x, batch.targets)
        unsupervised, mask, pseudo = fixmatch_unsupervised(logits_w, logits_s, self.knob("threshold"))
        loss = supervised + self.knob("lambda_u") * unsupervised
        return loss, {"loss": loss.detach(), "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/threshold": torch.tensor(float(self.knob("threshold"))),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}
