"""`selftrain` command line: the entry point, the only place that starts or joins Ray."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from selftrain import __version__
from selftrain.console import LOGGER
from selftrain.errors import (SIGTERM_RECEIVED, TERMINATED_MESSAGE, SelftrainError, Terminated, full_disk_named,
                             raise_terminated, say_terminated_to)
from selftrain.fsio import OutputLock
from selftrain.masking import redact


def _console(args: argparse.Namespace, log_dir: str | Path, command: str) -> Any:
    """The console of a command (`console.console`): selftrain's lines and progress on stdout,
    Ray's and MLflow's output in `log_dir/logs/`; `--verbose` shows all, `--quiet` the result only."""
    from selftrain.console import console

    return console("verbose" if args.verbose else "quiet" if args.quiet else "normal", log_dir, command)


def _check_tracking(args: argparse.Namespace) -> None:
    """The MLflow store answers (before any output folder is made); MLflow's notes on creating
    a new sqlite store's tables are shown with --verbose only."""
    import logging

    from selftrain.tracking import check_tracking_store

    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        check_tracking_store()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from selftrain.config import load_config

    cfg = load_config(args.pipeline, args.overrides)
    _check_tracking(args)  # a dead MLflow server fails here, a dead RAY_ADDRESS in init_ray: seconds
    # A busy output_dir is refused before Ray starts.
    with OutputLock(cfg.output_dir, "run"), full_disk_named(cfg.output_dir), \
            _console(args, cfg.output_dir, "run") as shown:
        shown.start_ray(args.num_cpus)
        from selftrain.self_training import run_pipeline, summary_table  # heavy: torch, Ray Data

        summary = run_pipeline(cfg)
    print(summary_table(summary))
    print(f"summary: {os.path.join(cfg.output_dir, 'summary.json')}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from selftrain.config import load_sweep
    from selftrain.sweep import run_sweep, sweep_table

    cfg, sweep = load_sweep(args.sweep, args.overrides)
    _check_tracking(args)
    with OutputLock(cfg.output_dir, "sweep"), full_disk_named(cfg.output_dir), \
            _console(args, cfg.output_dir, "sweep") as shown:
        shown.start_ray(args.num_cpus)
        summary = run_sweep(cfg, sweep, resume=args.resume)
    print(sweep_table(summary))
    print(f"summary: {os.path.join(cfg.output_dir, 'summary.json')}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from selftrain.compare import compare_runs, render

    table = compare_runs(args.experiment, args.sweep, args.metric, args.ascending, args.limit)
    text = render(table, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(table)} runs to {args.out}")
    else:
        print(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    from selftrain.report import write_report

    path, kind = write_report(args.output_dir, args.out)
    print(f"report of the {kind} in {Path(args.output_dir).resolve()}: {path}")
    return 0


def _add_sweep_commands(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep", parents=[_output_flags()], help="run a sweep YAML: Ray Tune over pipeline keys, one shared teacher pass",
        description="Sweep a pipeline's knobs with Ray Tune (ASHA by default). The YAML is a pipeline plus a "
                    "'sweep:' section; overrides are dotted.key=value, e.g. output_dir=runs/sweep1 sweep.num_samples=2")
    sweep.add_argument("sweep", help="sweep YAML, e.g. pipelines/quickstart_sweep.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in output_dir after a crash")
    sweep.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    sweep.set_defaults(handler=_sweep)

    compare = commands.add_parser(
        "compare", help="table of MLflow runs of an experiment or one sweep, best first",
        description="Compare runs from the MLflow store (MLFLOW_TRACKING_URI, else ./mlflow.db).")
    compare.add_argument("--experiment", required=True, help="MLflow experiment: the pipeline's 'name'")
    compare.add_argument("--sweep", help="only the trials of this sweep: its output_dir or MLflow run id")
    compare.add_argument("--metric", help="sort by this metric (default: val/accuracy, else eval accuracy)")
    compare.add_argument("--ascending", action="store_true", help="smallest first (for losses)")
    compare.add_argument("--limit", type=int, help="show the first N runs")
    compare.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    compare.add_argument("--out", help="write to this file instead of printing")
    compare.set_defaults(handler=_compare)


def _predict(args: argparse.Namespace) -> int:
    from selftrain.config import ScoringConfig

    cfg = ScoringConfig(batch_size=args.batch_size, max_rejected_fraction=args.max_rejected_fraction)
    out = Path(args.out).resolve()
    with full_disk_named(str(out.parent)), _console(args, out.parent, "predict") as shown:
        shown.start_ray(args.num_cpus)
        from selftrain.stages.predict import predict  # heavy: torch, Ray Data

        result = predict(args.model, args.data, str(out), cfg, args.parquet_column)
    print(f"predicted {result['files'] - result['unreadable']} images ({result['unreadable']} unreadable or "
          f"skipped, named in the error column) into {result['out']}; classes: {', '.join(result['classes'])}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from selftrain.config import load_config

    cfg = load_config(args.pipeline, args.overrides)
    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    _check_tracking(args)
    out = Path(args.out or os.path.join(cfg.output_dir, "eval")).expanduser().resolve()
    with OutputLock(out, "eval"), full_disk_named(str(out)), _console(args, out, "eval") as shown:
        shown.start_ray(args.num_cpus)
        from selftrain.stages.predict import resolve_model  # heavy: torch, Ray Data
        from selftrain.stages.protocols import evaluate_backbone
        from selftrain.tracking import Tracker

        model_dir = resolve_model(args.model, str(out / "downloads"))
        results = evaluate_backbone(model_dir, cfg, protocols, out, args.k, args.temperature, args.label_fraction)
        tracker = Tracker(cfg.name)
        run_id = tracker.start_run(f"eval-{'-'.join(protocols)}", tags={"selftrain.role": "eval"})
        with tracker.terminating([run_id]):
            tracker.log_params(run_id, {"model": args.model, "protocols": ",".join(protocols), "k": args.k,
                                        "temperature": args.temperature, "label_fraction": args.label_fraction})
            tracker.log_metrics(run_id, {f"eval/{r['protocol']}_accuracy": r["accuracy"] for r in results})
            tracker.log_json(run_id, results, "eval.json")
            tracker.finish(run_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"model": args.model, "results": results}, indent=2))
    for r in results:
        detail = {"knn": f"k={r.get('k')}, T={r.get('temperature')}", "linear": "logistic regression on frozen features",
                  "finetune": f"{r.get('label_fraction', 0):.0%} of the labeled images"}[r["protocol"]]
        print(f"{r['protocol']:>8}  accuracy {r['accuracy']:.4f}  ({detail}; {r['labeled_images']} labeled, "
              f"{r['test_images']} test images)")
    print(f"results: {out / 'eval.json'} (MLflow run {run_id})")
    return 0


def _protocol(args: argparse.Namespace) -> int:
    from selftrain.config import load_config
    from selftrain.errors import ConfigError

    cfg = load_config(args.pipeline, args.overrides)
    try:
        labels = [int(n) for n in args.labels_per_class.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--labels-per-class {args.labels_per_class!r}: give counts like 1,4,25") from None
    _check_tracking(args)
    with OutputLock(cfg.output_dir, "protocol"), full_disk_named(cfg.output_dir), \
            _console(args, cfg.output_dir, "protocol") as shown:
        shown.start_ray(args.num_cpus)
        from selftrain.protocol import run_protocol  # heavy: torch, Ray Data

        result = run_protocol(cfg, labels, args.seeds)
    print("test accuracy (%), mean ± std over seeds (runs), by labeled images per class:")
    print(result["table"].to_string())
    print(f"tables: {result['out']}/protocol.csv, protocol.md; every run: runs.csv (MLflow run {result['mlflow_run_id']})")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from selftrain.config import _read_yaml, describe_config, load_config, load_sweep

    is_sweep = "sweep" in _read_yaml(args.pipeline)
    cfg, sweep = load_sweep(args.pipeline, args.overrides) if is_sweep else (load_config(args.pipeline, args.overrides), None)
    print(f"# {args.pipeline} resolved{' with ' + ' '.join(args.overrides) if args.overrides else ''}; "
          "* marks a value that is not the default")
    print("\n".join(describe_config(cfg)))
    if sweep is not None:
        print("\n".join(describe_config(sweep, "sweep.")))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selftrain.bench import PARTS, record, run_bench, table

    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SelftrainError(f"bench --parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.quick is None:
        import torch

        args.quick = not torch.cuda.is_available()
        if args.quick:
            print("bench: no GPU visible here, so the quick mode (small models and pools); "
                  "--full forces the GPU-sized bench", flush=True)
    out = Path(args.out or f"runs/bench/bench-{'quick' if args.quick else 'full'}.json")
    with _console(args, out.resolve().parent, "bench") as shown:  # no progress board: nothing extra timed
        shown.start_ray(args.num_cpus, progress=False)  # before the clocks: Ray's start-up is not measured
        results = run_bench(args.quick, parts, args.tmp_dir, say=LOGGER.info, repeats=args.repeats)
    run_id = record(results, out, " ".join(["selftrain", *sys.argv[1:]]))
    print(table(results))
    print(f"results: {out}" + (f"; MLflow run {run_id}" if run_id else " (mlflow not installed: not logged)"))
    return 0


def _output_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    chosen = flags.add_mutually_exclusive_group()
    chosen.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own output (otherwise in <output folder>/logs/)")
    chosen.add_argument("--quiet", action="store_true", help="warnings, errors and the final result only")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selftrain", description="Noisy Student self-training on Ray, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"selftrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", parents=[_output_flags()], help="run a pipeline YAML (resumes when output_dir holds an unfinished run)",
        description="Run a pipeline. Overrides are dotted.key=value, e.g. iterations=3 "
                    "pseudo_label.threshold=0.8 data.labeled=/data/labeled")
    run.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    run.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs for a local Ray (ignored when joining a cluster via RAY_ADDRESS)")
    run.set_defaults(handler=_run)
    bench = commands.add_parser(
        "bench", parents=[_output_flags()], help="measure scoring and training against bare PyTorch loops, and driver memory",
        description="Print, write as JSON and log to MLflow: scoring_ratio, training_ratio, "
                    "driver_rss_ratio on this machine. --quick takes a few minutes on a laptop.")
    bench.add_argument("--quick", action="store_true", default=None, help="small models and pools (CPU laptop)")
    bench.add_argument("--full", dest="quick", action="store_false",
                       help="ResNet-50 at 224 px, pools of 100k and 1M files (the default where a GPU is "
                            "visible; without one, --quick is the default)")
    bench.add_argument("--parts", default="",
                       help="comma-separated subset of driver_memory,scoring,training,plumbing,consistency,pretrain")
    bench.add_argument("--repeats", type=int, default=3,
                       help="runs of each part with a goal; the median is reported, with min and max (default 3)")
    bench.add_argument("--out", default=None, help="JSON file (default runs/bench/bench-<mode>.json)")
    bench.add_argument("--tmp-dir", default=None, help="where generated pools go (deleted afterwards)")
    bench.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    bench.set_defaults(handler=_bench)
    _add_sweep_commands(commands)
    predict = commands.add_parser(
        "predict", parents=[_output_flags()], help="label images with a trained model (Ray Data, the scoring path) into Parquet",
        description="One row per file of DATA: path, class, class_index, confidence, probabilities, error "
                    "(unreadable files keep their row and reason). MODEL: a model folder "
                    "(<output_dir>/iter1/model), an MLflow run id, runs:/<run id>/model, or a registered "
                    "model: models:/<name>@best (the final model with the highest test accuracy), "
                    "models:/<name>@<alias>, models:/<name>/<version>. DATA: a folder "
                    "tree, a glob, Parquet, or a URI, as data.unlabeled.")
    predict.add_argument("model")
    predict.add_argument("data")
    predict.add_argument("--out", required=True, help="Parquet folder to write (read with pandas.read_parquet)")
    predict.add_argument("--batch-size", type=int, default=256)
    predict.add_argument("--max-rejected-fraction", type=float, default=1.0,
                         help="fail when more than this share of the images is unreadable (default 1: never)")
    predict.add_argument("--parquet-column", default="image", help="image-bytes column of a Parquet DATA")
    predict.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    predict.set_defaults(handler=_predict)
    evaluate = commands.add_parser(
        "eval", parents=[_output_flags()], help="score a saved model's backbone by the representation-learning protocols",
        description="knn: weighted kNN of the test images among the labeled ones on frozen features; "
                    "linear: a logistic-regression probe on frozen features; finetune: the whole network "
                    "trained supervised from the backbone on --label-fraction of the labeled images. The "
                    "images are PIPELINE's data section (its labeled and test sets); results are printed, "
                    "written to OUT/eval.json and logged to MLflow in PIPELINE's experiment.")
    evaluate.add_argument("model", help="a model folder (e.g. <output_dir>/pretrain/model), an MLflow run id, "
                                        "runs:/<run id>/model, models:/<name>@<alias> or models:/<name>/<version>")
    evaluate.add_argument("pipeline", help="pipeline YAML whose data (and, for finetune, teacher budget) to use")
    evaluate.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the pipeline")
    evaluate.add_argument("--protocol", default="knn,linear", help="knn, linear, finetune, or a comma list")
    evaluate.add_argument("--k", type=int, default=200, help="kNN neighbours (default 200)")
    evaluate.add_argument("--temperature", type=float, default=0.1, help="kNN vote temperature (default 0.1)")
    evaluate.add_argument("--label-fraction", type=float, default=0.1,
                          help="finetune: share of the labeled images per class (default 0.1, at least one each)")
    evaluate.add_argument("--out", default=None, help="results folder (default <output_dir>/eval)")
    evaluate.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    evaluate.set_defaults(handler=_eval)
    protocol = commands.add_parser(
        "protocol", parents=[_output_flags()], help="a pipeline over label counts x seeds: mean ± std per label count",
        description="Runs PIPELINE (a built-in dataset) once per labeled-images-per-class count and seed, each "
                    "into <output_dir>/labels<n>-seed<s> (finished runs are read back, not redone), and "
                    "prints mean ± std of test accuracy per label count for the baseline, teacher, each "
                    "student and the final model; CSV and Markdown in <output_dir>, one MLflow parent run.")
    protocol.add_argument("pipeline")
    protocol.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    protocol.add_argument("--labels-per-class", default="1,4,25", help="comma list (default 1,4,25)")
    protocol.add_argument("--seeds", type=int, default=3, help="seeds per label count: seed, seed+1, ... (default 3)")
    protocol.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    protocol.set_defaults(handler=_protocol)
    report = commands.add_parser(
        "report", help="one self-contained HTML page for a run or sweep, to attach to a ticket or mail",
        description="Read what a `selftrain run` (finished or not) or a finished `selftrain sweep` wrote to "
                    "OUTPUT_DIR and write one HTML page: no network needed to open it (figures inline, no "
                    "scripts). A run: accuracy per model, pseudo-label confidence and per-class counts per "
                    "iteration, confusion matrices, pretraining, seconds per stage, unreadable files, MLflow "
                    "run ids, the config. A sweep: the objective per trial and against each swept key, the best "
                    "config, trials stopped early. Starts no Ray and no MLflow.")
    report.add_argument("output_dir", help="the run's or sweep's output_dir, e.g. runs/quickstart")
    report.add_argument("--out", default=None, help="HTML file to write (default <OUTPUT_DIR>/report.html)")
    report.set_defaults(handler=_report)
    config = commands.add_parser("config", help="show a pipeline's resolved config, every key documented")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="every key: value, default, allowed range, description",
        description="Print the resolved config of a pipeline or sweep YAML (after overrides): every key "
                    "with its value, default, allowed range and description. Starts nothing.")
    show.add_argument("pipeline", help="pipeline or sweep YAML")
    show.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    show.set_defaults(handler=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 failed (a bug: traceback), 2 usage or config/data error,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM: `kill`, `ray job stop`)."""
    args = build_parser().parse_args(argv)
    SIGTERM_RECEIVED.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    terminal = _stderr_copy() if main_thread else None
    say_terminated_to(terminal)  # the handler says it was stopped there, at once
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return args.handler(args)
    except SelftrainError as exc:
        print(f"selftrain: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`Terminated`, or Ray's re-raise of it)
        if isinstance(exc, Terminated) or SIGTERM_RECEIVED.is_set():
            if terminal is None:  # the handler could not say it (stderr without a file descriptor)
                print(TERMINATED_MESSAGE, file=sys.stderr)
            return 143
        print("selftrain: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if terminal is not None:
            say_terminated_to(None)
            os.close(terminal)


def _stderr_copy() -> int | None:
    """A duplicate of stderr's file descriptor as the command starts (the console later points
    fd 2 at its log file), or None where stderr has none (a test's captured stream)."""
    try:
        return os.dup(sys.stderr.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


if __name__ == "__main__":
    sys.exit(main())
