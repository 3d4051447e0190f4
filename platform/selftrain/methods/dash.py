"""Dash (Xu et al. 2021): FixMatch whose unlabeled images are selected by a loss threshold that
decreases over training (Algorithm 1).

    warm-up (labeled data only) → ρ̂ = the labeled loss of the warmed-up model
    ρ_t = max(C · γ^(−t) · ρ̂, ρ_min),   t = 0, 1, … every `dash_update_every` steps after warm-up
    L_u = mean_b 1[ℓ_w(b) ≤ ρ_t] · CE(strong_b, ŷ_b),   ℓ_w(b) = CE(weak_b, ŷ_b) = −log max p_b

with ŷ = argmax softmax(weak) (detached; Dash runs on FixMatch's hard-label pipeline). γ = 1.27,
C = 1.0001, ρ_min = 0.05, λu = 1, EMA 0.999 (paper, Sec. 5). `unsup/threshold` reports ρ_t.

Choices the paper leaves to its schedule (2^20 steps of 1,024-step "epochs"), kept as fractions of
this run's steps so any run length follows the same curve:
- warm-up `unsup_warmup` = 2048 / 2^20 of the steps (at least one step: ρ̂ needs a measurement),
  the warm-up length of the authors' USB benchmark (num_wu_iter 2048);
- `dash_update_every` (unset) = total_steps · 10 / 1024 rounded (at least 1): t grows by one every
  10 of those 1,024 "epochs", as USB does, so ρ_t reaches ρ_min at the same point of any run.
- ρ̂ = the mean supervised loss over the warm-up steps (each step's loss averaged over workers),
  which needs no extra pass; the paper evaluates the warmed-up model's labeled loss instead.
- During warm-up the unlabeled images are not read: unsup/loss 0, and mask_rate/threshold NaN
  (not measured, so the loop's empty-mask watchdog does not count warm-up epochs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


class Dash(Method):
    name = "dash"
    needs_unlabeled = True
    defaults = {"unsup_warmup": 2048 / 2**20, "dash_gamma": 1.27, "dash_c": 1.0001, "dash_rho_min": 0.05,
                "dash_update_every": None, "lambda_u": 1.0, "ema_decay": 0.999}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup_steps = max(1, round(float(self.knob("unsup_warmup")) * self.total_steps))
        self.update_every = self.knob("dash_update_every") or max(1, round(self.total_steps * 10 / 1024))
        self.rho0: float | None = None
        self.t = 0
        self.warmup_sum, self.warmup_count = 0.0, 0

    def resolved_knobs(self):
        return {**super().resolved_knobs(), "dash_update_every": self.update_every}

    def rho(self) -> float:
        return max(self.knob("dash_c") * self.knob("dash_gamma") ** (-self.t) * self.rho0, self.knob("dash_rho_min"))

    def loss(self, model, batch: Batch, step: int):
        if step < self.warmup_steps:
            logits_x = model(batch.labeled)
            supervised = F.cross_entropy(logits_x, batch.targets)
            # The global batch's loss, so every rank accumulates (and checkpoints) the same ρ̂.
            self.warmup_sum += float(self.comm.all_reduce_mean(supervised.float()))
            self.warmup_count += 1
            nan = torch.tensor(math.nan)
            pseudo = torch.zeros(len(batch.weak), dtype=torch.long, device=logits_x.device)
            metrics = pseudo_label_metrics(torch.zeros(len(batch.weak), device=logits_x.device), pseudo,
                                           batch.truth, self.num_classes)
            metrics["unsup/mask_rate"] = nan
            return supervised, {"loss": supervised.detach(),
                                "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                                "sup/loss": supervised.detach(), "unsup/loss": torch.zeros(()),
                                "unsup/threshold": nan, **metrics}

        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        supervised = F.cross_entropy(logits_x, batch.targets)
        if self.rho0 is None:
            # End of warm-up. No warm-up step seen (a run resumed past it without this state):
            # fall back on this step's labeled loss.
            self.rho0 = (self.warmup_sum / self.warmup_count if self.warmup_count
                         else float(self.comm.all_reduce_mean(supervised.float())))
        # t from the step, not a call counter: a resumed run (the epoch re-run) gets the same ρ_t.
        self.t = (step - self.warmup_steps) // self.update_every
        rho = self.rho()

        weak = logits_w.detach().float()
        pseudo = weak.argmax(dim=1)
        weak_loss = F.cross_entropy(weak, pseudo, reduction="none")  # = −log max p, computed stably
        mask = (weak_loss <= rho).float()
        unsupervised = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()
        loss = supervised + self.knob("lambda_u") * unsupervised
        return loss, {"loss": loss.detach(), "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/threshold": torch.tensor(rho),
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}

    def state_dict(self):
        return {**super().state_dict(), "rho0": self.rho0, "t": self.t,
                "warmup_sum": self.warmup_sum, "warmup_count": self.warmup_count}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "warmup_count" in state:
            self.rho0, self.t = state["rho0"], state["t"]
            self.warmup_sum, self.warmup_count = state["warmup_sum"], state["warmup_count"]
