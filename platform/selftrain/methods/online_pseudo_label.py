"""Pseudo-Label (Lee 2013, Eq. 15-16), online: the model labels the unlabeled batch for itself.

    L = CE(labeled) + α(t) · mean_b 1[max p_b ≥ τ] · CE(weak_b, argmax p_b),   p = softmax(weak)

The pseudo-label is the argmax of the model's own (detached) prediction on the same weak view the
loss is taken on: Lee's method has a single view, no strong augmentation. α(t) ramps up from 0
because early pseudo-labels are mostly wrong (Lee, Sec. 3.4, a ramp between T1 and T2); here it
rises linearly from 0 to λu over the first `unsup_warmup` fraction of the steps.

Choices the paper leaves open: Lee has no confidence threshold (every image counts); the
threshold τ = 0.95 follows the USB/FixMatch port of the method, and τ = 0 recovers Lee. The masked
loss averages over all μB unlabeled images (masked ones count as zeros), as FixMatch's Eq. 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def linear_rampup(step: int, total_steps: int, warmup: float) -> float:
    """clip(step / (warmup · total_steps), 0, 1); 1 from the start when there is no warm-up."""
    span = warmup * total_steps
    if span <= 0:
        return 1.0
    return min(max(step / span, 0.0), 1.0)


class PseudoLabel(Method):
    name = "pseudo_label"
    needs_unlabeled = True
    defaults = {"threshold": 0.95, "lambda_u": 1.0, "unsup_warmup": 0.4, "ema_decay": 0.999}

    def loss(self, model, batch: Batch, step: int):
        # One forward pass over labeled + weak images: one set of BatchNorm statistics for both.
        n = len(batch.labeled)
        logits = model(torch.cat([batch.labeled, batch.weak]))
        logits_x, logits_w = logits[:n], logits[n:]
        supervised = F.cross_entropy(logits_x.float(), batch.targets.float())

        # Targets from detached float32 probabilities: the label is a fixed target, not a path
        # for gradients (argmax has none anyway, but the mask must not depend on autocast dtype).
        probs = torch.softmax(logits_w.detach().float(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        threshold = float(self.knob("threshold"))
        mask = (confidence >= threshold).float()
        # The gradient flows through the same weak logits the label came from (Lee's Eq. 15).
        unsupervised = (F.cross_entropy(logits_w.float(), pseudo, reduction="none") * mask).mean()

        weight = self.knob("lambda_u") * linear_rampup(step, self.total_steps, self.knob("unsup_warmup"))
        loss = supervised + weight * unsupervised
        return loss, {"loss": loss.detach(),
                      "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/weight": torch.tensor(float(weight)),
                      "unsup/threshold": torch.tensor(threshold),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}
