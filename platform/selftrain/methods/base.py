"""What every training objective shares: the batch it sees, its knobs, and the loop's contract.

A method computes; the training loop (`training/loop.py`) orchestrates. Per step the loop calls

    loss, metrics = method.loss(model, batch, step)    # the method's formula
    loss.backward(); optimizer.step()
    method.after_step(model)                           # e.g. update an EMA model

and evaluates / saves `method.eval_model(model)` (the EMA weights where the method keeps them).
What a method carries across steps (EMA weights, class counts, running statistics) goes into
`state_dict()` and is restored from every checkpoint, so a resumed run continues the same schedule.

Where a paper's single-GPU formula needs statistics of the whole batch, a method reduces them
with `self.comm` (an all-reduce across the DDP workers; the identity on one worker), so two
workers keep the same state as one worker seeing both halves of the batch.

No Ray, no MLflow here: methods test on tiny tensors in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel


@dataclass
class Batch:
    """One training step's inputs, already normalised model inputs on the worker's device.

    `labeled`/`targets`: the supervised stream (one-hot rows for labeled images; soft teacher
    targets for pseudo-labeled ones). `weak`/`strong`: two views of the same unlabeled images
    (None for methods that do not read the pool); `index`: each unlabeled image's slot in
    `[0, pool_size)` (per-sample state); `truth`: its true class, -1 when unknown. `views`: two
    augmented views of the same pool images, for self-supervised pretraining (`pretraining/`),
    where the supervised stream is empty.
    """

    labeled: torch.Tensor
    targets: torch.Tensor
    weak: torch.Tensor | None = None
    strong: torch.Tensor | None = None
    index: torch.Tensor | None = None
    truth: torch.Tensor | None = None
    views: list[torch.Tensor] | None = None


class Comm:
    """Reductions across the DDP workers: identities when there is one process."""

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over workers (a new tensor; gradients do not flow)."""
        value = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def all_gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every worker's `value` (same shape on each) concatenated along dim 0, in rank order."""
        value = value.detach().contiguous()
        if self.world_size == 1:
            return value
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value)
        return torch.cat(parts)


class Method:
    """Base of every objective (one level of inheritance, no deeper).

    Subclasses set `name`, `needs_unlabeled` and `defaults` (the paper's value of each knob they
    read, used when the config leaves the knob unset) and override `loss`. Knobs are read with
    `self.knob("threshold")`.
    """

    name: ClassVar[str] = ""
    needs_unlabeled: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, num_classes: int, knobs: dict[str, Any] | None = None, total_steps: int = 1,
                 pool_size: int | None = None, comm: Comm | None = None):
        self.num_classes = num_classes
        self.knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
        self.total_steps = max(total_steps, 1)
        self.pool_size = pool_size
        self.comm = comm or Comm()
        self.ema: AveragedModel | None = None
        if self.needs_unlabeled and not pool_size:
            raise ValueError(f"method {self.name!r} learns from the unlabeled pool, but the pool is empty")

    # -- knobs -------------------------------------------------------------------------------
    def knob(self, key: str) -> Any:
        if key in self.knobs:
            return self.knobs[key]
        if key in self.defaults:
            return self.defaults[key]
        raise KeyError(f"method {self.name!r} has no value for knob {key!r}")

    def resolved_knobs(self) -> dict[str, Any]:
        """Every knob this method reads, as it will use it (for the run's record)."""
        return {key: self.knob(key) for key in self.defaults}

    # -- the loop's contract -----------------------------------------------------------------
    def network(self, model: nn.Module) -> nn.Module:
        """What the loop trains: the classifier itself (a pretraining method wraps its backbone)."""
        return model

    def setup(self, model: nn.Module) -> None:
        """Called once the bare model sits on its device (before any restore)."""
        decay = self.knobs.get("ema_decay", self.defaults.get("ema_decay", 0.0))
        if decay:
            # BatchNorm statistics are averaged too (use_buffers), as the FixMatch/USB EMA does.
            self.ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(decay), use_buffers=True)
            self.ema.eval()

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update_parameters(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The weights to evaluate and save: the EMA model where there is one."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    # -- shared pieces -----------------------------------------------------------------------
    def forward_all(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of labeled, weak and strong images in one forward pass (one set of BatchNorm
        statistics over all three, as FixMatch's reference implementation does)."""
        n, m = len(batch.labeled), len(batch.weak)
        logits = model(torch.cat([batch.labeled, batch.weak, batch.strong]))
        return logits[:n], logits[n:n + m], logits[n + m:]


def ema_with_warmup(decay: float):
    """EMA update with the decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's ExponentialMovingAverage with `num_updates`). FixMatch's 0.999 assumes 2^20
    steps; over a budget of 1,000 steps a plain 0.999 would still hold 37% of the first step's
    near-random weights, while the warm-up lets the average follow the early, fast-changing
    weights and reach the full decay after about 9,000 updates. A `multi_avg_fn`: one decay per
    group of tensors, applied with torch's foreach lerp as `get_ema_multi_avg_fn` does."""
    @torch.no_grad()
    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): foreach lerp takes floats only
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1 - d))
    return average


def pseudo_label_metrics(mask: torch.Tensor, pseudo: torch.Tensor, truth: torch.Tensor | None,
                         num_classes: int) -> dict[str, torch.Tensor]:
    """What the loop watches in every online method (`mask` may be 0/1 or a soft weight):

    - `unsup/mask_rate`: the fraction of unlabeled images that passed (mean weight);
    - `unsup/top_class_fraction`: the largest class's share of the passing pseudo-labels
      (near 1: pseudo-labels collapsing onto one class; NaN when none passed);
    - `unsup/pseudo_accuracy`: accuracy of the passing pseudo-labels whose truth is known
      (NaN when none is known: the loop skips NaN).
    """
    weight = mask.detach().float()
    nan = torch.tensor(float("nan"), device=weight.device)
    counts = torch.zeros(num_classes, device=weight.device).index_add_(0, pseudo, weight)
    metrics = {"unsup/mask_rate": weight.mean(),
               "unsup/top_class_fraction": counts.max() / counts.sum() if counts.sum() > 0 else nan}
    if truth is not None:
        known = (truth >= 0).float() * weight
        metrics["unsup/pseudo_accuracy"] = (((pseudo == truth).float() * known).sum() / known.sum()
                                            if known.sum() > 0 else nan)
    return metrics
