"""`selftrain bench`: is the platform as fast as the hardware, with a flat driver memory?

Four measurements on the current machine, each a ratio against a bare baseline (see the
module of each part for exactly what each side includes):

1. `scoring_ratio`: teacher scoring through the Ray Data pipeline / a bare PyTorch loop over the
   same decoded images (goal >= 0.95 on CPU, >= 0.90 on a GPU);
2. `training_ratio`: student training through Ray Train (1 worker) / a bare loop over the same
   prepared rows (goal >= 0.85);
3. `driver_rss_ratio`: driver RSS growth scoring a pool of 10 N files / of N files (goal <= 1.2);
5. `consistency_training_ratio`: FixMatch steps through Ray Train (1 worker, a labeled and an
   unlabeled stream) / a bare FixMatch loop over the same rows (goal >= 0.85; `bench/consistency.py`);
6. `pretrain_ratio`: SimCLR pretraining steps through Ray Train (1 worker, two views per image) /
   a bare SimCLR loop over the same views (goal >= 0.85; `bench/pretrain.py`).

And one without a goal (4.), for machines without a GPU: `plumbing_ratio`, the share of a fast
device's speed (an H100's ResNet-50 rate) that the scoring pipeline keeps when only the device
is a stand-in (`bench/plumbing.py`).

`--quick` (2-core laptop, CPU, a few minutes) uses small models and pools; the full mode is
for real hardware: ResNet-50 at 224 px with bf16 AMP and channels_last on a GPU, CPU vs GPU
JPEG decoding, pools of 100k and 1M files, FixMatch on a WRN-28-2 at 32 px.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from selftrain.config import ScoringConfig

PARTS = ("driver_memory", "scoring", "training", "plumbing", "consistency", "pretrain")
GOALS = {"scoring_ratio": (">=", 0.90), "training_ratio": (">=", 0.85), "driver_rss_ratio": ("<=", 1.2),
         "consistency_training_ratio": (">=", 0.85), "pretrain_ratio": (">=", 0.85)}
# Without a GPU the pipeline's model runs at the CPU's own speed: it must keep more of it.
CPU_GOALS = {"scoring_ratio": (">=", 0.95)}


def goal(key: str, results: dict[str, Any]) -> tuple[str, float]:
    """(comparison, value) that `key` must meet, on the device these results were measured on."""
    return GOALS[key] if results.get("use_gpu") else CPU_GOALS.get(key, GOALS[key])


@dataclass(frozen=True)
class BenchSizes:
    scoring_arch: str
    scoring_images: int
    scoring_source_size: int  # generated JPEGs are this size, decoded and resized to image_size
    image_size: int
    scoring_batch: int
    training_arch: str
    training_images: int
    training_size: int
    training_epochs: int
    training_batch: int
    pool_small: int  # files; the large pool is 10x
    pool_image_size: int
    cpus_per_actor: float
    plumbing_images: int  # decoded 224 px images in the object store (150 KB each)
    consistency_arch: str  # FixMatch: B labeled + mu * B unlabeled (weak and strong) per step
    consistency_size: int
    consistency_batch: int
    consistency_mu: int
    consistency_epochs: int
    consistency_steps: int  # per epoch
    consistency_pool: int  # unlabeled rows
    consistency_labeled: int
    pretrain_arch: str  # SimCLR: batch_size images, two views each, per step
    pretrain_size: int
    pretrain_batch: int
    pretrain_epochs: int
    pretrain_images: int


QUICK = BenchSizes("resnet18", 4096, 40, 32, 256, "resnet18", 768, 32, 3, 64, 5_000, 8, 1.0, 8192,
                   "cnn_small", 16, 32, 7, 4, 20, 2_048, 256, "cnn_small", 16, 128, 4, 2_560)
FULL = BenchSizes("resnet50", 32768, 256, 224, 256, "resnet50", 12800, 224, 3, 128, 100_000, 8, 4.0, 32768,
                  "wrn_28_2", 32, 64, 7, 4, 50, 16_384, 4_000, "wrn_28_2", 32, 512, 4, 25_600)
PLUMBING_SIZE = 224


def _model_dir(root: Path, arch: str, size: int, num_classes: int = 10) -> str:
    from selftrain.models.registry import build_model
    from selftrain.training.loop import save_model

    directory = root / f"{arch}-{size}"
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, build_model(arch, num_classes),
               {"arch": arch, "num_classes": num_classes, "classes": [str(c) for c in range(num_classes)],
                "image_size": size})
    return str(directory)


RATIO_OF = {"scoring": "scoring_ratio", "training": "training_ratio", "driver_memory": "driver_rss_ratio",
            "consistency": "consistency_training_ratio", "pretrain": "pretrain_ratio"}


def repeated(part: str, repeats: int, measure, say=print) -> dict[str, Any]:
    """`measure()` `repeats` times; the run with the median ratio stands for the part (its own
    numbers stay consistent with each other), and `repeats` lists every run's ratio, so the
    table shows min and max beside the median. These machines vary 5-10% run to run."""
    runs = []
    for attempt in range(repeats):
        runs.append(measure())
        if repeats > 1:  # each run's rates too: a run cut short still leaves its numbers in the log
            rates = ", ".join(f"{k} {v:,.1f}" for k, v in runs[-1].items() if k.endswith("_per_s") and isinstance(v, float))
            say(f"   {part} run {attempt + 1}/{repeats}: {RATIO_OF[part]} {runs[-1][RATIO_OF[part]]:.3f}"
                + (f" ({rates})" if rates else ""))
    key = RATIO_OF[part]
    middle = sorted(runs, key=lambda r: r[key])[len(runs) // 2]  # the median run (odd repeats)
    return {**middle, key: statistics.median(r[key] for r in runs), "repeats": [r[key] for r in runs]}


def run_bench(quick: bool, parts: list[str], tmp_root: str | None = None,
              say=print, repeats: int = 3) -> dict[str, Any]:
    """Run the chosen parts on the running Ray, each with a goal `repeats` times (the median run
    is reported, with every run's ratio); returns the JSON-ready results."""
    from selftrain.stages.score import wants_gpu

    sizes = QUICK if quick else FULL
    use_gpu = wants_gpu("auto") and torch.cuda.is_available()
    scoring = ScoringConfig(batch_size=sizes.scoring_batch, cpus_per_actor=sizes.cpus_per_actor,
                            use_gpu=use_gpu)
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full", "sizes": asdict(sizes), "device": _device(use_gpu), "use_gpu": use_gpu,
        "repeats": repeats,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="selftrain-bench-", dir=tmp_root) as tmp:
        models = Path(tmp)
        if "driver_memory" in parts:  # first: the cleanest driver process
            from selftrain.bench.driver_memory import run_driver_memory

            say(f"driver memory: scoring pools of {sizes.pool_small:,} and {10 * sizes.pool_small:,} files")
            pool_cfg = scoring.model_copy(update={"batch_size": 1024})
            pool_model = _model_dir(models, "resnet18", sizes.pool_image_size)
            results["driver_memory"] = repeated("driver_memory", repeats, lambda: run_driver_memory(
                sizes.pool_small, pool_model, sizes.pool_image_size, pool_cfg, tmp_root), say)
        if "scoring" in parts:
            from selftrain.bench.scoring import run_scoring, scoring_extras, scoring_input

            say(f"scoring: {sizes.scoring_arch} at {sizes.image_size} px, {sizes.scoring_images:,} images")
            scoring_model = _model_dir(models, sizes.scoring_arch, sizes.image_size)
            given = scoring_input(sizes.scoring_images, sizes.scoring_source_size, sizes.image_size, scoring)
            results["scoring"] = repeated("scoring", repeats, lambda: run_scoring(scoring_model, given, scoring, use_gpu),
                                          say)
            say("scoring: " + ("CUDA graphs, more calls, nvJPEG, " if use_gpu else "")
                + "from JPEG bytes, the pool pass from files (once)")
            results["scoring"].update(scoring_extras(scoring_model, given, scoring, sizes.image_size, use_gpu,
                                                     results["scoring"]["bare_images_per_s"], tmp_root, say))
            del given
        if "training" in parts:
            from selftrain.bench.training import run_training

            say(f"training: {sizes.training_arch} at {sizes.training_size} px, {sizes.training_images:,} images")
            results["training"] = repeated("training", repeats, lambda: run_training(
                sizes.training_arch, sizes.training_images, sizes.training_size, sizes.training_epochs,
                sizes.training_batch, sizes.cpus_per_actor, use_gpu), say)
            if use_gpu:
                from selftrain.bench.training import training_extras

                say("training: pinned host memory, four batches prefetched (once)")
                results["training"].update(training_extras(
                    sizes.training_arch, sizes.training_images, sizes.training_size, sizes.training_epochs,
                    sizes.training_batch, sizes.cpus_per_actor, results["training"]["bare_images_per_s"]))
                say(f"   training extra: {results['training'].get('pinned_training_ratio', 'failed')} "
                    f"({results['training'].get('pinned_ray_train_images_per_s', results['training'].get('pinned_error'))})")
        if "plumbing" in parts:
            from selftrain.bench.plumbing import run_plumbing

            say(f"plumbing: {sizes.plumbing_images:,} images at {PLUMBING_SIZE} px through the scoring pipeline "
                "to a stand-in device")
            results["plumbing"] = run_plumbing(sizes.plumbing_images, PLUMBING_SIZE, scoring)
        if "consistency" in parts:
            from selftrain.bench.consistency import run_consistency

            say(f"consistency: FixMatch, {sizes.consistency_arch} at {sizes.consistency_size} px, batch "
                f"{sizes.consistency_batch} + {sizes.consistency_mu}x unlabeled, {sizes.consistency_epochs} epochs x "
                f"{sizes.consistency_steps} steps (random pixels: empty-mask warnings are expected)")
            results["consistency"] = repeated("consistency", repeats, lambda: run_consistency(
                sizes.consistency_arch, sizes.consistency_labeled, sizes.consistency_pool, sizes.consistency_size,
                sizes.consistency_epochs, sizes.consistency_steps, sizes.consistency_batch, sizes.cpus_per_actor,
                use_gpu, mu=sizes.consistency_mu), say)
        if "pretrain" in parts:
            from selftrain.bench.pretrain import run_pretrain

            say(f"pretrain: SimCLR, {sizes.pretrain_arch} at {sizes.pretrain_size} px, batch {sizes.pretrain_batch} "
                f"x 2 views, {sizes.pretrain_epochs} epochs over {sizes.pretrain_images:,} images")
            results["pretrain"] = repeated("pretrain", repeats, lambda: run_pretrain(
                "simclr", sizes.pretrain_arch, sizes.pretrain_images, sizes.pretrain_size, sizes.pretrain_epochs,
                sizes.pretrain_batch, sizes.cpus_per_actor, use_gpu), say)
    results["ratios"] = ratios(results)
    results["ratio_ranges"] = {RATIO_OF[p]: [min(results[p]["repeats"]), max(results[p]["repeats"]),
                                             len(results[p]["repeats"])]
                               for p in RATIO_OF if p in results and "repeats" in results[p]}
    return results


def _device(use_gpu: bool) -> str:
    import os

    cpu = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    return f"{torch.cuda.get_device_name(0)}, {cpu}" if use_gpu else f"CPU only, {cpu}"


def ratios(results: dict[str, Any]) -> dict[str, float]:
    return {key: results[part][key] for part, key in RATIO_OF.items() if part in results}


def table(results: dict[str, Any]) -> str:
    """The printed summary: one line per measurement, ratio and goal."""
    lines = [f"selftrain bench ({results['mode']}) on {results['device']}",
             f"{'measurement':<46}{'pipeline':>14}{'bare':>14}{'ratio':>9}  goal"]

    def row(name: str, pipeline: float, bare: float | None, key: str | None, unit: str = "img/s",
            ratio: float | None = None) -> None:
        ratio = results["ratios"].get(key) if key else ratio
        wanted = f"{goal(key, results)[0]} {goal(key, results)[1]}" if key else ""
        met = "" if ratio is None or key is None else ("  met" if _met(goal(key, results), ratio) else "  NOT met")
        spread = results["ratio_ranges"].get(key) if key and results.get("ratio_ranges") else None
        if spread and spread[2] > 1:
            met += f"  (median of {spread[2]}: {spread[0]:.3f}-{spread[1]:.3f})"
        bare_text = f"{bare:>10,.1f} {unit}" if bare is not None else " " * 14
        ratio_text = f"{ratio:>9.3f}" if ratio is not None else " " * 9
        lines.append(f"{name:<46}{pipeline:>10,.1f} {unit}{bare_text}{ratio_text}  {wanted}{met}")

    if "scoring" in results:
        s = results["scoring"]
        row("1. scoring, same decoded images", s["pipeline_images_per_s"], s["bare_images_per_s"], "scoring_ratio")
        row("   pipeline from JPEG, CPU decode tasks", s["pipeline_cpu_decode_images_per_s"], None, None)
        if "pipeline_gpu_decode_images_per_s" in s:
            row("   pipeline from JPEG, GPU decode in actor", s["pipeline_gpu_decode_images_per_s"], None, None)
            row("   GPU JPEG decode+resize alone", s["gpu_decode_images_per_s"], None, None)
        if "graphs_ratio" in s:
            row("   both sides with CUDA graphs (experiment)", s["graphs_pipeline_images_per_s"],
                s["graphs_bare_images_per_s"], None, ratio=s["graphs_ratio"])
        elif "graphs_error" in s:
            lines.append(f"   both sides with CUDA graphs (experiment): failed, {s['graphs_error']}")
        if "more_calls_ratio" in s:
            row(f"   scoring.concurrent_batches={s['more_calls']} (experiment)", s["more_calls_pipeline_images_per_s"],
                s["more_calls_bare_images_per_s"], None, ratio=s["more_calls_ratio"])
        row("   CPU decode+resize, one process", s["cpu_decode_images_per_s_one_process"], None, None)
        if "pool_pass_images_per_s" in s:
            row(f"   pool pass: {s['pool_pass_images']:,} files -> scores Parquet", s["pool_pass_images_per_s"],
                s["bare_images_per_s"], None, ratio=s["pool_pass_over_model"])
            lines.append(f"     (wall clock, {s['pool_pass_seconds']:.1f} s: listing, reading, CPU decode tasks, "
                         "actor start, scoring, Parquet write and check; bare = the model alone)")
            if "pool_pass_first_scored_seconds" in s:
                first, last = s["pool_pass_first_scored_seconds"], s["pool_pass_last_scored_seconds"]
                lines.append(f"     (first batch scored {first:.1f} s in, the last {last:.1f} s in, "
                             f"{s['pool_pass_seconds'] - last:.1f} s after it to the checked Parquet)")
    if "training" in results:
        t = results["training"]
        row("2. training, Ray Train 1 worker vs bare", t["ray_train_images_per_s"], t["bare_images_per_s"],
            "training_ratio")
        if "pinned_training_ratio" in t:
            row("   pinned host memory, 4 prefetched (experiment)", t["pinned_ray_train_images_per_s"],
                t["bare_images_per_s"], None, ratio=t["pinned_training_ratio"])
        elif "pinned_error" in t:
            lines.append(f"   pinned host memory (experiment): failed, {t['pinned_error']}")
    if "driver_memory" in results:
        d = results["driver_memory"]
        for name in ("small", "large"):
            p = d[name]
            lines.append(f"   pool of {p['files']:>9,} files: {p['images_per_s']:>8,.1f} img/s, driver RSS "
                         f"{p['rss_before_mb']:,.0f} MB before, peak {p['rss_peak_mb']:,.0f} MB")
        row("3. driver RSS growth, 10x pool / 1x pool", d["large"]["growth_mb"], d["small"]["growth_mb"],
            "driver_rss_ratio", unit="MB   ")
        lines.append(f"   {d['growth_bytes_per_file']:,.0f} bytes of driver growth per file on the large pool "
                     f"(read_binary_files keeps ~{d['read_binary_files_bytes_per_file']} per file)")
    if "plumbing" in results:
        p = results["plumbing"]
        lines.append(f"4. scoring pipeline vs a stand-in device of {p['device_images_per_s']:,.0f} img/s "
                     f"({p['image_size']} px, batch {p['batch_size']}; no goal)")
        for calls, measured in p["by_concurrent_batches"].items():
            row(f"   scoring.concurrent_batches={calls}", measured["pipeline_images_per_s"],
                p["device_images_per_s"], None, ratio=measured["plumbing_ratio"])
    if "consistency" in results:
        c = results["consistency"]
        row("5. FixMatch steps, Ray Train 1 worker vs bare", c["ray_train_steps_per_s"], c["bare_steps_per_s"],
            "consistency_training_ratio", unit="step/s")
    if "pretrain" in results:
        p = results["pretrain"]
        row("6. SimCLR steps, Ray Train 1 worker vs bare", p["ray_train_steps_per_s"], p["bare_steps_per_s"],
            "pretrain_ratio", unit="step/s")
    return "\n".join(lines)


def _met(wanted: tuple[str, float], value: float) -> bool:
    op, bound = wanted
    return value >= bound if op == ">=" else value <= bound


def record(results: dict[str, Any], out: Path, command: str) -> str | None:
    """Write the JSON; log params, ratios and the JSON to MLflow (None when mlflow is missing)."""
    results["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    try:
        from selftrain.tracking import Tracker, flatten
    except ImportError:  # e.g. a GPU box with ray and torch but no mlflow: the JSON still counts
        return None
    tracker = Tracker("selftrain-bench")
    run_id = tracker.start_run(f"bench-{results['mode']}", tags={"selftrain.bench": results["mode"]})
    tracker.log_params(run_id, {"mode": results["mode"], "device": results["device"], "command": command,
                                "sizes": results["sizes"]})
    numbers = {f"bench/{k}": v for k, v in flatten({p: results[p] for p in PARTS if p in results}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(run_id, {**numbers, **{f"bench/{k}": v for k, v in results["ratios"].items()}})
    tracker.log_artifact(run_id, out)
    tracker.finish(run_id)
    return run_id
