"""Bench part 6: self-supervised pretraining steps through Ray Train (1 worker) vs a bare loop.

Like with like: the same method (SimCLR by default: NT-Xent, projection head), architecture,
optimizer and LR schedule, batch size, device, AMP rule and thread count, over the same two
views per image (uint8 NCHW, as `stages.rows.contrastive_views` emits them) held in memory:
in this process for the bare loop, materialised in Ray's object store for Ray Train, which
streams them into the worker through `get_dataset_shard`. View-making (random resized crops,
colour jitter) runs in Ray CPU tasks beside training in a real run and is left out of both
sides, as is the per-epoch kNN monitor: the ratio isolates the plumbing (streaming, the
per-epoch report and checkpoint). Steps/s are the mean of the epochs after the first.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray.data
import torch

from selftrain.bench.training import BLOCK_ROWS, worker_history
from selftrain.data.augment import to_model_input
from selftrain.methods.base import Batch
from selftrain.models.registry import build_model
from selftrain.pretraining import PRETRAIN_METHODS
from selftrain.training.loop import cosine_with_warmup


def two_views(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8) for _ in range(2))


def materialised_views(view0: np.ndarray, view1: np.ndarray) -> ray.data.Dataset:
    chunks = [{"view0": view0[i:i + BLOCK_ROWS], "view1": view1[i:i + BLOCK_ROWS]}
              for i in range(0, len(view0), BLOCK_ROWS)]
    return ray.data.from_items([{"i": i} for i in range(len(chunks))]).map_batches(
        lambda batch: {k: np.concatenate([chunks[i][k] for i in batch["i"]]) for k in ("view0", "view1")},
        batch_size=1).materialize()


def loop_config(method: str, arch: str, count: int, size: int, epochs: int, batch_size: int,
                threads: int) -> dict[str, Any]:
    """The config `stages.pretrain.pretrain_model` gives `train_loop_per_worker`, without the
    kNN monitor."""
    return {"arch": arch, "num_classes": 10, "classes": [str(c) for c in range(10)], "image_size": size,
            "pretrain": True, "method": method, "knobs": {}, "online": False, "rows": count, "split_train": True,
            "pool_rows": count, "steps_per_epoch": count // batch_size, "seed": 0, "epochs": epochs,
            "batch_size": batch_size, "lr": 0.06, "weight_decay": 5e-4, "dropout": 0.0, "stochastic_depth": 0.0,
            "shuffle_buffer": 0, "amp": True, "checkpoint_every": epochs, "torch_threads": threads}


def bare_loop(config: dict[str, Any], view0: np.ndarray, view1: np.ndarray, use_gpu: bool) -> list[float]:
    """steps/s per epoch of a plain loop doing what `train_loop_per_worker` does per step."""
    torch.manual_seed(0)
    torch.set_num_threads(config["torch_threads"])
    device = torch.device("cuda" if use_gpu else "cpu")
    steps, batch_size = config["steps_per_epoch"], config["batch_size"]
    total = config["epochs"] * steps
    method = PRETRAIN_METHODS[config["method"]](10, {}, total_steps=total)
    network = method.network(build_model(config["arch"], 10)).to(device)
    channels_last, amp = device.type == "cuda", device.type == "cuda" and config["amp"]
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    method.setup(network)
    optimizer = torch.optim.SGD(network.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                                weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup=min(steps, total // 10 + 1)))
    views = torch.from_numpy(view0), torch.from_numpy(view1)
    rates = []
    for epoch in range(config["epochs"]):
        network.train()
        start = time.perf_counter()
        order = torch.randperm(len(view0))
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            batch_views = [to_model_input(v[index].to(device, non_blocking=True), channels_last=channels_last)
                           for v in views]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = method.loss(network, Batch(batch_views[0][:0], torch.zeros(0, 0), views=batch_views),
                                      epoch * steps + step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            method.after_step(network)
            loss.item()  # the worker syncs once per step too (its running metrics)
        rates.append(steps / (time.perf_counter() - start))
    return rates


def run_pretrain(method: str, arch: str, count: int, size: int, epochs: int, batch_size: int, cpus: float,
                 use_gpu: bool) -> dict[str, Any]:
    view0, view1 = two_views(count, size)
    config = loop_config(method, arch, count, size, epochs, batch_size, threads=max(int(cpus), 1))
    history = worker_history(config, {"train": materialised_views(view0, view1)}, use_gpu, cpus)
    ray_rates = [epoch["train/steps"] / epoch["train/epoch_seconds"] for epoch in history]
    bare_rates = bare_loop(config, view0, view1, use_gpu)
    ray_rate, bare_rate = float(np.mean(ray_rates[1:])), float(np.mean(bare_rates[1:]))
    return {"method": method, "images": count, "epochs": epochs, "steps_per_epoch": config["steps_per_epoch"],
            "ray_train_steps_per_s": ray_rate, "bare_steps_per_s": bare_rate, "pretrain_ratio": ray_rate / bare_rate,
            "ray_train_steps_per_s_by_epoch": ray_rates, "bare_steps_per_s_by_epoch": bare_rates,
            "images_per_step": batch_size}


