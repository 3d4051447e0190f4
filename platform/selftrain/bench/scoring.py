"""Bench part 1: teacher scoring through the Ray Data pipeline vs a bare loop.

Like with like: the same model (weights saved once, loaded by both sides), batch size, device,
image size, AMP and channels_last settings, and the same decoded uint8 images held in memory
(the bare loop in this process, the pipeline in Ray's object store, materialised before the
clock starts). Both clocks start before the model is loaded, so each side pays one model load
and warm-up; the pipeline's also pays its actor start and every Ray Data hop (object store ->
actor -> results streamed back to the driver). Ray's own start-up is excluded.

Also measured, not part of the ratio: the whole scoring pipeline from encoded JPEG bytes with
CPU decoding in Ray tasks (what a pool run gets), and, on a GPU, the same with JPEG decoding
on the GPU inside the actor (`torchvision.io.decode_jpeg(device="cuda")`).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pandas as pd
import ray.data
import torch
import torch.nn.functional as F
from PIL import Image

from selftrain.config import ScoringConfig
from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import decode_batch
from selftrain.stages.score import TeacherScorer, infer
from selftrain.training.loop import load_model

BLOCK_ROWS = 1024  # rows per object-store block of the materialised inputs


def synthetic_jpegs(count: int, size: int, seed: int = 0, distinct: int = 64) -> list[bytes]:
    """`count` JPEGs of `size` px: smooth random images (so JPEG sizes are photo-like), reused
    cyclically from `distinct` encodings to keep generation fast."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(min(distinct, count)):
        small = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return [encoded[i % len(encoded)] for i in range(count)]


def decode_all(jpegs: list[bytes], size: int) -> tuple[np.ndarray, float]:
    """The decoded images (uint8 NHWC) and the single-process CPU decode rate, images/s."""
    start = time.perf_counter()
    decoded = decode_batch({"bytes": np.array(jpegs, dtype=object)}, size)
    return decoded["image"], len(jpegs) / (time.perf_counter() - start)


def bare_loop(model_dir: str, images: np.ndarray, cfg: ScoringConfig, use_gpu: bool) -> float:
    """images/s of the plain PyTorch loop the pipeline is measured against (same settings as
    `TeacherScorer`: eval mode, inference_mode, bf16 autocast and channels_last on GPU)."""
    # A scoring actor gets `cpus_per_actor` CPUs and Ray sets its OMP_NUM_THREADS to match.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(int(cfg.cpus_per_actor), 1))
    try:
        return _bare_loop(model_dir, images, cfg, use_gpu)
    finally:
        torch.set_num_threads(threads)


def _bare_loop(model_dir: str, images: np.ndarray, cfg: ScoringConfig, use_gpu: bool) -> float:
    start = time.perf_counter()
    device = torch.device("cuda" if use_gpu else "cpu")
    model, _ = load_model(model_dir)
    on_gpu = device.type == "cuda"
    channels_last, amp = cfg.channels_last and on_gpu, cfg.amp and on_gpu
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    with torch.inference_mode():
        for first in range(0, len(images), cfg.batch_size):
            batch = torch.from_numpy(images[first:first + cfg.batch_size]).to(device, non_blocking=True)
            x = to_model_input(nhwc_to_nchw(batch), channels_last=channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(x).float().cpu().numpy()  # the pipeline brings logits back to the CPU too
    return len(images) / (time.perf_counter() - start)


def _with_error_column(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": batch["data"], "error": np.full(len(batch["data"]), "", dtype=object)}


def materialised_images(images: np.ndarray) -> ray.data.Dataset:
    """Decoded images in Ray's object store, in blocks, before any clock starts."""
    chunks = [images[i:i + BLOCK_ROWS] for i in range(0, len(images), BLOCK_ROWS)]
    return ray.data.from_numpy(chunks).map_batches(_with_error_column, batch_size=None).materialize()


def materialised_bytes(jpegs: list[bytes]) -> ray.data.Dataset:
    frames = [pd.DataFrame({"bytes": jpegs[i:i + BLOCK_ROWS]}) for i in range(0, len(jpegs), BLOCK_ROWS)]
    return ray.data.from_pandas(frames).materialize()


def _drain(dataset: ray.data.Dataset) -> int:
    return sum(len(batch["prediction"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"))


def pipeline_decoded(model_dir: str, rows: ray.data.Dataset, cfg: ScoringConfig) -> tuple[float, int]:
    start = time.perf_counter()
    count = _drain(infer(rows, model_dir, cfg))
    return count / (time.perf_counter() - start), count


def pipeline_cpu_decode(model_dir: str, encoded: ray.data.Dataset, cfg: ScoringConfig, size: int) -> float:
    """Bytes -> decode in Ray CPU tasks (as `stages.score.score`) -> the same actor pool."""
    start = time.perf_counter()
    decoded = encoded.map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=64, num_cpus=0.5)
    count = _drain(infer(decoded, model_dir, cfg))
    return count / (time.perf_counter() - start)


class GpuDecodeScorer(TeacherScorer):
    """JPEG bytes decoded by nvJPEG on the actor's GPU, resized there, then scored."""

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool, size: int):
        super().__init__(model_dir, use_gpu, amp, channels_last)
        self.size = size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["bytes"]]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)  # list of CHW uint8
        resized = [F.interpolate(im[None].float(), size=(self.size, self.size), mode="bilinear",
                                 antialias=True, align_corners=False)[0] for im in images]
        x = to_model_input(torch.stack(resized).clamp_(0, 255), channels_last=self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x).float().cpu().numpy()
        return {"prediction": logits.argmax(axis=1)}


def pipeline_gpu_decode(model_dir: str, encoded: ray.data.Dataset, cfg: ScoringConfig, size: int) -> float:
    start = time.perf_counter()
    count = _drain(infer(encoded, model_dir, cfg, scorer=GpuDecodeScorer, size=size))
    return count / (time.perf_counter() - start)


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


def run_scoring(model_dir: str, count: int, source_size: int, size: int, cfg: ScoringConfig,
                use_gpu: bool) -> dict[str, Any]:
    jpegs = synthetic_jpegs(count, source_size)
    images, cpu_decode_rate = decode_all(jpegs, size)
    rows = materialised_images(images)
    pipeline, scored = pipeline_decoded(model_dir, rows, cfg)
    bare = bare_loop(model_dir, images, cfg, use_gpu)
    encoded = materialised_bytes(jpegs)
    result = {
        "images": count, "scored": scored, "pipeline_images_per_s": pipeline, "bare_images_per_s": bare,
        "scoring_ratio": pipeline / bare,
        "cpu_decode_images_per_s_one_process": cpu_decode_rate,
        "pipeline_cpu_decode_images_per_s": pipeline_cpu_decode(model_dir, encoded, cfg, size),
    }
    if use_gpu:
        result["gpu_decode_images_per_s"] = gpu_decode_rate(jpegs, size, cfg.batch_size)
        result["pipeline_gpu_decode_images_per_s"] = pipeline_gpu_decode(model_dir, encoded, cfg, size)
    return result
