"""FlexMatch (Zhang et al. 2021): FixMatch with Curriculum Pseudo Labelling (CPL), per-class
thresholds that rise as each class is learned.

    σ(c) = #{n : û_n = c}                                     (Eq. 6, û_n: last confident class)
    β(c) = σ(c) / max(max_c σ, N − Σ_c σ)   (warm-up, Eq. 11)   or   σ(c) / max_c σ   (Eq. 7)
    T(c) = M(β(c)) · τ,   M(x) = x / (2 − x)                  (Eq. 8, the convex mapping of Eq. 10)
    L_u  = mean_b 1[max p_b ≥ T(ŷ_b)] · CE(strong_b, ŷ_b),    p = softmax(weak), ŷ = argmax p  (Eq. 9)

û_n is a per-image record over the whole pool (−1 = "not yet confident"), updated to ŷ_b whenever
max p_b > τ (the fixed τ; Algorithm 1). τ = 0.95, λu = 1, EMA 0.999 as in FixMatch; the convex
M and threshold warm-up are the paper's (and USB's) defaults.

Choices: as in the paper's Algorithm 1, this step's thresholds come from the records before this
batch updates them (USB updates first; it differs by one batch). Before any record exists every
β is 0 (USB's convention; the paper's 0/0 without warm-up), so every T(c) = 0: early on all
pseudo-labels count, the "low thresholds while the class is unlearned" end of the curriculum.
≥ rather than the paper's > in the mask, the convention of every other method here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftrain.methods.base import Batch, Method, pseudo_label_metrics


def flexmatch_thresholds(records: torch.Tensor, num_classes: int, tau: float, warmup: bool) -> torch.Tensor:
    """T(c) for every class from the per-image records (−1 = unused)."""
    sigma = torch.bincount(records[records >= 0], minlength=num_classes).float()
    denominator = sigma.max()
    if warmup:
        # The unused count sits in the normaliser, so thresholds stay low while most of the
        # pool has never been predicted confidently (Eq. 11).
        denominator = torch.maximum(denominator, (records < 0).sum().float())
    # σ are counts: a zero normaliser means every σ is 0, and 0 / 1 = 0 (no host sync needed).
    beta = sigma / denominator.clamp_min(1.0)
    return tau * beta / (2.0 - beta)


class FlexMatch(Method):
    name = "flexmatch"
    needs_unlabeled = True
    defaults = {"threshold": 0.95, "lambda_u": 1.0, "ema_decay": 0.999, "threshold_warmup": True}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = torch.full((self.pool_size,), -1, dtype=torch.long)

    def loss(self, model, batch: Batch, step: int):
        logits_x, logits_w, logits_s = self.forward_all(model, batch)
        supervised = F.cross_entropy(logits_x, batch.targets)
        self.records = self.records.to(logits_w.device)

        tau = float(self.knob("threshold"))
        thresholds = flexmatch_thresholds(self.records, self.num_classes, tau, bool(self.knob("threshold_warmup")))
        probs = torch.softmax(logits_w.detach().float(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= thresholds[pseudo]).float()
        unsupervised = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()

        # Every worker sees different images: gather every worker's (index, class, confident?)
        # so all ranks apply the same updates and keep identical records (same shape per rank).
        update = self.comm.all_gather(torch.stack([batch.index.to(pseudo.device).long(), pseudo,
                                                   (confidence > tau).long()], dim=1))
        rows = update[update[:, 2] == 1]
        # An image twice in the global batch: the later row wins, the same on every rank (indexed
        # assignment with repeated indices leaves the winner unspecified on CUDA).
        order = torch.arange(len(rows), device=rows.device)
        last = torch.full_like(self.records, -1).scatter_reduce(0, rows[:, 0], order, reduce="amax")
        rows = rows[last[rows[:, 0]] == order]
        self.records[rows[:, 0]] = rows[:, 1]

        loss = supervised + self.knob("lambda_u") * unsupervised
        return loss, {"loss": loss.detach(), "accuracy": (logits_x.argmax(1) == batch.targets.argmax(1)).float().mean(),
                      "sup/loss": supervised.detach(), "unsup/loss": unsupervised.detach(),
                      "unsup/threshold": thresholds.mean(),
                      **{f"unsup/threshold_class_{c}": thresholds[c] for c in range(self.num_classes)},
                      **pseudo_label_metrics(mask, pseudo, batch.truth, self.num_classes)}

    def state_dict(self):
        return {**super().state_dict(), "records": self.records.cpu().clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("records") is not None:
            if len(state["records"]) != self.pool_size:
                raise ValueError(f"flexmatch: the checkpoint holds {len(state['records'])} pool records, "
                                 f"the pool has {self.pool_size} images")
            self.records = state["records"].clone().long()
