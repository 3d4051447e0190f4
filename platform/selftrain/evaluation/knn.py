"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, Sec. 3.4),
the per-epoch monitor of self-supervised pretraining in solo-learn and lightly: cosine
similarity on L2-normalised features, the k most similar labeled images vote for their class
with weight exp(similarity / T). k = 200 and T = 0.1 are the convention (fewer neighbours when
the labeled set is smaller than k). No Ray, no MLflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 200
TEMPERATURE = 0.1


def knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """The predicted class of every row of `queries` (N x D) from `bank` (M x D, labels M)."""
    if len(bank) == 0:
        raise ValueError("kNN needs at least one labeled feature in the bank")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(queries), chunk):  # N x M similarities, a chunk of queries at a time
        similarity = F.normalize(queries[start:start + chunk].float(), dim=1) @ bank.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes, device=top.device)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracy(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = K, temperature: float = TEMPERATURE) -> float:
    predicted = knn_predict(queries, bank, bank_labels, num_classes, k, temperature)
    return float((predicted.cpu() == query_labels.cpu()).float().mean()) if len(query_labels) else float("nan")
