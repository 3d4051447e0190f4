"""Bench part 2: student training through Ray Train (1 worker) vs a bare PyTorch loop.

Like with like: the same architecture and noise (dropout, stochastic depth), optimizer and LR
schedule, objective, batch size, device, AMP / channels_last rule and torch thread count, over
the same prepared rows (uint8 NCHW images + float targets, as the real Ray Data preparation
emits them) held in memory: on the device for the bare loop (each step one gather there, the
model in channels_last on a GPU as the worker's is), materialised in Ray's object store for Ray
Train, which streams them into the worker through `get_dataset_shard`.

What this ratio isolates is the plumbing: Ray Data streaming into the shard, the local shuffle
buffer, the per-epoch report (a barrier) and the checkpoint. Decoding and RandAugment run in
Ray CPU tasks beside training in a real run; on a GPU node they overlap with the GPU, on this
2-core machine they compete with it, so they are left out of both sides.

Images/s are the mean of the epochs after the first (both sides warm up in epoch 1; Ray
Train's worker start-up is outside its epochs). The worker measures its own epochs
(`train/images_per_s`, also logged to MLflow in real runs), from the end of one epoch's loop
to the end of the next, so the report and checkpoint between epochs are inside the clock.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from selftrain.data.augment import to_model_input
from selftrain.methods import METHODS, Batch
from selftrain.models.registry import build_model
from selftrain.training.loop import HISTORY_FILE, cosine_with_warmup, train_loop_per_worker

BLOCK_ROWS = 512


def prepared_rows(count: int, size: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 NCHW images (the model's speed does not depend on pixel values) and
    one-hot targets derived from each image, so both sides derive the same ones."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    return images, targets_of(images, num_classes)


def targets_of(images: np.ndarray, num_classes: int) -> np.ndarray:
    labels = images[:, 0, 0, 0].astype(np.int64) % num_classes
    return np.eye(num_classes, dtype=np.float32)[labels]


def _with_targets(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    return {"image": batch["data"], "target": targets_of(batch["data"], num_classes)}


def materialised(images: np.ndarray, num_classes: int) -> ray.data.Dataset:
    chunks = [images[i:i + BLOCK_ROWS] for i in range(0, len(images), BLOCK_ROWS)]
    return ray.data.from_numpy(chunks).map_batches(
        _with_targets, fn_kwargs={"num_classes": num_classes}, batch_size=None).materialize()


def loop_config(arch: str, count: int, size: int, num_classes: int, epochs: int, batch_size: int,
                threads: int) -> dict[str, Any]:
    """The config `train_loop_per_worker` gets from `stages.train.train_model` for a student."""
    return {"arch": arch, "num_classes": num_classes, "classes": [str(c) for c in range(num_classes)],
            "image_size": size, "method": "noisy_student", "rows": count, "seed": 0, "epochs": epochs,
            "batch_size": batch_size, "lr": 0.05, "weight_decay": 5e-4, "dropout": 0.5,
            "stochastic_depth": 0.2, "shuffle_buffer": 2048, "amp": True, "checkpoint_every": epochs,
            "torch_threads": threads}


def bare_loop(config: dict[str, Any], images: np.ndarray, targets: np.ndarray, use_gpu: bool) -> list[float]:
    """images/s per epoch of a plain loop doing what `train_loop_per_worker` does per step."""
    torch.manual_seed(0)
    torch.set_num_threads(config["torch_threads"])
    device = torch.device("cuda" if use_gpu else "cpu")
    channels_last, amp = device.type == "cuda", device.type == "cuda" and config["amp"]
    model = build_model(config["arch"], config["num_classes"], config["dropout"], config["stochastic_depth"])
    if channels_last:  # as the worker does: weights in the inputs' memory format
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                                weight_decay=config["weight_decay"])
    steps = max(math.ceil(len(images) / config["batch_size"]), 1)
    total = config["epochs"] * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup=min(steps, total // 10 + 1)))
    method = METHODS[config["method"]](config["num_classes"])
    # Every row already on the device (1.9 GB at the full sizes), so a step's batch is one gather
    # there: nothing but the step itself in the timed region.
    all_images, all_targets = torch.from_numpy(images).to(device), torch.from_numpy(targets).to(device)
    rates = []
    for epoch in range(config["epochs"]):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        for first in range(0, len(images), config["batch_size"]):
            index = order[first:first + config["batch_size"]]
            batch = to_model_input(all_images[index], channels_last=channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = method.loss(model, Batch(batch, all_targets[index]), 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()  # the worker syncs once per step too (its running metrics)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def worker_history(config: dict[str, Any], datasets: dict[str, ray.data.Dataset], use_gpu: bool, cpus: float,
                   split: tuple[str, ...] = ("train",)) -> list[dict[str, Any]]:
    """`train_loop_per_worker` in Ray Train (1 worker) over `datasets`; the worker's history
    (one dict per epoch, as `history.json` in its final checkpoint)."""
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name="bench-train", storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=0)),
            datasets=datasets, dataset_config=DataConfig(datasets_to_split=list(split)),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as checkpoint:
            return json.loads((Path(checkpoint) / HISTORY_FILE).read_text())


def ray_train(config: dict[str, Any], rows: ray.data.Dataset, use_gpu: bool, cpus: float) -> list[float]:
    """images/s per epoch as the Ray Train worker measured them (`train/images_per_s`)."""
    return [epoch["train/images_per_s"] for epoch in worker_history(config, {"train": rows}, use_gpu, cpus)]


def run_training(arch: str, count: int, size: int, epochs: int, batch_size: int, cpus: float,
                 use_gpu: bool, num_classes: int = 10) -> dict[str, Any]:
    images, targets = prepared_rows(count, size, num_classes)
    config = loop_config(arch, count, size, num_classes, epochs, batch_size, threads=max(int(cpus), 1))
    ray_rates = ray_train(config, materialised(images, num_classes), use_gpu, cpus)
    bare_rates = bare_loop(config, images, targets, use_gpu)
    ray_rate, bare_rate = float(np.mean(ray_rates[1:])), float(np.mean(bare_rates[1:]))
    return {"images": count, "epochs": epochs, "epochs_timed": epochs - 1,
            "ray_train_images_per_s": ray_rate, "bare_images_per_s": bare_rate,
            "training_ratio": ray_rate / bare_rate,
            "ray_train_images_per_s_by_epoch": ray_rates, "bare_images_per_s_by_epoch": bare_rates}


PINNED = {"pin_memory": True, "prefetch_batches": 4}


def training_extras(arch: str, count: int, size: int, epochs: int, batch_size: int, cpus: float,
                    bare_images_per_s: float, num_classes: int = 10) -> dict[str, Any]:
    """Measured once on a GPU, beside the repeated ratio: the Ray Train worker with its batches
    in pinned host memory and four prefetched (`PINNED`), over the median run's bare rate. A
    failure is reported, not raised: the measured ratio stands."""
    images, _ = prepared_rows(count, size, num_classes)
    config = {**loop_config(arch, count, size, num_classes, epochs, batch_size, threads=max(int(cpus), 1)), **PINNED}
    try:
        rates = ray_train(config, materialised(images, num_classes), True, cpus)
    except Exception as error:  # noqa: BLE001 - an experiment beside the ratio
        return {"pinned_error": f"{type(error).__name__}: {error}"}
    rate = float(np.mean(rates[1:]))
    return {"pinned_ray_train_images_per_s": rate, "pinned_training_ratio": rate / bare_images_per_s,
            "pinned_settings": PINNED}
