"""Jigsaw puzzles (Noroozi & Favaro 2016): each image is cut into a 3 x 3 grid of tiles, the
tiles are shuffled by one of P fixed permutations, the backbone embeds every tile on its own
(shared weights, Sec. 3's "context-free network") and a head on the concatenated tile features
predicts which permutation (P-way cross-entropy). The permutation set is chosen greedily for
the largest minimal Hamming distance between its members (Sec. 3.2, Algorithm 1), from a fixed
seed, so every worker and every resume uses the same set. Tiles smaller than MIN_TILE pixels
are upsampled to it (the small-image backbones need 8 px)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.pretraining.base import PretrainMethod

MIN_TILE = 8


@functools.cache
def permutation_set(count: int, grid: int = 3, seed: int = 0) -> np.ndarray:
    """`count` permutations of grid² tiles (count x grid²), greedily spread out by Hamming distance."""
    every = np.array(list(itertools.permutations(range(grid * grid))), dtype=np.int8)
    if count > len(every):
        raise ValueError(f"a {grid}x{grid} grid has only {len(every)} permutations, not {count}")
    chosen = [int(np.random.default_rng(seed).integers(len(every)))]
    nearest = (every != every[chosen[0]]).sum(1)
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, (every != every[chosen[-1]]).sum(1))
    return every[chosen].astype(np.int64)


def shuffled_tiles(images: torch.Tensor, permutations: torch.Tensor, labels: torch.Tensor, grid: int) -> torch.Tensor:
    """NCHW images -> (N·grid², C, t, t) tiles, image-major, image i's tiles in the order of
    `permutations[labels[i]]`."""
    n, c, h, w = images.shape
    t = min(h, w) // grid
    tiles = images[:, :, :t * grid, :t * grid].unfold(2, t, t).unfold(3, t, t)  # N C g g t t
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, grid * grid, c, t, t)
    order = permutations[labels]  # N x grid²
    tiles = tiles[torch.arange(n, device=images.device)[:, None], order].reshape(n * grid * grid, c, t, t)
    if t < MIN_TILE:
        tiles = F.interpolate(tiles, size=(MIN_TILE, MIN_TILE), mode="bilinear", align_corners=False)
    return tiles


class TileHead(nn.Module):
    """The features of an image's tiles, concatenated in their shuffled order -> permutation logits."""

    def __init__(self, feature_dim: int, tiles: int, hidden_dim: int, permutations: int):
        super().__init__()
        self.tiles = tiles
        self.mlp = nn.Sequential(nn.Linear(feature_dim * tiles, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, permutations))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.reshape(-1, self.tiles * features.shape[1]))


class Jigsaw(PretrainMethod):
    name = "jigsaw"
    defaults = {"permutations": 64, "grid": 3, "hidden_dim": 512}

    def heads(self, feature_dim):
        grid = self.knob("grid")
        self._permutations = torch.from_numpy(permutation_set(self.knob("permutations"), grid))
        return TileHead(feature_dim, grid * grid, self.knob("hidden_dim"), self.knob("permutations")), None

    def loss(self, network, batch, step):
        images = batch.views[0]
        permutations = self._permutations.to(images.device)
        labels = torch.randint(len(permutations), (len(images),), device=images.device)
        logits = network(shuffled_tiles(images, permutations, labels, self.knob("grid")))["z"].float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.detach(), "pretrain/jigsaw_accuracy": (logits.argmax(1) == labels).float().mean()}
