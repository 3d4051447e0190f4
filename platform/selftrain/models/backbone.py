"""A classifier's backbone: the network up to its final linear layer.

Self-supervised pretraining trains the backbone (the classifier with its last `nn.Linear`
replaced by the identity, so it returns features); the result is saved in the classifier's own
format (the untrained linear layer put back), so every stage that loads a model loads it, and a
teacher starts from it with `load_backbone`, which takes every weight but the classifier's.

Every registered architecture ends in one `nn.Linear` after global pooling (and dropout):
torchvision's `fc` / `classifier[-1]`, and the small-image models' `fc`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def classifier_name(model: nn.Module) -> str:
    """The qualified name of the model's last `nn.Linear` (e.g. `fc.1`)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to split off")
    return names[-1]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    return parent, leaf


def strip_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear, str]:
    """(backbone, linear, name): `model` itself, its classifier replaced by `nn.Identity`, so it
    returns `linear.in_features`-wide features; the linear layer and its name come back apart."""
    name = classifier_name(model)
    parent, leaf = _parent(model, name)
    linear = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return model, linear, name


def with_classifier(backbone: nn.Module, linear: nn.Linear, name: str) -> nn.Module:
    """A copy of `backbone` with `linear` back in place: a model in its architecture's format."""
    model = copy.deepcopy(backbone)
    parent, leaf = _parent(model, name)
    setattr(parent, leaf, copy.deepcopy(linear))
    return model


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every weight of `state` into `model` except its classifier's, which keeps its fresh
    initialisation (a new head on a pretrained backbone). Any other missing or unexpected key is
    an error: the weights come from another architecture. Returns the keys left out."""
    head = classifier_name(model) + "."
    kept = {k: v for k, v in state.items() if not k.startswith(head)}
    own = model.state_dict()
    wrong = [k for k, v in kept.items() if k in own and v.shape != own[k].shape]
    if not wrong:
        missing, unexpected = model.load_state_dict(kept, strict=False)
        wrong = [k for k in missing if not k.startswith(head)] + list(unexpected)
    if wrong:
        raise ValueError(f"the saved backbone does not fit {type(model).__name__}: "
                         f"{len(wrong)} mismatched weights, e.g. {', '.join(wrong[:3])}")
    return sorted(k for k in state if k.startswith(head))
