"""Bench part 3: driver RSS growth while scoring generated pools of N and 10 N image files.

The pool is real files on disk (nested folders of `PER_FOLDER` files, the layout of a sharded
image store), read by the real `read_pool` and scored by the real `score_pool` (Parquet out,
then the after-pass checks) with a small model at a small image size, so the pass is quick and
the driver's own memory is what varies. A background thread samples this process's RSS; the
peak during each pass is reported, with the RSS just before it.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from selftrain.config import ScoringConfig
from selftrain.data.pool import read_pool
from selftrain.stages.score import score_pool

PER_FOLDER = 1000
WRITERS = 16  # threads writing (and removing) a generated pool's folders
SAMPLE_SECONDS = 0.02
MIN_GROWTH_MB = 1.0
READ_BINARY_FILES_BYTES_PER_FILE = 650  # ray.data.read_binary_files: the path list on the driver


def _pngs(distinct: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def write_pool(root: Path, count: int, seed: int = 0, encoded: list[bytes] | None = None,
               suffix: str = ".png") -> None:
    """`count` image files in folders of PER_FOLDER, the `encoded` ones repeated cyclically (by
    default a few distinct small PNGs: written fast)."""
    encoded = encoded or _pngs(16, seed)

    def write_folder(folder_index: int) -> None:
        folder = root / f"shard{folder_index:05d}"
        folder.mkdir(parents=True)
        first = folder_index * PER_FOLDER
        for i in range(first, min(first + PER_FOLDER, count)):
            (folder / f"{i:08d}{suffix}").write_bytes(encoded[i % len(encoded)])

    # Threads: file creation waits on the file system with the GIL released, so a 16-CPU node
    # writes a pool of 1,000,000 files several times faster than one loop (none of it is timed).
    with ThreadPoolExecutor(max_workers=WRITERS) as writers:
        list(writers.map(write_folder, range(-(-count // PER_FOLDER))))


def remove_pool(root: Path) -> None:
    """`root` and everything below it, its sub-folders removed in threads (as `write_pool`)."""
    with ThreadPoolExecutor(max_workers=WRITERS) as removers:
        list(removers.map(lambda folder: shutil.rmtree(folder, ignore_errors=True),
                          [p for p in root.glob("*/*") if p.is_dir()]))
    shutil.rmtree(root, ignore_errors=True)


class PeakRss:
    """Peak resident memory of this process while the `with` block runs, sampled in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def score_generated_pool(count: int, model_dir: str, image_size: int, cfg: ScoringConfig,
                         tmp_root: str | None, encoded: list[bytes] | None = None,
                         suffix: str = ".png", scorer: type | None = None) -> dict[str, Any]:
    """`count` image files written (`write_pool`; not timed), then the pool pass over them timed
    from the listing to the checked scores Parquet, with the driver's RSS sampled throughout.
    With a `scorer` that stamps each batch's `scored_at` (`bench.scoring.TimedScorer`, this
    node's monotonic clock), also when the first and last batches were scored in the pass."""
    work = Path(tempfile.mkdtemp(prefix=f"selftrain-bench-pool-{count}-", dir=tmp_root))
    try:
        start = time.perf_counter()
        write_pool(work / "pool", count, encoded=encoded, suffix=suffix)
        generate_seconds = time.perf_counter() - start
        with PeakRss() as rss:
            start = time.perf_counter()
            scores = score_pool(read_pool(str(work / "pool"), "image", None), model_dir, cfg, image_size,
                                work / "out", pool_name=f"bench pool of {count}", scorer=scorer)
            seconds = time.perf_counter() - start
        shards = list(Path(scores).glob("*.parquet"))
        rows = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
        phases = {}
        if scorer is not None:  # when the model worked, within the pass
            stamps = pq.read_table(scores, columns=["scored_at"]).column(0)
            phases = {"first_scored_seconds": pc.min(stamps).as_py() - start,
                      "last_scored_seconds": pc.max(stamps).as_py() - start}
    finally:
        remove_pool(work)
    growth = rss.peak - rss.before
    return {"files": count, "rows": rows, "generate_seconds": generate_seconds, "score_seconds": seconds,
            "images_per_s": count / seconds, "rss_before_mb": rss.before / 2**20,
            "rss_peak_mb": rss.peak / 2**20, "growth_mb": growth / 2**20,
            "growth_bytes_per_file": growth / count, "scores_parquet_files": len(shards), **phases}


def run_driver_memory(small: int, model_dir: str, image_size: int, cfg: ScoringConfig,
                      tmp_root: str | None) -> dict[str, Any]:
    """A warm-up pass of small / 10 files (not measured), the small pool, then 10x. The ratio
    compares the driver's growth during each pass (peak minus the RSS just before), not absolute
    peaks: on a ~900 MB baseline even a driver that holds ~0.65 KB per file (what
    `read_binary_files` keeps) would read ~1.03 in absolute terms. The warm-up takes the
    driver's one-time growth (about 25 MB: Ray Data's first execution, the Parquet writer's
    imports), which would otherwise count in the small pool's growth alone and flatter the
    ratio. Flat means 10x the files and at most 1.2x the growth; growth under MIN_GROWTH on the
    small pool counts as MIN_GROWTH (sampling noise), and the large pool's bytes per file stand
    beside the ratio."""
    score_generated_pool(max(small // 10, 100), model_dir, image_size, cfg, tmp_root)
    first = score_generated_pool(small, model_dir, image_size, cfg, tmp_root)
    second = score_generated_pool(10 * small, model_dir, image_size, cfg, tmp_root)
    ratio = max(second["growth_mb"], 0.0) / max(first["growth_mb"], MIN_GROWTH_MB)
    return {"small": first, "large": second, "driver_rss_ratio": ratio,
            "growth_bytes_per_file": second["growth_bytes_per_file"],
            "read_binary_files_bytes_per_file": READ_BINARY_FILES_BYTES_PER_FILE}
