"""SoftMatch (Chen et al. 2023): a truncated-Gaussian weight instead of a hard confidence mask.

    λ(p) = exp(−(max p − μ_t)² / (2 σ_t² / n_σ²))   if max p < μ_t,   else 1    (Eq. 7, λ_max = 1)
    μ_t  = m μ_{t−1} + (1 − m) mean_b max p_b                                 (Eq. 8, μ_0 = 1/C)
    σ_t² = m σ_{t−1}² + (1 − m) (N / (N − 1)) var_b max p_b                   (Eq. 8, σ_0² = 1)
    L_u  = mean_b λ(p_b) · CE(strong_b, argmax p_b)

p = softmax(weak), detached, after Uniform Alignment (UA, Sec. 3.3), on by default:
p ← Normalise(p · u / p̂_model), u = 1/C, p̂_model an EMA (m) of the mean weak-view probabilities
(init 1/C). m = 0.999, n_σ = 2 (the weight's width σ_t/2), λu = 1, hard pseudo-labels: the
paper's defaults. The mean also gives `unsup/threshold`: images at or above μ_t get weight 1.

Choices: p̂_model and then μ_t, σ_t² are updated with this batch before the weights are taken (the
estimates at step t include batch t, Eq. 8); p̂_model is updated with the unaligned p, the
alignment applied after. Across workers: the mean probabilities and E[max p], E[(max p)²] are
averaged over workers (equal per-worker batches), so mean and unbiased variance are exactly the
global batch's, N = per-worker batch × workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def softmatch_weight(confidence: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, n_sigma: float) -> torch.Tensor:
    """λ(p): 1 at or above μ, a Gaussian of standard deviation σ/n_σ below it."""
    below = torch.clamp(confidence - mu, max=0.0)
    return torch.exp(-below ** 2 / (2.0 * var / n_sigma ** 2))


class SoftMatch(Method):
    name = "softmatch"
    needs_unlabeled = True
    defaults = {"n_sigma": 2.0, "stats_momentum": 0.999, "lambda_u": 1.0, "distribution_alignment": True,
                "ema_decay": 0.999}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mu, self.var = torch.tensor(1.0 / self.num_classes), torch.tensor(1.0)
        self.p_model = torch.full((self.num_classes,), 1.0 / self.num_classes)

    def loss(self, model, batch: Batch, step: int):
        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        supervised = F.cross_entropy(logits_x, batch.targets)
        m = float(self.knob("stats_momentum"))
        probs = torch.softmax(logits_w.detach().float(), dim=1)
        if self.knob("distribution_alignment"):
            # Uniform alignment: divide out the model's running class bias, so the weights
            # (and pseudo-labels) do not favour the classes it already predicts most.
            mean_probs = self.comm.all_reduce_mean(probs.mean(0))
            self.p_model = m * self.p_model.to(probs.device) + (1 - m) * mean_probs
            probs = probs / self.p_model / self.num_classes
            probs = probs / probs.sum(dim=1, keepdim=True)
        confidence, pseudo = probs.max(dim=1)

        # E[x] and E[x²] in float64 (one all-reduce): the global variance without cancellation.
        moments = self.comm.all_reduce_mean(torch.stack([confidence.double().mean(), confidence.double().pow(2).mean()]))
        n = len(confidence) * self.comm.world_size
        self.mu = m * self.mu.to(probs.device) + (1 - m) * moments[0].float()
        if n > 1:  # the unbiased variance needs two images
            batch_var = (moments[1] - moments[0] ** 2).clamp_min(0.0) * n / (n - 1)
            self.var = m * self.var.to(probs.device) + (1 - m) * batch_var.float()

        weight = softmatch_weight(confidence, self.mu, self.var.to(probs.device), float(self.knob("n_sigma")))
        unsupervised = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * weight).mean()
        loss = supervised + self.knob("lambda_u") * unsupervised
        return loss, {"loss": loss.detach(), "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/threshold": self.mu.clone(), "unsup/std": self.var.sqrt(),
                      **pseudo_label_metrics(weight, pseudo, batch.truth, self.num_classes)}

    def state_dict(self):
        return {**super().state_dict(), "mu": self.mu.cpu().clone(), "var": self.var.cpu().clone(),
                "p_model": self.p_model.cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("mu") is not None:
            self.mu, self.var = state["mu"].clone().float(), state["var"].clone().float()
            self.p_model = state["p_model"].clone().float()
