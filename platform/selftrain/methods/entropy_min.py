"""Entropy minimisation (Grandvalet & Bengio 2005, "Semi-supervised learning by entropy
minimization", Sec. 2, the minimum-entropy criterion): the labeled likelihood plus a penalty on the
conditional entropy of the predictions on unlabeled data,

    L = CE(labeled) + λu · mean_b H(softmax(weak_b)),   H(p) = −Σ_c p_c log p_c

The entropy is computed from the live logits, so its gradient pushes the decision boundary into
low-density regions (that is the whole method: nothing is detached). The paper picks λ per task
by cross-validation; λu = 0.1 is this project's default (a regulariser, not the main signal).
No mask: every unlabeled image counts; the reported pseudo-label is the argmax, for the collapse
monitor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of −Σ p log p, with log p from log_softmax (finite even where p underflows)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


class EntropyMin(Method):
    name = "entropy_min"
    needs_unlabeled = True
    defaults = {"lambda_u": 0.1, "ema_decay": 0.999}

    def loss(self, model, batch: Batch, step: int):
        # One forward pass over labeled + weak images (one set of BatchNorm statistics).
        n = len(batch.labeled)
        logits = model(torch.cat([batch.labeled, batch.weak]))
        logits_x, logits_w = logits[:n], logits[n:]
        supervised = F.cross_entropy(logits_x.float(), batch.targets.float())
        entropy = mean_entropy(logits_w)
        loss = supervised + self.knob("lambda_u") * entropy

        pseudo = logits_w.detach().float().argmax(dim=1)
        mask = torch.ones(len(pseudo), device=pseudo.device)
        return loss, {"loss": loss.detach(),
                      "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": entropy.detach(),
                      "unsup/threshold": torch.tensor(0.0),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}
