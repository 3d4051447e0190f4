"""Where the driver's memory goes during one pool pass: a diagnostic, not a bench part.

    python -m selftrain.bench.driver_profile --files 200000 [--memray out.bin]

Writes a pool of `--files` small PNGs (`driver_memory.write_pool`), runs a warm-up pass over a
tenth of it, then scores the pool through the real `read_pool` and `score_pool` while a thread
samples, every 0.25 s, the driver's RSS beside each Ray Data operator's queued blocks (input
queue, output queue, running tasks), read from the streaming executor's topology. It prints a
sample every 2 s and the one at the RSS peak. With `--memray`, a memray tracker with native
traces runs around the pass alone, and the allocations live at its heap peak are printed,
grouped by their innermost native frames (the README's driver-memory notes come from both);
the RSS samples then include memray's own buffers.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import psutil

SAMPLE_S = 0.25


class QueueSampler:
    """RSS and per-operator queued blocks of the newest Ray Data execution, sampled in a thread."""

    def __init__(self) -> None:
        from ray.data._internal.execution import streaming_executor

        self.executors: list[Any] = []
        self.samples: list[tuple[float, float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        execute = streaming_executor.StreamingExecutor.execute
        executors = self.executors

        def recording(executor, *args, **kwargs):
            executors.append(executor)
            return execute(executor, *args, **kwargs)

        streaming_executor.StreamingExecutor.execute = recording  # this process only: a diagnostic

    def _queues(self) -> dict[str, Any]:
        topology = getattr(self.executors[-1], "_topology", None) if self.executors else None
        out = {}
        for op, state in list((topology or {}).items()):
            queued = state.output_queue.num_blocks
            out[op.name[:32]] = (state.total_enqueued_input_blocks(), queued() if callable(queued) else queued,
                                 op.num_active_tasks())
        return out

    def _sample(self) -> None:
        process, start = psutil.Process(), time.perf_counter()
        while not self._stop.wait(SAMPLE_S):
            self.samples.append((time.perf_counter() - start, process.memory_info().rss / 2**20, self._queues()))

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def live_at_peak(capture: str, depth: int = 6, top: int = 12) -> list[str]:
    """memray's allocations live at the capture's heap peak, by innermost `depth` frames."""
    from memray import FileReader

    sizes, counts = collections.Counter(), collections.Counter()
    for record in FileReader(capture).get_high_watermark_allocation_records(merge_threads=True):
        frames = record.hybrid_stack_trace(max_stacks=depth)
        key = " <- ".join(f"{function[:60]}" for function, _, _ in frames)
        sizes[key] += record.size
        counts[key] += record.n_allocations
    return [f"{size / 2**20:7.2f} MB {counts[key]:7d}  {key}" for key, size in sizes.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--memray", help="write a memray capture of the pass here and print what is live at its peak")
    args = parser.parse_args()

    from selftrain.data.pool import read_pool
    from selftrain.bench import _model_dir
    from selftrain.bench.driver_memory import remove_pool, score_generated_pool, write_pool
    from selftrain.config import ScoringConfig
    from selftrain.ray_runtime import init_ray
    from selftrain.stages.score import score_pool

    if args.memray:
        try:
            import memray
        except ImportError:
            parser.error("--memray needs memray (pip install memray; Linux and macOS), not a selftrain dependency")
        Path(args.memray).unlink(missing_ok=True)
    init_ray(num_cpus=args.num_cpus)
    work = Path(tempfile.mkdtemp(prefix="selftrain-driver-profile-"))
    cfg = ScoringConfig(batch_size=1024, cpus_per_actor=1.0)  # the bench's driver-memory settings
    try:
        model = _model_dir(work, "resnet18", 8)
        score_generated_pool(max(args.files // 10, 100), model, 8, cfg, str(work))  # warm-up, not measured
        write_pool(work / "pool", args.files)
        tracker = memray.Tracker(args.memray, native_traces=True) if args.memray else nullcontext()
        rss_before = psutil.Process().memory_info().rss / 2**20
        with QueueSampler() as sampler, tracker:
            score_pool(read_pool(str(work / "pool"), "image", None), model, cfg, 8, work / "out",
                       pool_name="profile")
    finally:
        remove_pool(work)
    peak = max(sampler.samples, key=lambda s: s[1])
    print(f"RSS before the pass {rss_before:.1f} MB; (seconds, RSS growth MB, "
          "{operator: [queued input blocks, queued output blocks, running tasks]}):")
    for sample in sampler.samples[::8] + [peak]:
        print(f"{sample[0]:6.1f} s {sample[1] - rss_before:+7.1f} MB {json.dumps(sample[2])}")
    print(f"peak: {peak[1] - rss_before:+.1f} MB at {peak[0]:.1f} s")
    if args.memray:
        print("\n".join(["live at the pass's heap peak (memray):", *live_at_peak(args.memray)]))


if __name__ == "__main__":
    main()
