"""Bench part 5: FixMatch steps through Ray Train (1 worker) vs a bare PyTorch FixMatch loop.

Like with like, as in part 2 (`bench/training.py`): the same architecture and noise (dropout,
stochastic depth), the same `FixMatch` method object (its `loss`, and `after_step` for the EMA
of the weights), SGD Nesterov with the same cosine schedule, the same batch size B with μB
unlabeled images per step, device, AMP / channels_last rule (bf16 autocast and channels_last
only on CUDA), `to_model_input` normalisation and torch thread count. Both sides read the same
prepared rows: labeled `image` (uint8 NCHW) + one-hot `target`, and pool rows of `weak`,
`strong` (uint8 NCHW), `index` and `label`, as the real Ray Data preparation emits them. The
bare loop holds them as tensors on its device and draws random indices each step; Ray Train
reads them materialised in Ray's object store through two `get_dataset_shard` streams.

What this ratio isolates is the two-stream plumbing of an online method: the labeled stream
unsplit (`split_train=False`, every worker reads all of it) and cycled through Ray's local
shuffle buffer, the pool split (`DataConfig(datasets_to_split=["unlabeled"])`) and shuffled by
`_mixed` across windows of batches, both repeated so that one pass holds `PASS_BATCHES` batches
(as `stages.train.training_streams` builds them), the per-step metrics and the per-epoch report
(a barrier) and checkpoint. Decoding and RandAugment (the strong view) run in Ray CPU tasks
beside training in a real run; on a GPU node they overlap with the GPU, on a 2-core machine they
compete with it, so they are left out of both sides.

Steps/s are the mean of the epochs after the first (both sides warm up in epoch 1). The worker
measures its own epochs (`train/epoch_seconds`, from the end of one epoch's loop to the end of
the next, so the report and checkpoint between epochs are inside the clock) and runs an
explicit `steps_per_epoch`. The pixels are random, so an untrained model rarely passes
FixMatch's 0.95 threshold: the loop's empty-mask watch is widened to never stop the bench (it may
still warn each epoch); the compute of a step does not depend on how many images pass.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray.data
import torch

from selftrain.bench.training import BLOCK_ROWS, materialised, prepared_rows, targets_of, worker_history
from selftrain.data.augment import to_model_input
from selftrain.methods import METHODS, Batch
from selftrain.models.registry import build_model
from selftrain.stages.train import _repeated, _repeats
from selftrain.training.loop import cosine_with_warmup

METHOD = "fixmatch"


def pool_views(index: np.ndarray, size: int, num_classes: int, seed: int = 1) -> dict[str, np.ndarray]:
    """The prepared views of pool images `index`: random uint8 NCHW `weak` and `strong` images
    (the model's speed does not depend on pixel values), each a function of its index alone so
    Ray's blocks and the bare loop's one array hold the same rows, and a `label` per image."""
    weak = np.empty((len(index), 3, size, size), dtype=np.uint8)
    strong = np.empty_like(weak)
    for row, slot in enumerate(index):
        rng = np.random.default_rng((seed, int(slot)))
        weak[row], strong[row] = rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    return {"weak": weak, "strong": strong, "index": np.asarray(index, dtype=np.int64),
            "label": targets_of(weak, num_classes).argmax(1).astype(np.int64)}


def _views_of_ids(batch: dict[str, np.ndarray], size: int, num_classes: int) -> dict[str, np.ndarray]:
    return pool_views(batch["id"], size, num_classes)


def materialised_pool(count: int, size: int, num_classes: int) -> ray.data.Dataset:
    """The pool's views made by Ray Data tasks from its index (as `stages.train.unlabeled_views`
    makes them, minus decoding and augmentation), materialised in Ray's object store."""
    ids = ray.data.range(count, override_num_blocks=max(-(-count // BLOCK_ROWS), 1))
    return ids.map_batches(_views_of_ids, fn_kwargs={"size": size, "num_classes": num_classes},
                           batch_size=BLOCK_ROWS).materialize()


def loop_config(arch: str, labeled_rows: int, pool_size: int, size: int, num_classes: int, epochs: int,
                steps: int, batch_size: int, mu: int, threads: int) -> dict[str, Any]:
    """The config `train_loop_per_worker` gets from `stages.train.train_model` for a FixMatch
    teacher (labeled rows only in `train`: unsplit; the teacher's dropout, no stochastic depth)."""
    return {"arch": arch, "num_classes": num_classes, "classes": [str(c) for c in range(num_classes)],
            "image_size": size, "method": METHOD, "knobs": {}, "online": True, "mu": mu,
            # random pixels: the mask may stay empty; the watch must not stop the bench
            "max_empty_epochs": epochs + 1, "collapse_fraction": 1.0,
            "rows": labeled_rows, "split_train": False, "pool_rows": pool_size, "steps_per_epoch": steps,
            "seed": 0, "epochs": epochs, "batch_size": batch_size, "lr": 0.05, "weight_decay": 5e-4,
            "dropout": 0.2, "stochastic_depth": 0.0, "shuffle_buffer": 2048, "amp": True,
            "checkpoint_every": epochs, "torch_threads": threads}


def bare_loop(config: dict[str, Any], images: np.ndarray, targets: np.ndarray, pool: dict[str, np.ndarray],
              use_gpu: bool) -> tuple[list[float], int]:
    """(steps/s per epoch, steps run) of a plain FixMatch loop doing what `train_loop_per_worker`
    does per step, over tensors held on its device."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(config["torch_threads"])
    try:
        return _bare_epochs(config, images, targets, pool, torch.device("cuda" if use_gpu else "cpu"))
    finally:
        torch.set_num_threads(threads)


def _bare_epochs(config: dict[str, Any], images: np.ndarray, targets: np.ndarray, pool: dict[str, np.ndarray],
                 device: torch.device) -> tuple[list[float], int]:
    channels_last, amp = device.type == "cuda", device.type == "cuda" and config["amp"]
    model = build_model(config["arch"], config["num_classes"], config["dropout"], config["stochastic_depth"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    per_epoch, batch_size = config["steps_per_epoch"], config["batch_size"]
    total = config["epochs"] * per_epoch
    method = METHODS[config["method"]](config["num_classes"], config["knobs"], total_steps=total,
                                       pool_size=config["pool_rows"])
    method.setup(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                                weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup=min(per_epoch, total // 10 + 1)))
    labeled = torch.from_numpy(images).to(device)
    labeled_targets = torch.from_numpy(targets).to(device)
    views = {name: torch.from_numpy(values).to(device) for name, values in pool.items()}
    unlabeled = config["mu"] * batch_size
    rates, steps = [], 0
    for epoch in range(config["epochs"]):
        model.train()
        start = time.perf_counter()
        for step in range(per_epoch):
            i = torch.randint(len(labeled), (batch_size,), device=device)
            j = torch.randint(len(views["index"]), (unlabeled,), device=device)
            batch = Batch(to_model_input(labeled[i], channels_last=channels_last), labeled_targets[i],
                          to_model_input(views["weak"][j], channels_last=channels_last),
                          to_model_input(views["strong"][j], channels_last=channels_last),
                          views["index"][j], views["label"][j])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = method.loss(model, batch, epoch * per_epoch + step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            method.after_step(model)
            loss.item()  # the worker syncs once per step too (its running metrics)
            steps += 1
        rates.append(per_epoch / (time.perf_counter() - start))
    return rates, steps


def run_consistency(arch: str, labeled_rows: int, pool_size: int, size: int, epochs: int, steps_per_epoch: int,
                    batch_size: int, cpus: float, use_gpu: bool, mu: int = 7,
                    num_classes: int = 10) -> dict[str, Any]:
    images, targets = prepared_rows(labeled_rows, size, num_classes)
    # As `stages.train.training_streams` builds an online method's streams: each repeated so one
    # pass holds PASS_BATCHES batches (every pass is a new Ray Data execution).
    labeled_repeats = _repeats(labeled_rows, batch_size)
    labeled = _repeated(materialised(images, num_classes), labeled_repeats)
    unlabeled = _repeated(materialised_pool(pool_size, size, num_classes), _repeats(pool_size, mu * batch_size))
    config = loop_config(arch, labeled_rows * labeled_repeats, pool_size, size, num_classes, epochs,
                         steps_per_epoch, batch_size, mu, threads=max(int(cpus), 1))
    history = worker_history(config, {"train": labeled, "unlabeled": unlabeled}, use_gpu, cpus,
                             split=("unlabeled",))
    ray_rates = [epoch["train/steps"] / epoch["train/epoch_seconds"] for epoch in history]
    bare_rates, bare_steps = bare_loop(config, images, targets, pool_views(np.arange(pool_size), size, num_classes),
                                       use_gpu)
    ray_rate, bare_rate = float(np.mean(ray_rates[1:])), float(np.mean(bare_rates[1:]))
    return {"arch": arch, "image_size": size, "batch_size": batch_size, "mu": mu, "labeled_rows": labeled_rows,
            "pool_rows": pool_size, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "epochs_timed": epochs - 1,
            "ray_train_steps": int(sum(epoch["train/steps"] for epoch in history)), "bare_steps": bare_steps,
            "ray_train_steps_per_s": ray_rate, "bare_steps_per_s": bare_rate,
            "consistency_training_ratio": ray_rate / bare_rate,
            "ray_train_steps_per_s_by_epoch": ray_rates, "bare_steps_per_s_by_epoch": bare_rates,
            "ray_train_history": history}
