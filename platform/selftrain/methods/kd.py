"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", Sec. 2): match the teacher's softened distribution, plus cross-entropy on the labels,

    L = (1 − α) · CE(z, argmax y) + α · T² · KL(p_T ‖ softmax(z / T))

The stream is `batch.labeled` with `batch.targets` a class distribution per row: one-hot for
labeled images, the teacher's softmax at T = 1 for pseudo-labeled ones (what the pseudo-label
stage stores). The teacher's logits are gone, but they are not needed: softmax(t)^(1/T),
renormalised, equals softmax(t / T) exactly, so p_T ∝ y^(1/T) re-tempers the stored distribution;
a one-hot row stays one-hot (0^(1/T) = 0). The T² keeps the soft term's gradients at the same
scale as the hard term's when T changes (Sec. 2). α = 0.9, T = 4 are the usual CIFAR settings.
KL is summed over classes and averaged over rows (PyTorch's "batchmean", the true KL per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method


def retemper(targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """p ∝ targets^(1/T), computed in log space: log 0 = −inf stays −inf and gives exactly 0."""
    return torch.softmax(torch.log(targets.detach().float()) / temperature, dim=1)


def distillation_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of KL(teacher ‖ softmax(logits / T)); `teacher` is already tempered.

    xlogy(p, p) is 0 where p = 0 (plain p·log p would be 0·(−inf) = NaN), and p · log q is 0 there,
    so targets with exact zeros give a finite loss and finite gradients.
    """
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    kl = (torch.special.xlogy(teacher, teacher) - teacher * log_q).sum(dim=1).mean()
    return temperature ** 2 * kl


def kd_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE part, T²·KL part) with loss = (1 − α)·CE + α·T²·KL."""
    supervised = F.cross_entropy(logits.float(), labels)
    distill = distillation_kl(logits, teacher, temperature)
    return (1.0 - alpha) * supervised + alpha * distill, supervised, distill


class KnowledgeDistillation(Method):
    name = "kd"
    needs_unlabeled = False
    defaults = {"alpha": 0.9, "temperature": 4.0}

    def loss(self, model, batch: Batch, step: int):
        logits = model(batch.labeled)
        temperature = float(self.knob("temperature"))
        labels = batch.targets.argmax(dim=1)  # the hard label: the teacher's top class on pseudo rows
        teacher = retemper(batch.targets, temperature)
        loss, supervised, distill = kd_loss(logits, teacher, labels, self.knob("alpha"), temperature)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(1) == labels).float().mean(),
                      "sup/loss": supervised.detach(), "kd/loss": distill.detach()}
