"""The training loop that runs inside each Ray Train worker (DDP: gloo on CPU, NCCL on GPU).

One loop for every objective (`methods/`): it owns the optimizer, schedule, AMP, checkpoints and
reports; the method owns only its formula. It reads up to two streams, both decoded and augmented
by Ray Data on CPU:

- `train`: `image` (uint8 NCHW) + `target` (float class distribution): labeled rows, plus the
  pseudo-labeled ones for a student. Split across workers when it holds pseudo-labels; a
  labeled-only stream is small by premise and every worker reads all of it.
- `unlabeled` (online methods only): `weak`, `strong` (two views of one pool image), `index`
  (its slot in `[0, pool_rows)`) and `label` (its true class, -1 when unknown); always split.

Self-supervised pretraining (`pretrain: true`, `pretraining/`) reads one stream, `train`, of
pool images as `view0`, `view1`, split; its method trains a network around the model's backbone
and each epoch reports a kNN accuracy of the backbone's features (`val/knn_accuracy`).

Both streams are cycled and every epoch runs the same fixed number of steps on every rank: a
rank whose iterator ran short while the others still stepped would wait forever in DDP's
all-reduce (ray issue 66085). Split streams therefore yield only full batches (`drop_last`,
equal shards) and are shuffled by `_mixed`, which never changes a batch's size.

A restarted worker resumes from Ray's last committed checkpoint (model, optimizer, schedule,
method state), so an epoch may run twice: nothing here has side effects beyond the checkpoint
it reports.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS

from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import load_batch
from selftrain.errors import TrainingError
from selftrain.fsio import atomic_torch_save, atomic_write_json
from selftrain.evaluation.knn import knn_accuracy
from selftrain.methods import METHODS, Batch
from selftrain.models.backbone import classifier_name, load_backbone
from selftrain.models.registry import build_model
from selftrain.pretraining import PRETRAIN_METHODS
from selftrain.seeds import seed_of

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
STATE_FILE = "train_state.pt"
LIVE_MODEL_FILE = "live_model.pt"  # the weights being trained (model.pt: the ones to evaluate)
HISTORY_FILE = "history.json"
MIX_WINDOW = 8  # batches whose rows `_mixed` shuffles together


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 0; never fails past `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def save_model(directory: Path, model: torch.nn.Module, spec: dict[str, Any]) -> None:
    """Weights, then the spec: each file whole or absent (a model folder with a spec has weights)."""
    atomic_torch_save(model.state_dict(), directory / MODEL_FILE)
    atomic_write_json(directory / SPEC_FILE, spec, indent=2)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's optimizer, scheduler, method state and history. Tensors, numbers and
    containers only (`weights_only`): a checkpoint on shared storage cannot run code in the workers."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A saved model in eval mode (no dropout, no stochastic depth), with its spec."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC_FILE).read_text())
    model = build_model(spec["arch"], spec["num_classes"])
    state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), spec


def steps_per_epoch(config: dict[str, Any], world: int) -> int:
    """Fixed and equal on every rank: the config's, or one pass over the stream that sets the
    pace (the pool for an online method; else the training rows, as whole batches when a
    worker has at least one full batch)."""
    if config.get("steps_per_epoch"):
        return config["steps_per_epoch"]
    if config.get("online"):
        return max(config["pool_rows"] // (world * config["mu"] * config["batch_size"]), 1)
    per_worker = config["rows"] / (world * config["batch_size"])
    return max(math.floor(per_worker) if drop_last(config, world) else math.ceil(per_worker), 1)


def drop_last(config: dict[str, Any], world: int) -> bool:
    # A last batch of a handful of images (70 rows at batch 64 leaves 6) gives BatchNorm
    # statistics of 6 images a full-size step at peak lr; it made a 70-image teacher diverge.
    # Drop it whenever a worker has at least one full batch: its rows come back reshuffled.
    return config["rows"] // world >= config["batch_size"]


def _mixed(batches: Iterator[dict[str, torch.Tensor]], generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Rows shuffled across windows of MIX_WINDOW batches; every batch keeps its size."""
    window: list[dict[str, torch.Tensor]] = []

    def flush():
        sizes = [len(next(iter(b.values()))) for b in window]
        order = torch.randperm(sum(sizes), generator=generator)
        joined = {k: torch.cat([b[k] for b in window])[order.to(window[0][k].device)] for k in window[0]}
        start = 0
        for size in sizes:
            yield {k: v[start:start + size] for k, v in joined.items()}
            start += size

    for batch in batches:
        window.append(batch)
        if len(window) == MIX_WINDOW:
            yield from flush()
            window = []
    if window:
        yield from flush()


class _Stream:
    """Batches of one Ray Data shard, pass after pass (a new pass: a new execution, fresh
    augmentation), with a position a checkpoint keeps: (passes done, batches of this pass used).

    Reproducible (`stages/passes.py`): before pass `j` starts, the `StreamPasses` actor (when
    given) is told `j`, so the tasks draw every row's augmentation from (run seed, stream, j,
    row key); the rows come in order (`preserve_order`), and the window shuffle is seeded by
    `j`. The batches are then a function of the seed and the position alone: a worker restored
    from a checkpoint starts the pass it was in again and skips the batches it had used, at the
    cost of decoding them once more (less than one pass)."""

    def __init__(self, shard: Any, name: str, batch_size: int, device: torch.device, drop: bool, seed: int,
                 shuffle_buffer: int | None, passes: Any = None, position: Sequence[int] | None = None,
                 prefetch: int = 1, pin_memory: bool = False):
        self.shard, self.name, self.batch_size, self.device, self.drop = shard, name, batch_size, device, drop
        self.prefetch, self.pin_memory = prefetch, pin_memory and device.type == "cuda"
        self.seed, self.shuffle_buffer, self.passes = seed, shuffle_buffer, passes
        self.passes_done, self.used = (int(position[0]), int(position[1])) if position else (0, 0)
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def position(self) -> list[int]:
        return [self.passes_done, self.used]

    def _start(self) -> None:
        if self.passes is not None:
            ray.get(self.passes.start.remote(self.name, self.passes_done))
        pass_seed = seed_of(self.seed, self.passes_done)
        batches = self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device, drop_last=self.drop,
                                                prefetch_batches=self.prefetch, pin_memory=self.pin_memory,
                                                local_shuffle_buffer_size=self.shuffle_buffer,
                                                local_shuffle_seed=pass_seed % 2**32 if self.shuffle_buffer else None)
        self._batches = iter(batches if self.shuffle_buffer else _mixed(batches, torch.Generator().manual_seed(pass_seed)))

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:  # the first batch, or the first after a restore
            self._start()
            for _ in range(self.used):  # replay this pass up to the restored position
                if next(self._batches, None) is None:
                    raise TrainingError(f"training stream {self.name!r} is shorter than when it was checkpointed "
                                        f"({self.used} batches into pass {self.passes_done})")
        batch = next(self._batches, None)
        if batch is None:  # this pass is over: the next one
            self.passes_done, self.used = self.passes_done + 1, 0
            self._start()
            batch = next(self._batches, None)
            if batch is None:
                raise TrainingError("a training stream yielded no batch: the dataset is empty")
        self.used += 1
        return batch


def _decoded(images: dict[str, Any] | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A few labeled images (`stages.train.image_list`), decoded once per worker, un-augmented."""
    if not images:
        return None
    loaded = load_batch({"path": np.asarray(images["paths"], dtype=object)}, image_size, images["parquet_column"])
    ok = loaded["error"] == ""
    return nhwc_to_nchw(torch.from_numpy(loaded["image"][ok])), torch.as_tensor(np.asarray(images["labels"])[ok])


@torch.no_grad()
def _outputs(model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool,
             batch_size: int) -> torch.Tensor:
    """The model's outputs (logits, or a backbone's features) on `images`, in eval mode."""
    was_training = model.training
    model.eval()
    outputs = [model(to_model_input(images[start:start + batch_size].to(device), channels_last=channels_last)).float().cpu()
               for start in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool, batch_size: int) -> float:
    if not len(images):
        return 0.0
    return float((_outputs(model, images, device, channels_last, batch_size).argmax(1) == labels).float().mean())


def _knn_accuracy(backbone: torch.nn.Module, knn: dict[str, Any], bank: tuple[torch.Tensor, torch.Tensor],
                  queries: tuple[torch.Tensor, torch.Tensor], num_classes: int, device: torch.device,
                  channels_last: bool, batch_size: int) -> float:
    """The pretraining monitor: weighted kNN of the query images among the labeled bank."""
    features = [_outputs(backbone, images, device, channels_last, batch_size) for images in (bank[0], queries[0])]
    return knn_accuracy(features[1], queries[1], features[0], bank[1], num_classes, knn["k"], knn["temperature"])


class _EpochMetrics:
    """Sums of each step metric (NaN steps skipped), all-reduced once per epoch."""

    def __init__(self, device: torch.device):
        self.device, self.sums, self.counts, self.images = device, {}, {}, 0

    def add(self, metrics: dict[str, torch.Tensor], images: int) -> None:
        self.images += images
        for key, value in metrics.items():
            value = float(value)
            if not math.isnan(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, keys: list[str]) -> tuple[dict[str, float], int]:
        """Means over every rank's steps (keys in a fixed order: every rank must pass the same)."""
        values = torch.tensor([[self.sums.get(k, 0.0), self.counts.get(k, 0)] for k in keys] + [[self.images, 0]],
                              dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        means = {k: values[i, 0].item() / values[i, 1].item() for i, k in enumerate(keys) if values[i, 1] > 0}
        return means, int(values[-1, 0].item())


def _metric_name(key: str) -> str:
    return f"train/{key}" if "/" not in key else key


def _watch(epoch_metrics: dict[str, float], config: dict[str, Any], streak: dict[str, int], epoch: int) -> None:
    """An online method whose mask stays empty, or whose pseudo-labels collapse onto one class,
    is warned about every epoch and stopped after `max_empty_epochs` such epochs in a row."""
    if not config.get("online") or "unsup/mask_rate" not in epoch_metrics:
        return
    limit, share = config["max_empty_epochs"], config["collapse_fraction"]
    problems = {
        "empty": (epoch_metrics["unsup/mask_rate"] == 0.0,
                  f"no unlabeled image passed the mask in epoch {epoch} (threshold "
                  f"{epoch_metrics.get('unsup/threshold', float('nan')):.3g}): lower the method's threshold"),
        "collapse": (epoch_metrics.get("unsup/top_class_fraction", 0.0) > share and config["num_classes"] > 1,
                     f"{epoch_metrics.get('unsup/top_class_fraction', 0.0):.0%} of epoch {epoch}'s pseudo-labels "
                     f"are one class (collapse_fraction {share}): the pseudo-labels are collapsing"),
    }
    for name, (bad, message) in problems.items():
        streak[name] = streak.get(name, 0) + 1 if bad else 0
        if bad:
            warnings.warn(f"{config['method']}: {message}", stacklevel=2)
        if streak[name] >= limit:
            raise TrainingError(f"{config['method']} stopped: {message}, {limit} epochs in a row "
                                f"(max_empty_epochs={limit})")


def param_groups(model: torch.nn.Module, lr: float, backbone_scale: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at `lr`, or with `backbone_scale` < 1 (a teacher
    fine-tuned from a pretrained backbone) the backbone at `lr * backbone_scale` and the
    classifier at `lr`. The schedule scales each group's rate alike."""
    if backbone_scale == 1.0:
        return [{"params": list(model.parameters())}]
    head = classifier_name(model) + "."
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.startswith(head)], "lr": lr * backbone_scale},
            {"params": [p for n, p in named if n.startswith(head)], "lr": lr}]


LARS_TRUST = 0.001  # LARS's trust coefficient η (You et al. 2017; Barlow Twins' and VICReg's value)


def make_optimizer(model: torch.nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov) over `param_groups`, or with `optimizer: lars` (pretraining:
    `pretrain.optimizer`) lightly's LARS at momentum 0.9: each weight's step scaled by
    η |w| / (|g| + wd |w|), the losses that sum many terms (Barlow Twins, VICReg) train with it.
    As in their papers the biases and norm layers' parameters are neither decayed nor scaled:
    they form a group of weight decay 0, which lightly's LARS leaves to plain momentum SGD."""
    lr, weight_decay = config["lr"], config["weight_decay"]
    if config.get("optimizer", "sgd") == "sgd":
        return torch.optim.SGD(param_groups(model, lr, config.get("backbone_lr_scale", 1.0)),
                               lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if config["optimizer"] != "lars":
        raise ValueError(f"optimizer {config['optimizer']!r}: choose sgd or lars")
    decayed, not_decayed = get_weight_decay_parameters([model])
    return LARS([{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}], lr=lr, momentum=0.9,
                weight_decay=weight_decay, trust_coefficient=LARS_TRUST)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] * 1000 + rank)
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])

    spec = {k: config[k] for k in ("arch", "num_classes", "classes", "image_size")}
    device = ray.train.torch.get_device()
    channels_last = device.type == "cuda"
    use_amp = device.type == "cuda" and config.get("amp", True)
    registry = PRETRAIN_METHODS if config.get("pretrain") else METHODS
    per_epoch = steps_per_epoch(config, world)
    total = config["epochs"] * per_epoch
    method = registry[config["method"]](config["num_classes"], config.get("knobs"), total_steps=total,
                                        pool_size=config.get("pool_rows"))
    model = build_model(config["arch"], config["num_classes"], config["dropout"], config["stochastic_depth"])
    if config.get("init_backbone_dir"):  # a teacher on a pretrained (or saved) backbone, new classifier
        load_backbone(model, torch.load(Path(config["init_backbone_dir"]) / MODEL_FILE, map_location="cpu",
                                        weights_only=True))
        if config.get("classifier_init_file"):  # the new classifier from a linear probe (train.head_init)
            model.get_submodule(classifier_name(model)).load_state_dict(
                torch.load(config["classifier_init_file"], weights_only=True))
    model = method.network(model)  # the model itself, or a pretraining network around its backbone
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # weights match the channels_last inputs
    model = model.to(device)
    method.setup(model)

    if rank == 0 and config.get("placement_group_file"):
        _record_placement_group(Path(config["placement_group_file"]))
    checkpoint = ray.train.get_checkpoint()
    state = None
    if config.get("init_model_dir") and not checkpoint:  # a student warm-started from its teacher
        model.load_state_dict(torch.load(Path(config["init_model_dir"]) / MODEL_FILE, map_location=device,
                                         weights_only=True))
        method.setup(model)  # the EMA starts from the same weights
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_train_state(directory)
            # A checkpoint written before method state existed holds only `model.pt` (live weights).
            live = Path(directory) / LIVE_MODEL_FILE
            model.load_state_dict(torch.load(live if live.exists() else Path(directory) / MODEL_FILE,
                                             map_location="cpu", weights_only=True))
            method.load_state_dict(state.get("method", {}))
    # The optimizer is built after the model reaches its device, so restored momentum buffers
    # land there too (load_state_dict casts state to the parameters' device).
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup=min(per_epoch, total // 10 + 1)))
    start_epoch, history = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    split_train = config.get("split_train", True)
    # How batches reach the device: Ray Data's defaults (one batch prefetched, pageable memory)
    # unless the config says otherwise (the bench's GPU training extra tries pinned memory).
    host_batches = {"prefetch": config.get("prefetch_batches", 1), "pin_memory": config.get("pin_memory", False)}
    positions = (state or {}).get("streams", {})
    train = _Stream(ray.train.get_dataset_shard("train"), "train", config["batch_size"], device,
                    drop=drop_last(config, world if split_train else 1), seed=seed_of(config["seed"], rank, "train"),
                    # A replicated stream is private to this rank: Ray's shuffle buffer is safe there.
                    shuffle_buffer=None if split_train and world > 1 else (config["shuffle_buffer"] or None),
                    passes=config.get("stream_passes"), position=positions.get("train"), **host_batches)
    pool = None
    if config.get("online"):
        pool = _Stream(ray.train.get_dataset_shard("unlabeled"), "unlabeled", config["mu"] * config["batch_size"],
                       device, drop=True, seed=seed_of(config["seed"], rank, "unlabeled"), shuffle_buffer=None,
                       passes=config.get("stream_passes"), position=positions.get("unlabeled"), **host_batches)
    streams = {"train": train, **({"unlabeled": pool} if pool else {})}
    validation = _decoded(config.get("validation"), config["image_size"])
    knn = config.get("knn")
    knn_sets = (_decoded(knn["bank"], config["image_size"]), _decoded(knn["queries"], config["image_size"])) if knn else None
    metric_keys: list[str] | None = None
    streak: dict[str, int] = {}

    # Epoch wall time runs from the end of the previous epoch's loop, so it includes the previous
    # report (a barrier) and checkpoint as well as every wait for data: the honest images/s.
    mark = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"]):
        # Dropout, stochastic depth and the methods' own draws: from (seed, rank, epoch), so a
        # run restored at this epoch draws what the uninterrupted run drew.
        torch.manual_seed(seed_of(config["seed"], rank, epoch))
        ddp_model.train()
        sums = _EpochMetrics(device)
        for step in range(per_epoch):
            batch = _batch(next(train), next(pool) if pool else None, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, metrics = method.loss(ddp_model, batch, epoch * per_epoch + step)
            if not torch.isfinite(loss):
                rate_key = "pretrain.lr" if config.get("pretrain") else "train.lr"  # the rate this run used
                raise TrainingError(
                    f"{config['arch']} loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {scheduler.get_last_lr()[0]:.3g}); lower {rate_key} or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            method.after_step(model)
            sums.add(metrics, _images(batch))
        metric_keys = metric_keys or sorted(metrics)
        means, seen = sums.reduce(metric_keys)
        seconds, mark = time.perf_counter() - mark, time.perf_counter()
        epoch_metrics = {"epoch": epoch + 1, **{_metric_name(k): v for k, v in means.items()},
                         "train/lr": scheduler.get_last_lr()[0], "train/steps": per_epoch,
                         "train/epoch_seconds": seconds, "train/images_per_s": seen / seconds}
        evaluated = method.eval_model(model)
        if validation is not None:  # every rank evaluates the same images: no gather needed
            epoch_metrics["val/accuracy"] = _accuracy(evaluated, *validation, device, channels_last, config["batch_size"])
        if knn_sets is not None:
            epoch_metrics["val/knn_accuracy"] = _knn_accuracy(method.features_model(model), knn, *knn_sets,
                                                              config["num_classes"], device, channels_last,
                                                              config["batch_size"])
        history.append(epoch_metrics)
        _watch(epoch_metrics, config, streak, epoch + 1)
        last = epoch + 1 == config["epochs"]
        if last and rank == 0 and config.get("final_model_dir"):
            # Before the last report: a Tune scheduler may stop the trial as soon as it reports.
            final = Path(config["final_model_dir"])
            final.mkdir(parents=True, exist_ok=True)
            save_model(final, evaluated, spec)
            atomic_write_json(final / HISTORY_FILE, history)
        save = last or (epoch + 1) % config["checkpoint_every"] == 0
        _report(epoch_metrics, rank, model, method, optimizer, scheduler, epoch, history, spec, save, streams)

    if start_epoch >= config["epochs"]:  # restored after the last epoch: report it again
        _report(history[-1], rank, model, method, optimizer, scheduler, config["epochs"] - 1, history, spec, True,
                streams)


def _record_placement_group(path: Path) -> None:
    """Append this worker group's placement group id to `path`. A Tune trial that ASHA stops
    leaves its Ray Train placement group reserved in Ray 2.60 (ray issue 54305: the controller
    outlives the stopped trial), so the sweep removes the ids a finished trial recorded."""
    group = ray.util.get_current_placement_group()
    if group is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(group.id.hex() + "\n")


def _images(batch: Batch) -> int:
    """Images a step trained on (each view of an image counted once: images, not forwards)."""
    if batch.views is not None:
        return len(batch.views[0])
    return len(batch.labeled) + (len(batch.weak) if batch.weak is not None else 0)


def _batch(train: dict[str, torch.Tensor], pool: dict[str, torch.Tensor] | None, channels_last: bool) -> Batch:
    def prepare(images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, channels_last=channels_last)

    if "view0" in train:  # self-supervised pretraining: two views of pool images, no labels
        views = [prepare(train["view0"]), prepare(train["view1"])]
        return Batch(views[0][:0], views[0].new_zeros(0, 0), views=views)
    batch = Batch(prepare(train["image"]), train["target"].float())
    if pool is not None:
        batch.weak, batch.strong = prepare(pool["weak"]), prepare(pool["strong"])
        batch.index, batch.truth = pool["index"].long(), pool["label"].long()
    return batch


def _report(metrics, rank, model, method, optimizer, scheduler, epoch, history, spec, save: bool,
            streams: dict[str, _Stream]) -> None:
    """Every rank calls report (a barrier); only rank 0 writes a checkpoint, when `save`.

    The checkpoint's `model.pt` holds the weights to evaluate (the EMA where the method keeps
    one); `live_model.pt` the weights being trained, which a restart resumes from."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0 and save:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "method": method.state_dict(), "epoch": epoch, "history": history,
                        "streams": {name: stream.position() for name, stream in streams.items()}},
                       Path(tmp) / STATE_FILE)
            torch.save(model.state_dict(), Path(tmp) / LIVE_MODEL_FILE)
            save_model(Path(tmp), method.eval_model(model), spec)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
