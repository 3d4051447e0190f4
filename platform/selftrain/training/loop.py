"""The training loop that runs inside each Ray Train worker (DDP: gloo on CPU, NCCL on GPU).

It reads its shard of the prepared dataset (`image`: uint8 NCHW, already decoded and augmented
by Ray Data on CPU; `target`: float class distribution), optimises the method's loss, and
reports metrics with a checkpoint every epoch. A restarted worker resumes from Ray's last
committed checkpoint, so an epoch may run twice: nothing here has side effects beyond the
checkpoint it reports.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import numpy as np
import torch
import torch.distributed as dist

from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import load_batch
from selftrain.errors import TrainingError
from selftrain.methods import METHODS
from selftrain.models.registry import build_model

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 0; never fails past `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def save_model(directory: Path, model: torch.nn.Module, spec: dict[str, Any]) -> None:
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A saved model in eval mode (no dropout, no stochastic depth), with its spec."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC_FILE).read_text())
    model = build_model(spec["arch"], spec["num_classes"])
    state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), spec


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _validation_set(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The held-out labeled images (a few, by premise), decoded once per worker, un-augmented."""
    validation = config.get("validation")
    if not validation:
        return None
    loaded = load_batch({"path": np.asarray(validation["paths"], dtype=object)}, config["image_size"],
                        validation["parquet_column"])
    ok = loaded["error"] == ""
    return (nhwc_to_nchw(torch.from_numpy(loaded["image"][ok])),
            torch.as_tensor(np.asarray(validation["labels"])[ok]))


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool, batch_size: int) -> float:
    bare = model.module if hasattr(model, "module") else model  # no DDP sync for a local eval
    bare.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size].to(device), channels_last=channels_last)
        correct += int((bare(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    bare.train()
    return correct / max(len(images), 1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] * 1000 + rank)
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])

    spec = {k: config[k] for k in ("arch", "num_classes", "classes", "image_size")}
    model = build_model(config["arch"], config["num_classes"], config["dropout"], config["stochastic_depth"])
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
            model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
    # The optimizer is built after the model reaches its device, so restored momentum buffers
    # land there too (load_state_dict casts state to the parameters' device).
    if ray.train.torch.get_device().type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # weights match the channels_last inputs
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                                weight_decay=config["weight_decay"])
    # A last batch of a handful of images (70 rows at batch 64 leaves 6) gives BatchNorm
    # statistics of 6 images a full-size step at peak lr; it made a 70-image teacher diverge.
    # Drop it whenever a worker has at least one full batch: its rows come back reshuffled.
    drop_last = config["rows"] // world >= config["batch_size"]
    per_worker = config["rows"] / (world * config["batch_size"])
    steps_per_epoch = max(math.floor(per_worker) if drop_last else math.ceil(per_worker), 1)
    total = config["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup=min(steps_per_epoch, total // 10 + 1))
    )
    start_epoch, history = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    device = ray.train.torch.get_device()
    channels_last = device.type == "cuda"
    use_amp = device.type == "cuda" and config.get("amp", True)
    objective = METHODS[config["method"]]
    shard = ray.train.get_dataset_shard("train")
    validation = _validation_set(config)

    # Epoch wall time runs from the end of the previous epoch's loop, so it includes the previous
    # report (a barrier) and checkpoint as well as every wait for data: the honest images/s.
    mark = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        batches = shard.iter_torch_batches(
            batch_size=config["batch_size"], device=device, drop_last=drop_last,
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] * 1000 + epoch,
        )
        for step, batch in enumerate(batches):
            images = to_model_input(batch["image"], channels_last=channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, metrics = objective(model, images, batch["target"].float())
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{config['arch']} loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {scheduler.get_last_lr()[0]:.3g}); lower train.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n = images.shape[0]
            sums += torch.tensor([metrics["loss"].item() * n, metrics["accuracy"].item() * n, n],
                                 dtype=torch.float64, device=device)
        loss_sum, correct, seen = _all_reduce_sum(sums).tolist()
        if seen == 0:
            raise TrainingError(f"epoch {epoch + 1} saw no training rows: the dataset is empty")
        seconds, mark = time.perf_counter() - mark, time.perf_counter()
        epoch_metrics = {"epoch": epoch + 1, "train/loss": loss_sum / seen,
                         "train/accuracy": correct / seen, "train/lr": scheduler.get_last_lr()[0],
                         "train/epoch_seconds": seconds, "train/images_per_s": seen / seconds}
        if validation is not None:  # every rank evaluates the same images: no gather needed
            epoch_metrics["val/accuracy"] = _accuracy(model, *validation, device, channels_last, config["batch_size"])
        history.append(epoch_metrics)
        last = epoch + 1 == config["epochs"]
        if last and rank == 0 and config.get("final_model_dir"):
            # Before the last report: a Tune scheduler may stop the trial as soon as it reports.
            final = Path(config["final_model_dir"])
            final.mkdir(parents=True, exist_ok=True)
            save_model(final, model.module if hasattr(model, "module") else model, spec)
            (final / HISTORY_FILE).write_text(json.dumps(history))
        save = last or (epoch + 1) % config["checkpoint_every"] == 0
        _report(epoch_metrics, rank, model, optimizer, scheduler, epoch, history, spec, save)

    if start_epoch >= config["epochs"]:  # restored after the last epoch: report it again
        _report(history[-1], rank, model, optimizer, scheduler, config["epochs"] - 1, history, spec, True)


def _report(metrics, rank, model, optimizer, scheduler, epoch, history, spec, save: bool) -> None:
    """Every rank calls report (a barrier); only rank 0 writes a checkpoint, when `save`."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0 and save:
            bare = model.module if hasattr(model, "module") else model
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch, "history": history}, Path(tmp) / STATE_FILE)
            save_model(Path(tmp), bare, spec)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
