"""`selftrain` command line: the entry point, the only place that starts or joins Ray."""

from __future__ import annotations

import argparse
import os
import sys
import time

from selftrain.errors import SelftrainError


def _run(args: argparse.Namespace) -> int:
    from selftrain.config import load_config
    from selftrain.ray_runtime import init_ray
    from selftrain.self_training import run_pipeline, summary_table

    cfg = load_config(args.pipeline, args.overrides)
    init_ray(args.num_cpus)
    start = time.monotonic()

    def say(line: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {line}", flush=True)

    summary = run_pipeline(cfg, say=say)
    print(summary_table(summary))
    print(f"summary: {os.path.join(cfg.output_dir, 'summary.json')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selftrain.bench import PARTS, record, run_bench, table
    from selftrain.ray_runtime import init_ray

    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SelftrainError(f"bench --parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    init_ray(args.num_cpus)  # before the clocks: Ray's start-up is not part of any measurement
    results = run_bench(args.quick, parts, args.tmp_dir, say=lambda line: print(line, flush=True))
    out = Path(args.out or f"runs/bench/bench-{results['mode']}.json")
    run_id = record(results, out, " ".join(["selftrain", *sys.argv[1:]]))
    print(table(results))
    print(f"results: {out}" + (f"; MLflow run {run_id}" if run_id else " (mlflow not installed: not logged)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selftrain", description="Noisy Student self-training on Ray, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run a pipeline YAML (resumes when output_dir holds an unfinished run)",
        description="Run a pipeline. Overrides are dotted.key=value, e.g. iterations=3 "
                    "pseudo_label.threshold=0.8 data.labeled=/data/labeled")
    run.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    run.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs for a local Ray (ignored when joining a cluster via RAY_ADDRESS)")
    run.set_defaults(handler=_run)
    bench = commands.add_parser(
        "bench", help="measure scoring and training against bare PyTorch loops, and driver memory",
        description="Print, write as JSON and log to MLflow: scoring_ratio, training_ratio, "
                    "driver_rss_ratio on this machine. --quick takes a few minutes on a laptop.")
    bench.add_argument("--quick", action="store_true", help="small models and pools (CPU laptop)")
    bench.add_argument("--full", dest="quick", action="store_false",
                       help="ResNet-50 at 224 px, pools of 100k and 1M files (the default)")
    bench.add_argument("--parts", default="", help="comma-separated subset of driver_memory,scoring,training")
    bench.add_argument("--out", default=None, help="JSON file (default runs/bench/bench-<mode>.json)")
    bench.add_argument("--tmp-dir", default=None, help="where generated pools go (deleted afterwards)")
    bench.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SelftrainError as exc:
        print(f"selftrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selftrain: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
