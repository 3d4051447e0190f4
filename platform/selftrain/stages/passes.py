"""Reproducible training streams: every row's augmentation drawn from a seed of its own.

Ray Data decodes and augments the training images in tasks on any worker process, in any order;
drawn from the process's random state, the same config and seed gave other augmentations, other
batches and other weights on every run, and a run restored from a checkpoint could not equal
the run it replaced. Here a row's random ops are drawn from a seed made of the run's seed, the
stream, the pass over that stream, and the row's key (its path and which repeat of it), and
nothing else:

- the training loop counts the passes of each stream (a pass: one execution of its Ray Data
  shard) and tells a small actor, `StreamPasses`, which pass it starts, before starting it;
- each task asks the actor once per batch (`pass_of`) and seeds each row (`row_seeds`);
- the streams run with Ray Data's `preserve_order`, so the rows come in the same order;
- the loop's window shuffle is seeded by the pass too, and a checkpoint keeps each stream's
  position (pass, batches consumed), so a restarted worker replays its pass to that point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from selftrain.seeds import seed_of


@ray.remote(num_cpus=0)
class StreamPasses:
    """Which pass each stream of one training run is making."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}

    def start(self, stream: str, index: int) -> None:
        self.current[stream] = index

    def get(self, stream: str) -> int | None:
        return self.current.get(stream)


def stream_passes_actor() -> Any:
    """A new `StreamPasses` actor, outside any Tune trial's placement group (its bundle holds no
    CPU for it)."""
    return StreamPasses.options(scheduling_strategy="DEFAULT").remote()


OTHER_VIEW = np.uint64(0x9E3779B97F4A7C15)  # a second view's seed: its row's seed XOR this


def other_view(seeds: np.ndarray | None) -> np.ndarray | None:
    """The seeds of a row's second view (FixMatch's strong view, a contrastive method's view 1)."""
    return None if seeds is None else seeds ^ OTHER_VIEW


def row_seeds(passes: Any, stream: str, run_seed: int, keys: Sequence[str],
              keep: np.ndarray | None = None) -> np.ndarray | None:
    """One seed per row of a task's batch (the rows `keep` marks, when given), from (run seed,
    stream, pass, key); None without a `StreamPasses` actor (library callers that build streams
    by hand: the process's random state)."""
    if passes is None:
        return None
    index = ray.get(passes.get.remote(stream))
    if index is None:
        raise RuntimeError(f"training stream {stream!r} is executing, but no pass was started for it")
    seeds = np.array([seed_of(run_seed, stream, index, str(key)) for key in keys], dtype=np.uint64)
    return seeds if keep is None else seeds[keep]
