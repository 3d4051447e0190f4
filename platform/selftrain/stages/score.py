"""Teacher inference with Ray Data: decode on CPU tasks, score in an actor pool, stream out.

Used for the unlabeled pool (written as Parquet, never collected on the driver) and for the
test set. The teacher runs un-noised (eval mode, no augmentation), as Noisy Student requires
(Xie et al. 2020, Sec. 2: "the teacher is not noised ... so the pseudo labels are accurate").

With `scoring.tta` the pool pass (only) scores each image under fixed, deterministic
test-time transforms and averages the probabilities: data distillation (Radosavovic et al.
2018), an ensemble of views rather than noise. The `logits` column then holds log p̄, whose
softmax is p̄ itself, so the pseudo-label stage reads it as it reads plain logits.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import torch
import torch.nn.functional as F
from ray.data import ActorPoolStrategy

from selftrain.config import ScoringConfig
from selftrain.console import post
from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import decode_batch, load_batch
from selftrain.data.listing import SKIPPED
from selftrain.data.parquet import read_parquet_per_file
from selftrain.errors import DataError, raised_in_tasks
from selftrain.heap import returning_freed_memory, reusing_freed_memory
from selftrain.methods.pseudo_label import confidence
from selftrain.models.inference import fold_batchnorm
from selftrain.training.loop import load_model

ROWS_PER_SCORES_FILE = 50_000  # Parquet shards of the scores: a 1M-image pool -> ~20 files
EXAMPLES = 5  # unreadable files named in the error message
# `scoring.concurrent_batches: auto` on a GPU: with four calls in flight the pipeline kept 0.85-0.89
# of a stand-in H100's ResNet-50 speed on 2 CPU cores, against 0.59-0.62 with one (`selftrain bench
# --parts plumbing`); more calls gained little there and hold more batches in GPU memory.
GPU_CONCURRENT_BATCHES = 4
ZOOM_IN, ZOOM_OUT = 1.125, 0.875  # `scoring.tta: [scale]`
MIN_PROBABILITY = 1e-12  # log p̄ is clamped at log(1e-12): a finite "logit" for a class no view gives


def _reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """NCHW shifted by (dy, dx) pixels (positive: down / right); the edge it uncovers is
    reflect-padded, so the image keeps its size."""
    h, w = x.shape[-2:]
    kept = x[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return F.pad(kept, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor > 1: the centre 1/factor of the image, resized back up; < 1: the image shrunk by
    factor and reflect-padded back to its size (centred)."""
    h, w = x.shape[-2:]
    if factor > 1:
        ch, cw = max(1, round(h / factor)), max(1, round(w / factor))
        top, left = (h - ch) // 2, (w - cw) // 2
        return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
    sh, sw = max(1, round(h * factor)), max(1, round(w * factor))
    small = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    ph, pw = h - sh, w - sw
    return F.pad(small, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")


def tta_views(x: torch.Tensor, tta: Sequence[str]) -> list[torch.Tensor]:
    """The views of an NCHW batch that `scoring.tta` scores, on the batch's own device (torch
    ops only): the plain batch first, then per transform in `tta` order
    flip: the horizontal mirror; shift: shifted by size//8 px (at least 1) up, down, left, right;
    scale: a ZOOM_IN centre crop resized back, and a ZOOM_OUT shrink reflect-padded back."""
    views = [x]
    for transform in tta:
        if transform == "flip":
            views.append(torch.flip(x, [-1]))
        elif transform == "shift":
            dy, dx = max(1, x.shape[-2] // 8), max(1, x.shape[-1] // 8)
            views += [_reflect_shift(x, -dy, 0), _reflect_shift(x, dy, 0),
                      _reflect_shift(x, 0, -dx), _reflect_shift(x, 0, dx)]
        elif transform == "scale":
            views += [_zoom(x, ZOOM_IN), _zoom(x, ZOOM_OUT)]
        else:
            raise ValueError(f"unknown scoring.tta transform {transform!r}")
    return views


def tta_log_probs(forward: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the softmax probabilities (T = 1) averaged over `views`, one forward pass per view
    (a batch's memory, not len(views) batches'), clamped at log(MIN_PROBABILITY). softmax of the
    result gives back the mean probabilities, so it stands in for logits downstream."""
    total = None
    for view in views:
        probs = torch.softmax(forward(view).float(), dim=1)
        total = probs if total is None else total.add_(probs)
    return torch.log((total / len(views)).clamp_min_(MIN_PROBABILITY))


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def wants_gpu(setting: bool | str) -> bool:
    return cluster_has_gpus() if setting == "auto" else bool(setting)


def num_actors(cfg: ScoringConfig, use_gpu: bool) -> int:
    """`auto`: one actor per `gpus_per_actor` GPUs of the cluster; on CPU one actor, which
    already uses every core it is given (more actors would only split the same cores)."""
    if cfg.num_actors != "auto":
        return cfg.num_actors
    if not use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.gpus_per_actor))


def concurrent_batches(cfg: ScoringConfig, use_gpu: bool) -> int:
    if cfg.concurrent_batches != "auto":
        return cfg.concurrent_batches
    return GPU_CONCURRENT_BATCHES if use_gpu else 1


BATCHES_PER_TASK = 4
# Decoded uint8 images per task at most: Ray Data's default target block size, so a decode task's
# output stays one block (256 images at 224 px are 38.5 MB: three batches a task).
TASK_BYTES = 128 * 2**20


def rows_per_task(cfg: ScoringConfig, image_size: int) -> int:
    """Rows (at least) per decode task, and so per scoring-actor task: each decode task's output
    is one block, and the actor takes a block a task, calling the model on it batch by batch
    (`batch_size` rows, the task's remainder last).

    Up to four batches a task, as many as fit TASK_BYTES. Between two tasks an actor's thread
    sits idle while Ray stores one task's output and starts the next: 10-12 ms per task on CPU
    (resnet18 at 32 px: 6 % of a 190 ms batch; 1.8 ms between the batches of one task), and
    about 20 ms per task for each of the four threads of a GPU actor (py-spy on an H200, ResNet-50
    at 224 px, where a batch takes 17 ms on the GPU). With four batches a task that cost falls
    once per four calls. Calls that overlap in threads (`concurrent_batches` > 1, a GPU) overlap
    tasks, each thread working through its task's batches in turn."""
    batch_bytes = cfg.batch_size * image_size * image_size * 3
    return cfg.batch_size * max(1, min(BATCHES_PER_TASK, TASK_BYTES // batch_bytes))


class TeacherScorer:
    """Callable class for `map_batches`: one model per actor, loaded once, its batch norms
    folded into the convolutions they follow (`models.inference`).

    With `scoring.concurrent_batches` > 1, Ray Data runs that many calls at once in the actor's
    threads. On a GPU each thread has its own CUDA stream and copies its batch through pinned
    memory, so one batch's host work (Ray's batching, the copy to the device, the outputs)
    overlaps another's compute, and the GPU is not left waiting on Python between batches.

    With `tta` (the pool pass of `scoring.tta`) each batch is scored under every view of
    `tta_views`, made on the device in the same stream, and `logits` are log p̄ (`tta_log_probs`)."""

    tta: tuple[str, ...] = ()  # a subclass that sets itself up (the bench's) scores the plain image
    progress: dict[str, Any] | None = None  # ... and posts no progress

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool, tta: Sequence[str] = (),
                 progress: dict[str, Any] | None = None):
        self.progress = progress  # {"board", "task"}: each batch posted to the CLI's progress board
        reusing_freed_memory()  # Ray Data calls the model from a thread: see `heap`
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.spec = load_model(model_dir)
        model = fold_batchnorm(model)  # one op less per convolution and batch norm: `models.inference`
        self.on_gpu = self.device.type == "cuda"
        self.channels_last = channels_last and self.on_gpu
        self.amp = amp and self.on_gpu
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        self.tta = tuple(tta)
        self._thread = threading.local()  # each call thread's CUDA stream
        # Ray hands the batch over as a read-only view of its block; on CPU the model reads it
        # in place, so torch's warning about non-writable arrays says nothing here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if self.on_gpu:
            torch.cuda.synchronize(self.device)  # weights in place before other streams read them

    def _stream(self) -> contextlib.AbstractContextManager:
        if not self.on_gpu:
            return contextlib.nullcontext()
        if getattr(self._thread, "stream", None) is None:
            self._thread.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._thread.stream)

    def to_device(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC batch -> normalised model input on the device; on a GPU the copy goes
        through (cached) pinned memory, asynchronously on the calling thread's stream."""
        if self.on_gpu:  # the batch's one host copy, straight into pinned memory (cached by torch)
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            np.copyto(host.numpy(), images)
        else:
            host = torch.from_numpy(images)  # a read-only view of Ray's block; nothing writes to it
        x = host.to(self.device, non_blocking=self.on_gpu)
        return to_model_input(nhwc_to_nchw(x), channels_last=self.channels_last)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model(x).float()

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, x: torch.Tensor) -> np.ndarray:
        if not self.tta:
            return self._forward(x).cpu().numpy()  # waits for this thread's stream only
        views = [self._view(v) for v in tta_views(x, self.tta)]  # made on the device, in this stream
        return tta_log_probs(self._forward, views).cpu().numpy()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = batch["error"] == ""
        with self._stream():
            # Every row goes through the model: an unreadable file's row is a black image, and
            # scoring it costs less than copying the batch without it. Its outputs are blanked.
            logits = self.logits(self.to_device(batch["image"]))
        logits[~ok] = 0.0
        prediction, conf = scored(logits)
        prediction[~ok], conf[~ok] = -1, 0.0
        out = {key: value for key, value in batch.items() if key != "image"}
        out.update(logits=logits, prediction=prediction.astype(np.int64), confidence=conf.astype(np.float32))
        if self.progress:
            post(self.progress["board"], {"task": self.progress["task"], "unit": "img", "total": self.progress.get("total"),
                                          "done": len(ok), "unreadable": int((~ok).sum())})
        return out


def scored(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, confidence) per row of logits. A row with a NaN or infinite logit (a teacher
    that overflowed) has no prediction: -1, and confidence NaN, which `stages.pseudo_label`
    counts and names apart and never turns into a pseudo-label. Its logits are kept as given."""
    finite = np.isfinite(logits).all(axis=1)
    prediction = np.full(len(logits), -1, dtype=np.int64)
    conf = np.full(len(logits), np.nan, dtype=np.float64)
    if finite.any():
        prediction[finite], conf[finite] = confidence(logits[finite])
    return prediction, conf


def score(
    rows: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, image_size: int,
    from_paths: bool, parquet_column: str = "image", tta: Sequence[str] = (), progress: dict[str, Any] | None = None,
    scorer: type | None = None,
) -> ray.data.Dataset:
    """Lazy: `{path, bytes|.., ...}` rows -> `{path, ..., error, logits, prediction, confidence}`.
    `tta` only from `score_pool`: the test set (`evaluate`) is scored on the plain image;
    `progress` (`console.progress_task`) posts each batch to the CLI's progress board."""
    return infer(decoded(rows, image_size, from_paths, cfg, parquet_column), model_dir, cfg,
                 **({"tta": tuple(tta)} if tta else {}), **({"progress": progress} if progress else {}),
                 **({"scorer": scorer} if scorer else {}))


def decoded(rows: ray.data.Dataset, image_size: int, from_paths: bool, cfg: ScoringConfig,
            parquet_column: str = "image") -> ray.data.Dataset:
    """Lazy: rows of file paths (`from_paths`) or of bytes -> decoded `{image, error, ...}` in CPU
    tasks of `rows_per_task` rows (the blocks the scoring actor of `cfg` then takes a task at a time)."""
    load, kwargs = (load_batch, {"parquet_column": parquet_column}) if from_paths else (decode_batch, {})
    return rows.map_batches(load, fn_kwargs={"size": image_size, **kwargs}, num_cpus=0.5,
                            batch_size=rows_per_task(cfg, image_size))


def infer(decoded: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, scorer: type = TeacherScorer,
          **scorer_kwargs: Any) -> ray.data.Dataset:
    """Lazy: decoded `{image, error, ...}` rows through the teacher's actor pool (`scorer`
    and `scorer_kwargs` let the bench swap in a GPU-decoding scorer on the same pool)."""
    use_gpu = wants_gpu(cfg.use_gpu)
    calls = concurrent_batches(cfg, use_gpu)
    return decoded.map_batches(
        scorer,
        fn_constructor_kwargs={"model_dir": model_dir, "use_gpu": use_gpu, "amp": cfg.amp,
                               "channels_last": cfg.channels_last, **scorer_kwargs},
        batch_size=cfg.batch_size,
        # Without true multi-threading Ray would overlap only its own batching with one call.
        compute=ActorPoolStrategy(min_size=1, max_size=num_actors(cfg, use_gpu),
                                  max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1),
        num_gpus=cfg.gpus_per_actor if use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
    )


def score_pool(pool: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, image_size: int, out_dir: Path,
               pool_name: str = "data.unlabeled", progress: dict[str, Any] | None = None,
               scorer: type | None = None) -> str:
    """Score every pool image and write `{path, label, error, logits, prediction, confidence}`
    as sharded Parquet; then stop with DataError if the pool was empty or mostly unreadable.
    `scorer` (a `TeacherScorer` subclass) lets the bench time each batch of a real pass.
    Under `cfg.tta` the views' mean probability p̄ is scored: `logits` = log p̄."""
    scores_dir = out_dir / "scores"
    # The driver's freed heap goes back to the system as the pass runs (`heap`): else its RSS
    # climbs with the pool's size, all of it memory Ray's threads have already freed.
    with returning_freed_memory():
        # Write tasks at half a CPU, as every other pool task: at Ray's default (1 CPU) they wait
        # behind the scoring actor and the decode tasks on a 2-core machine until decoding ends.
        with raised_in_tasks():  # a Parquet pool file that cannot be read: a DataError naming it
            score(pool, model_dir, cfg, image_size, from_paths=False, tta=cfg.tta, progress=progress,
                  scorer=scorer).write_parquet(
                str(scores_dir), min_rows_per_file=ROWS_PER_SCORES_FILE, ray_remote_args={"num_cpus": 0.5})
        check_scores(str(scores_dir), cfg.max_rejected_fraction, pool_name)
    return str(scores_dir)


def _count(batch: pd.DataFrame) -> pd.DataFrame:
    skipped = batch["error"].str.startswith(SKIPPED)
    bad = batch[(batch["error"] != "") & ~skipped].head(EXAMPLES)
    return pd.DataFrame([{"rows": len(batch), "rejected": int((batch["error"] != "").sum()),
                          "skipped": int(skipped.sum()),
                          "examples": [f"{p} ({r})" for p, r in zip(bad["path"], bad["error"])]}])


def check_scores(scores_dir: str, max_rejected_fraction: float, pool_name: str) -> tuple[int, int]:
    """(rows, rejected) from one streaming pass over the scores' `path`/`error` columns.

    Ray writes no file for an empty dataset: an empty pool (a glob or prefix that matched
    nothing) is caught here, never trained on silently. The scores stay on disk either way."""
    written = Path(scores_dir)
    if not written.is_dir() or not any(written.glob("*.parquet")):
        raise DataError(f"{pool_name}: the pool holds no image files (nothing was scored)")
    rows, rejected, skipped, examples = 0, 0, 0, []
    parts = read_parquet_per_file(scores_dir).select_columns(["path", "error"]).map_batches(
        _count, batch_format="pandas")
    for part in parts.iter_rows():  # one small row per block
        rows, rejected = rows + int(part["rows"]), rejected + int(part["rejected"])
        skipped += int(part["skipped"])
        examples = (examples + list(part["examples"]))[:EXAMPLES]
    if rows - skipped == 0:
        raise DataError(f"{pool_name}: the pool holds no image files (nothing was scored"
                        + (f"; {skipped} other files were skipped: see the scores' error column)" if skipped else ")"))
    # Files skipped for what they are (not images, hidden) are counted and named, but only images
    # that fail to read or decode count against the limit.
    unreadable, images = rejected - skipped, rows - skipped
    if unreadable / images > max_rejected_fraction:
        raise DataError(
            f"{pool_name}: {unreadable} of {images} pool images ({unreadable / images:.1%}) are unreadable, "
            f"more than scoring.max_rejected_fraction={max_rejected_fraction}; e.g. "
            + "; ".join(examples) + f". The scores are kept in {scores_dir}. Fix the pool, or raise "
            "scoring.max_rejected_fraction to go on without those files."
        )
    return rows, rejected
