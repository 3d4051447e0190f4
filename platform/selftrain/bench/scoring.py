"""Bench part 1: teacher scoring through the Ray Data pipeline vs a bare loop.

Like with like: the same model (weights saved once, loaded by both sides, batch norm folded
into the convolutions on both: `models.inference`), batch size, device,
image size, AMP and channels_last settings, torch threads (an actor's `cpus_per_actor`), and
the same decoded uint8 images held in memory (the bare loop in this process, the pipeline in
Ray's object store, materialised before the clock starts; the bare loop runs just before and
just after the pipeline, and its two rates are averaged). Both rates are steady state: the
images after the first quarter over the time after it (`steady_rate`), so neither side's model
load, actor start-up or warm-up counts (the time to the first batch is reported as
`*_first_batch_seconds`). The pipeline's rate includes every Ray Data hop: object store ->
actor -> logits streamed back to the driver. The bare loop is no straw man: on a GPU it copies
through pinned memory without blocking and keeps one batch queued ahead of the one it reads.

Also measured, once beside the repeated ratio and not part of it: the whole scoring pipeline from encoded JPEG bytes with
CPU decoding in Ray tasks (what a pool run gets), and, on a GPU, the same with JPEG decoding
on the GPU inside the actor (`torchvision.io.decode_jpeg(device="cuda")`). And the end-to-end
pool pass a pipeline runs, timed on the wall clock from the first file listed to the last
scores Parquet checked: the same JPEGs as files on disk, through the real `read_pool` and
`score_pool` (listing, reading, CPU decoding, scoring, writing, checking), over the bare loop's
model-only rate (`pool_pass_over_model`). It includes what a user waits for and the steady
rates leave out: Ray Data's planning, the actor's start and model load, the last Parquet write.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray.data
import torch
import torch.nn.functional as F
from PIL import Image

from selftrain.bench.driver_memory import score_generated_pool
from selftrain.config import ScoringConfig
from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import decode_batch
from selftrain.heap import reusing_freed_memory
from selftrain.models.inference import fold_batchnorm
from selftrain.stages.score import TeacherScorer, concurrent_batches, decoded, infer, rows_per_task
from selftrain.training.loop import load_model

DISTINCT = 256  # distinct synthetic JPEGs, repeated to the bench's image count
EXPERIMENT_CALLS = 8  # `scoring.concurrent_batches` of the GPU experiment beside the ratio


def synthetic_jpegs(distinct: int, size: int, seed: int = 0) -> list[bytes]:
    """`distinct` JPEGs of `size` px: smooth random images, so JPEG sizes are photo-like."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(distinct):
        small = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def decode_all(distinct: list[bytes], count: int, size: int) -> tuple[np.ndarray, float]:
    """`count` decoded images (uint8 NHWC; the distinct ones repeated cyclically, as in the
    byte stream the pipelines get) and the single-process CPU decode+resize rate, images/s."""
    start = time.perf_counter()
    images = decode_batch({"bytes": np.array(distinct, dtype=object)}, size)["image"]
    rate = len(distinct) / (time.perf_counter() - start)
    return images[np.arange(count) % len(distinct)], rate


class CapturedForward:
    """The model's forward pass on a fixed-size input as a CUDA graph: a batch's few hundred
    kernel launches (ResNet-50 under autocast) replay as one call, where eager PyTorch launches
    each from Python under the GIL. An input of another shape runs eagerly. For the bench's
    graph variant (`scoring_extras`); not yet run on a GPU (see the README's H200 section)."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, amp: bool, warm_up: int = 3):
        self.model, self.amp = model, amp
        with torch.inference_mode():
            self.static_in = example.clone()
            # Warm-up off the default stream, as torch's docs do, and capture on a stream of this
            # graph's own: graphs captured on one stream share cuBLAS's workspace (keyed by
            # stream), which graphs replayed at once in several threads would race on
            # (pytorch/pytorch#193402).
            self._stream = torch.cuda.Stream(example.device)
            self._stream.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(self._stream):
                for _ in range(warm_up):
                    self._eager(self.static_in)
            torch.cuda.current_stream(example.device).wait_stream(self._stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self._stream):
                self.static_out = self._eager(self.static_in)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        # autocast's cache of cast weights must be off in a graph capture (torch.cuda.graph's docs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return self.model(x).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, queued on the current stream; the graph's output tensor, valid until its next
        replay (read or copy it out on the same stream first)."""
        with torch.inference_mode():  # static_in is an inference tensor
            if x.shape != self.static_in.shape:
                return self._eager(x)
            self.static_in.copy_(x)  # any strides: copy_ lays x out as the graph's input
            self.graph.replay()
            return self.static_out


def bare_loop(model_dir: str, images: np.ndarray, cfg: ScoringConfig, use_gpu: bool,
              graphs: bool = False) -> dict[str, float]:
    """images/s of the plain PyTorch loop the pipeline is measured against (same settings as
    `TeacherScorer`: eval mode, inference_mode, bf16 autocast and channels_last on GPU); with
    `graphs` (a GPU only), full batches replay a `CapturedForward`."""
    # A scoring actor gets `cpus_per_actor` CPUs and Ray sets its OMP_NUM_THREADS to match.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(int(cfg.cpus_per_actor), 1))
    reusing_freed_memory()  # as the scoring actor does (`heap`): like with like; for the rest of this process
    try:
        return _bare_loop(model_dir, images, cfg, use_gpu, graphs)
    finally:
        torch.set_num_threads(threads)


def _bare_loop(model_dir: str, images: np.ndarray, cfg: ScoringConfig, use_gpu: bool,
               graphs: bool = False) -> dict[str, float]:
    """The loop a careful engineer writes by hand. On a GPU each batch is copied through pinned
    memory on a side stream (so the copy overlaps the previous batch's compute), its logits come
    back into pinned memory without blocking, and the loop waits for one batch's logits only
    after the next batch is queued, so the device never waits for Python."""
    start = time.perf_counter()
    device = torch.device("cuda" if use_gpu else "cpu")
    model = fold_batchnorm(load_model(model_dir)[0])  # as `TeacherScorer` does
    on_gpu = device.type == "cuda"
    channels_last, amp = cfg.channels_last and on_gpu, cfg.amp and on_gpu
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)

    copies = torch.cuda.Stream(device) if on_gpu else None
    captured = None
    if graphs and on_gpu:
        shape = (cfg.batch_size, 3, images.shape[1], images.shape[2])
        captured = CapturedForward(model, to_model_input(torch.zeros(shape, dtype=torch.uint8, device=device),
                                                         channels_last=channels_last), amp)

    def forward(first: int) -> torch.Tensor:
        host = torch.from_numpy(images[first:first + cfg.batch_size])
        if on_gpu:
            with torch.cuda.stream(copies):
                batch = host.pin_memory().to(device, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(copies)
            batch.record_stream(torch.cuda.current_stream(device))  # freed only after compute used it
        else:
            batch = host
        x = to_model_input(nhwc_to_nchw(batch), channels_last=channels_last)
        if captured is not None:  # its output is overwritten only by a replay queued after the copy out
            return captured(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x).float()

    @torch.inference_mode()
    def batches():  # the pipeline brings logits back to the CPU too
        if not on_gpu:
            for first in range(0, len(images), cfg.batch_size):
                yield len(forward(first).numpy())
            return
        queued = None  # (logits in pinned memory, event after their copy)
        for first in range(0, len(images), cfg.batch_size):
            logits = forward(first)
            back = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
            back.copy_(logits, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            if queued is not None:
                queued[1].synchronize()
                yield len(queued[0].numpy())
            queued = (back, copied)
        if queued is not None:
            queued[1].synchronize()
            yield len(queued[0].numpy())

    return steady_rate(batches(), start)


WARM_UP_FRACTION = 0.25  # of the images: start-up and a filling pipeline stay out of the rate


def steady_rate(batch_rows, start: float) -> dict[str, float]:
    """A plain loop's rate: each batch counted as it is yielded (see `rate_after_warm_up`)."""
    finished, total = [], 0
    for rows in batch_rows:
        total += rows
        finished.append((time.perf_counter(), rows))
    return rate_after_warm_up(finished, start)


def rate_after_warm_up(finished: list[tuple[float, int]], start: float) -> dict[str, float]:
    """Images/s over the batches finished after the first quarter of the images (at least the
    first batch), from `(time finished, images)` pairs, and the time to the first batch. The same
    rule for every side: model load, actor start-up and warm-up happen before the clock."""
    finished = sorted(finished)
    total = sum(rows for _, rows in finished)
    if len(finished) < 2:
        return {"images_per_s": float("nan"), "first_batch_seconds": float("nan"), "images": total}
    done, skip = 0, 0
    for skip, (_, rows) in enumerate(finished[:-1]):
        done += rows
        if done >= WARM_UP_FRACTION * total:
            break
    window = finished[-1][0] - finished[skip][0]
    return {"images_per_s": (total - done) / window if window > 0 else float("nan"),
            "first_batch_seconds": finished[0][0] - start, "images": total}


def _with_error_column(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": batch["data"], "error": np.full(len(batch["data"]), "", dtype=object)}


def materialised_images(images: np.ndarray, rows_per_block: int) -> ray.data.Dataset:
    """Decoded images in Ray's object store, in blocks of `rows_per_block` (a pool pass's decode
    tasks make blocks of `stages.score.rows_per_task`), before any clock starts."""
    chunks = [images[i:i + rows_per_block] for i in range(0, len(images), rows_per_block)]
    return ray.data.from_numpy(chunks).map_batches(_with_error_column, batch_size=None).materialize()


def materialised_bytes(jpegs: list[bytes], rows_per_block: int) -> ray.data.Dataset:
    frames = [pd.DataFrame({"bytes": jpegs[i:i + rows_per_block]}) for i in range(0, len(jpegs), rows_per_block)]
    return ray.data.from_pandas(frames).materialize()


class TimedScorer(TeacherScorer):
    """`TeacherScorer` that stamps each batch with the time its call finished, on the actor's
    own clock: the driver receives results in bursts (Ray hands them over in groups), which
    would distort a rate taken from arrival times on the driver."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        out["scored_at"] = np.full(len(out["prediction"]), time.perf_counter())
        return out


def drain(dataset: ray.data.Dataset, start: float) -> dict[str, float]:
    """Run the pipeline to the end; its rate from the times the actors finished each batch (one
    node's monotonic clock), its time to the first batch from the driver's."""
    finished, first_arrival = Counter(), None  # call's finish time -> images (one call's output may span blocks)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        first_arrival = first_arrival or time.perf_counter()
        finished.update(batch["scored_at"].tolist())
    result = rate_after_warm_up(list(finished.items()), start)
    result["first_batch_seconds"] = (first_arrival or float("nan")) - start
    return result


class GraphScorer(TimedScorer):
    """`TimedScorer` whose full-size batches replay a `CapturedForward`: one graph per call
    thread (`graphs`), captured at the actor's start, each lent to one call at a time."""

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool, graph_batch: int,
                 size: int, graphs: int):
        super().__init__(model_dir, use_gpu, amp, channels_last)
        example = to_model_input(torch.zeros((graph_batch, 3, size, size), dtype=torch.uint8, device=self.device),
                                 channels_last=self.channels_last)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(graphs):
            self._free.put(CapturedForward(self.model, example, self.amp))
        torch.cuda.synchronize(self.device)

    def logits(self, x: torch.Tensor) -> np.ndarray:
        forward = self._free.get()
        try:
            return forward(x).cpu().numpy()  # waits for this thread's stream: the graph is free again
        finally:
            self._free.put(forward)


def pipeline_decoded(model_dir: str, rows: ray.data.Dataset, cfg: ScoringConfig, graphs: bool = False,
                     size: int = 0) -> dict[str, float]:
    """The pipeline over decoded images; with `graphs` (a GPU), `GraphScorer` at `size` px."""
    scorer = (dict(scorer=GraphScorer, graph_batch=cfg.batch_size, size=size, graphs=concurrent_batches(cfg, True))
              if graphs else dict(scorer=TimedScorer))
    return drain(infer(rows, model_dir, cfg, **scorer), time.perf_counter())


def pipeline_cpu_decode(model_dir: str, encoded: ray.data.Dataset, cfg: ScoringConfig, size: int) -> dict[str, float]:
    """Bytes -> decode in Ray CPU tasks (as `stages.score.score`) -> the same actor pool."""
    start = time.perf_counter()
    return drain(infer(decoded(encoded, size, from_paths=False, cfg=cfg), model_dir, cfg, scorer=TimedScorer), start)


class GpuDecodeScorer(TimedScorer):
    """JPEG bytes decoded by nvJPEG on the actor's GPU, resized there, then scored."""

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool, size: int):
        super().__init__(model_dir, use_gpu, amp, channels_last)
        self.size = size
        self._decoder = threading.Lock()  # calls run in threads; one nvJPEG decode at a time

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["bytes"]]
        with self._stream():
            # torchvision serialises nvJPEG decodes itself (and makes this stream wait for its
            # own); the lock keeps that true whatever the torchvision version.
            with self._decoder:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)  # list of CHW uint8
            resized = [F.interpolate(im[None].float(), size=(self.size, self.size), mode="bilinear",
                                     antialias=True, align_corners=False)[0] for im in images]
            logits = self.logits(to_model_input(torch.stack(resized).clamp_(0, 255),
                                                channels_last=self.channels_last))
        return {"prediction": logits.argmax(axis=1), "scored_at": np.full(len(logits), time.perf_counter())}


def pipeline_gpu_decode(model_dir: str, encoded: ray.data.Dataset, cfg: ScoringConfig, size: int) -> dict[str, float]:
    start = time.perf_counter()
    return drain(infer(encoded, model_dir, cfg, scorer=GpuDecodeScorer, size=size), start)


def gpu_decode_rate(jpegs: list[bytes], size: int, batch_size: int) -> float:
    """images/s of nvJPEG decode + resize alone on this process's GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    decode_jpeg(data[:batch_size], mode=ImageReadMode.RGB, device="cuda")  # warm-up: nvJPEG init
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(data), batch_size):
        images = decode_jpeg(data[first:first + batch_size], mode=ImageReadMode.RGB, device="cuda")
        F.interpolate(torch.stack(images).float(), size=(size, size), mode="bilinear", antialias=True)
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def pool_pass(model_dir: str, jpegs: list[bytes], cfg: ScoringConfig, size: int,
              tmp_root: str | None = None) -> dict[str, Any]:
    """The pool pass of a pipeline over `jpegs` written as .jpg files: wall-clock images/s from
    listing the folder to the checked scores Parquet (the files' writing is not timed)."""
    passed = score_generated_pool(len(jpegs), model_dir, size, cfg, tmp_root, encoded=jpegs, suffix=".jpg",
                                  scorer=TimedScorer)
    return {"images": passed["rows"], "seconds": passed["score_seconds"],
            "images_per_s": passed["rows"] / passed["score_seconds"],
            "first_scored_seconds": passed["first_scored_seconds"], "last_scored_seconds": passed["last_scored_seconds"]}


@dataclass
class ScoringInput:
    """What every repeat of the scoring part reads, made once: the JPEGs, the same images
    decoded, and those decoded images materialised in Ray's object store."""

    jpegs: list[bytes]
    images: np.ndarray
    rows: ray.data.Dataset
    cpu_decode_rate: float


def scoring_input(count: int, source_size: int, size: int, cfg: ScoringConfig) -> ScoringInput:
    distinct = synthetic_jpegs(DISTINCT, source_size)
    images, cpu_decode_rate = decode_all(distinct, count, size)
    return ScoringInput([distinct[i % len(distinct)] for i in range(count)], images,
                        materialised_images(images, rows_per_task(cfg, size)), cpu_decode_rate)


def run_scoring(model_dir: str, given: ScoringInput, cfg: ScoringConfig, use_gpu: bool,
                graphs: bool = False) -> dict[str, Any]:
    """One repeat of `scoring_ratio`: the pipeline over the materialised images against the bare
    loop over the same images in memory; with `graphs` (a GPU), both sides replay CUDA graphs."""
    # The bare loop just before and just after the pipeline, their rates averaged: this machine's
    # speed drifts by 5-10 % over a minute, and a drift then weighs on both sides alike.
    size = given.images.shape[1]
    before = bare_loop(model_dir, given.images, cfg, use_gpu, graphs)
    pipeline = pipeline_decoded(model_dir, given.rows, cfg, graphs, size)
    after = bare_loop(model_dir, given.images, cfg, use_gpu, graphs)
    bare = (before["images_per_s"] + after["images_per_s"]) / 2
    return {
        "images": len(given.images), "scored": pipeline["images"],
        "pipeline_images_per_s": pipeline["images_per_s"], "bare_images_per_s": bare,
        "bare_before_images_per_s": before["images_per_s"], "bare_after_images_per_s": after["images_per_s"],
        "scoring_ratio": pipeline["images_per_s"] / bare,
        "pipeline_first_batch_seconds": pipeline["first_batch_seconds"],
        "bare_first_batch_seconds": before["first_batch_seconds"],
        "torch_threads": max(int(cfg.cpus_per_actor), 1),
    }


def scoring_extras(model_dir: str, given: ScoringInput, cfg: ScoringConfig, size: int, use_gpu: bool,
                   bare_images_per_s: float, tmp_root: str | None = None, say=print) -> dict[str, Any]:
    """Measured once beside the repeated ratio (none of them is part of it): on a GPU first the
    experiments (both sides with CUDA graphs; EXPERIMENT_CALLS calls in flight), nvJPEG decoding alone and in
    the actor; then the pipeline from JPEG bytes with CPU decode tasks, and the end-to-end pool
    pass from files over the model-only rate. Each is logged as it ends, so a bench cut short
    by a time limit keeps what it measured."""
    result: dict[str, Any] = {"cpu_decode_images_per_s_one_process": given.cpu_decode_rate}

    def measured(**values: Any) -> None:
        result.update(values)
        say("   scoring extra: " + ", ".join(f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in values.items()))

    encoded = materialised_bytes(given.jpegs, cfg.batch_size)
    if use_gpu:
        try:  # an experiment: both sides with CUDA graphs (`CapturedForward`); a failure is reported, not raised
            graphed = run_scoring(model_dir, given, cfg, True, graphs=True)
            measured(graphs_pipeline_images_per_s=graphed["pipeline_images_per_s"],
                     graphs_bare_images_per_s=graphed["bare_images_per_s"], graphs_ratio=graphed["scoring_ratio"])
        except Exception as error:  # noqa: BLE001 - whatever breaks, the measured parts stand
            measured(graphs_error=f"{type(error).__name__}: {error}")
        # Another number of calls in flight (the default is GPU_CONCURRENT_BATCHES, 4). On an H200
        # two calls kept 0.666 of the bare loop where four kept 0.842-0.896 (README): does eight keep more?
        more = run_scoring(model_dir, given, cfg.model_copy(update={"concurrent_batches": EXPERIMENT_CALLS}), True)
        measured(more_calls=EXPERIMENT_CALLS, more_calls_pipeline_images_per_s=more["pipeline_images_per_s"],
                 more_calls_bare_images_per_s=more["bare_images_per_s"], more_calls_ratio=more["scoring_ratio"])
        measured(gpu_decode_images_per_s=gpu_decode_rate(given.jpegs, size, cfg.batch_size))
        measured(pipeline_gpu_decode_images_per_s=pipeline_gpu_decode(model_dir, encoded, cfg, size)["images_per_s"])
    measured(pipeline_cpu_decode_images_per_s=pipeline_cpu_decode(model_dir, encoded, cfg, size)["images_per_s"])
    files = pool_pass(model_dir, given.jpegs, cfg, size, tmp_root)
    measured(pool_pass_images=files["images"], pool_pass_seconds=files["seconds"],
             pool_pass_images_per_s=files["images_per_s"],
             pool_pass_over_model=files["images_per_s"] / bare_images_per_s,
             pool_pass_first_scored_seconds=files["first_scored_seconds"],
             pool_pass_last_scored_seconds=files["last_scored_seconds"])
    return result
