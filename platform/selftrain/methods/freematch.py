"""FreeMatch (Wang et al. 2023): self-adaptive thresholds and self-adaptive fairness.

    τ_t    = λ τ_{t−1} + (1 − λ) mean_b max q_b                          (Eq. 5, τ_0 = 1/C)
    p̃_t(c) = λ p̃_{t−1}(c) + (1 − λ) mean_b q_b(c)                        (Eq. 6, p̃_0 = 1/C)
    τ_t(c) = MaxNorm(p̃_t)(c) · τ_t = p̃_t(c) / max_c p̃_t · τ_t             (Eq. 7)
    L_u    = mean_b 1[max q_b ≥ τ_t(ŷ_b)] · CE(strong_b, ŷ_b)            (Eq. 8)
    h̃_t    = λ h̃_{t−1} + (1 − λ) Hist(ŷ)                                 (histogram EMA, h̃_0 = 1/C)
    L_f    = −H(SumNorm(p̃_t / h̃_t), SumNorm(p̄ / h̄))                      (Eq. 9-11)

q = softmax(weak) (detached), ŷ = argmax q; p̄ = mean of the strong-view probabilities Q_b over
the masked images and h̄ the normalised histogram of their argmax (Eq. 9-10). H(a, b) is the
cross-entropy −Σ a log b, so L_f = Σ_c a_c log b_c: the paper's sign, which its authors confirm
(USB issue 182): the entropy-maximisation term −H(p̄) with its first argument replaced by the
momentum average p̃/h̃ (detached). λ = 0.999, w_f = 0.01, λu = 1 (paper, Sec. 4).
L = L_s + λu L_u + w_f L_f.

Choices: the statistics are updated with this batch first, then the mask is taken (τ_t includes
batch t, as in Eq. 5). Statistics are averaged over workers first, so the global batch decides,
as on one GPU. L_f uses each worker's own masked images (a per-worker loss, its gradient averaged
by DDP). A class absent from h̄ has p̄/h̄ undefined; it is left out of the sum (USB adds
a_c·log(1e-12) there, a constant without gradient); L_f = 0 when no image passes the mask.
≥ in the mask, the convention of every other method here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def fairness_loss(probs_strong: torch.Tensor, p_tilde: torch.Tensor, h_tilde: torch.Tensor) -> torch.Tensor:
    """Σ_c a_c log b_c, a = SumNorm(p̃/h̃), b = SumNorm(p̄/h̄) over the masked strong-view rows."""
    if len(probs_strong) == 0:
        return probs_strong.sum() * 0.0
    # A class the weak view has not predicted for ~10^5 steps can underflow h̃ to 0: weight 0.
    target = torch.where(h_tilde > 0, p_tilde / h_tilde, torch.zeros_like(p_tilde))
    target = target / target.sum()
    hist = torch.bincount(probs_strong.detach().argmax(1), minlength=len(p_tilde)).float()
    hist = hist / hist.sum()
    present = hist > 0
    mean = probs_strong.mean(0)[present] / hist[present]
    return (target[present] * torch.log(mean / mean.sum())).sum()


class FreeMatch(Method):
    name = "freematch"
    needs_unlabeled = True
    defaults = {"stats_momentum": 0.999, "lambda_u": 1.0, "fairness_weight": 0.01, "ema_decay": 0.999}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
        self.tau, self.p_tilde, self.h_tilde = torch.tensor(1.0 / self.num_classes), uniform.clone(), uniform.clone()

    def loss(self, model, batch: Batch, step: int):
        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        supervised = F.cross_entropy(logits_x, batch.targets)
        probs = torch.softmax(logits_w.detach().float(), dim=1)
        confidence, pseudo = probs.max(dim=1)

        # One all-reduce for the three batch statistics: equal per-worker batches, so the mean of
        # the workers' means is the global batch's mean.
        c, m = self.num_classes, float(self.knob("stats_momentum"))
        hist = torch.bincount(pseudo, minlength=c).float() / len(pseudo)
        stats = self.comm.all_reduce_mean(torch.cat([confidence.mean()[None], probs.mean(0), hist]))
        device = stats.device
        self.tau = m * self.tau.to(device) + (1 - m) * stats[0]
        self.p_tilde = m * self.p_tilde.to(device) + (1 - m) * stats[1:1 + c]
        self.h_tilde = m * self.h_tilde.to(device) + (1 - m) * stats[1 + c:]

        thresholds = self.tau * self.p_tilde / self.p_tilde.max()
        mask = (confidence >= thresholds[pseudo]).float()
        unsupervised = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()
        probs_strong = torch.softmax(logits_s.float(), dim=1)[mask.bool()]
        fairness = fairness_loss(probs_strong, self.p_tilde, self.h_tilde)

        loss = supervised + self.knob("lambda_u") * unsupervised + self.knob("fairness_weight") * fairness
        return loss, {"loss": loss.detach(), "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/fairness_loss": fairness.detach(), "unsup/threshold": self.tau.clone(),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}

    def state_dict(self):
        return {**super().state_dict(), "tau": self.tau.cpu().clone(), "p_tilde": self.p_tilde.cpu().clone(),
                "label_hist": self.h_tilde.cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("tau") is not None:
            self.tau, self.p_tilde = state["tau"].clone().float(), state["p_tilde"].clone().float()
            self.h_tilde = state["label_hist"].clone().float()
