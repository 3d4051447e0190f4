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
    from selftrain.tracking import check_tracking_store

    cfg = load_config(args.pipeline, args.overrides)
    check_tracking_store()  # a dead MLflow server fails here, a dead RAY_ADDRESS in init_ray: seconds
    init_ray(args.num_cpus)
    from selftrain.self_training import run_pipeline, summary_table  # heavy: torch, Ray Data

    start = time.monotonic()

    def say(line: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {line}", flush=True)

    summary = run_pipeline(cfg, say=say)
    print(summary_table(summary))
    print(f"summary: {os.path.join(cfg.output_dir, 'summary.json')}")
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
