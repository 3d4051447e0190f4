"""What a user sees: selftrain's own lines and live progress on the console; what Ray, MLflow and
Python warnings print goes to a log file of the run (`--verbose`: to the console as before).

Library code logs through the `selftrain` logger (`logging.getLogger("selftrain")`), so code that
embeds selftrain configures it as any other logger; `console()` is what the CLI sets up around a
command. Progress comes from where the work runs: the Ray Train controller posts each epoch's
report and the scoring actors each batch to a `ProgressBoard` actor, which a driver thread reads
every `REFRESH_S` seconds and shows as bars on a terminal (tqdm) or as a line per task at most
every `LINE_EVERY_S` seconds elsewhere (Ray job logs, CI)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from selftrain.fsio import LOG_DIR
from selftrain.masking import redact

LOGGER = logging.getLogger("selftrain")
REFRESH_S = 1.0  # how often the driver reads the progress board
LINE_EVERY_S = 10.0  # not a terminal: one progress line per task at most this often (and its last)
MODES = ("quiet", "normal", "verbose")
# Libraries whose own loggers write to the console unless rerouted into the log file.
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "filelock", "py.warnings", "torch", "fsspec")

_board: Any = None  # the ProgressBoard actor of the command running in this process, if any


def progress_board() -> Any:
    """The progress board of the running CLI command, or None (library use: no progress posted)."""
    return _board


def progress_task(task: str, total: int | None = None) -> dict[str, Any] | None:
    """What a scoring actor needs to post its batches as progress of `task`; None without a board."""
    return {"board": _board, "task": task, "total": total} if _board is not None else None


def clock(start: float) -> str:
    minutes, seconds = divmod(int(time.monotonic() - start), 60)
    return f"[{minutes:02d}:{seconds:02d}]"


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ConsoleHandler(logging.Handler):
    """`[mm:ss] message` (credentials masked) on the console stream; around open progress bars
    on a terminal."""

    def __init__(self, stream: TextIO, start: float):
        super().__init__()
        self.stream, self.start = stream, start
        self.bars: Any = None  # the Progress drawing tqdm bars, which must clear them first

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(record.getMessage())
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            line = f"{clock(self.start)} {text}"
            if self.bars is not None and self.bars.on_terminal:
                from tqdm import tqdm

                tqdm.write(line, file=self.stream)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001 -- logging must never kill the run
            self.handleError(record)


def _board_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_concurrency=4)
    class ProgressBoard:
        """Progress events from workers and actors, drained by the driver."""

        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def post(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def drain(self) -> list[dict[str, Any]]:
            events, self.events = self.events, []
            return events

    return ProgressBoard


@dataclass
class _Task:
    name: str
    unit: str  # "epoch" or "img"
    total: int | None
    done: int = 0
    extra: int = 0  # unreadable images so far (scoring)
    fields: dict[str, Any] = field(default_factory=dict)
    first: tuple[float, int] | None = None  # (time, done) at the first update
    last: float = 0.0  # time of the latest update
    shown: float = 0.0  # when its last line was shown (-1: its final line)
    shown_done: int = -1  # `done` when its last line was shown: an unchanged line is not repeated
    epoch_seconds: list[float] = field(default_factory=list)  # epochs reported in this process
    ended: bool = False  # the stage that owns it has returned
    bar: Any = None

    def update(self, done: int, now: float) -> None:
        """`now`: when the work was done, on the clock of whoever did it (a posted event's time)."""
        self.done, self.last = done, now
        if self.first is None:  # rates count from the first update on: start-up is left out
            self.first = (now, done)

    def rate(self) -> float | None:
        if self.first is None or self.last <= self.first[0]:
            return None
        return (self.done - self.first[1]) / (self.last - self.first[0])

    def eta(self) -> str:
        if not self.total or not self.done or self.finished():
            return ""
        if self.unit == "epoch":  # the first epoch carries the start-up: left out once there are others
            later = self.epoch_seconds[1:]
            per = sum(later) / len(later) if later else None
        else:
            rate = self.rate()
            per = 1 / rate if rate else None
        return f"ETA {duration((self.total - self.done) * per)}" if per else ""

    def line(self) -> str:
        if self.unit == "epoch":
            parts = [f"epoch {self.done}/{self.total}"]
            for key, label, fmt in (("train/loss", "loss", ".3f"), ("val/accuracy", "val", ".3f"),
                                    ("val/knn_accuracy", "kNN", ".3f"), ("unsup/mask_rate", "mask", ".2f"),
                                    ("train/images_per_s", "img/s", ".0f")):
                if key in self.fields:
                    parts.append(f"{self.fields[key]:{fmt}} {label}" if label == "img/s" else f"{label} {self.fields[key]:{fmt}}")
        else:
            rate = self.rate()
            parts = [f"{self.done:,}" + (f"/{self.total:,}" if self.total else "") + " images"]
            if rate:
                parts.append(f"{rate:,.0f} img/s")
            if self.extra:
                parts.append(f"{self.extra} unreadable")
        eta = self.eta()
        return f"{self.name}: " + "  ".join(parts + ([eta] if eta else []))

    def finished(self) -> bool:
        return self.ended or (self.total is not None and self.done >= self.total)


class Progress:
    """The driver's side of the progress board: a thread that drains it and shows the tasks."""

    def __init__(self, stream: TextIO, on_terminal: bool):
        import ray

        self.stream, self.on_terminal = stream, on_terminal
        self.board = _board_class().remote()
        self.tasks: dict[str, _Task] = {}
        self._stop = threading.Event()
        self._ray = ray
        self._thread = threading.Thread(target=self._loop, name="selftrain-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self.refresh()
        self.refresh()

    def refresh(self) -> None:
        try:
            events = self._ray.get(self.board.drain.remote(), timeout=30)
        except Exception:  # noqa: BLE001 -- progress is best effort; the run goes on without it
            return
        for event in events:
            self._apply(event)
        now = time.monotonic()
        for task in list(self.tasks.values()):
            if self.on_terminal:
                self._draw(task)
            elif task.done != task.shown_done and (task.finished() or now - task.shown >= LINE_EVERY_S):
                LOGGER.info(task.line())
                task.shown, task.shown_done = now, task.done
            if task.finished():
                self._close(task)

    def _apply(self, event: dict[str, Any]) -> None:
        name = event["task"]
        task = self.tasks.get(name)
        if event.get("end"):
            if task is not None:
                task.ended = True
            return
        if task is None:
            task = self.tasks[name] = _Task(name, event["unit"], event.get("total"))
        when = float(event.get("time", time.time()))
        if event["unit"] == "epoch":
            task.update(max(task.done, int(event["done"])), when)
            task.fields = event.get("fields", {})
            task.epoch_seconds.append(float(task.fields.get("train/epoch_seconds", 0.0)))
        else:
            task.update(task.done + int(event["done"]), when)
            task.extra += int(event.get("unreadable", 0))

    def _draw(self, task: _Task) -> None:
        from tqdm import tqdm

        if task.bar is None:
            # tqdm's own rate is the driver's (events arrive in bursts): the line carries the workers'.
            shape = "{bar:20} {desc} [{elapsed}]" if task.total else "{desc} [{elapsed}]"
            task.bar = tqdm(total=task.total, desc=task.name, file=self.stream, leave=True, dynamic_ncols=True,
                            bar_format=shape)
        task.bar.n = task.done
        task.bar.set_description_str(task.line(), refresh=True)

    def _close(self, task: _Task) -> None:
        if task.bar is not None:
            task.bar.close()
        del self.tasks[task.name]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=40)
        for task in list(self.tasks.values()):
            if task.bar is not None:
                task.bar.close()
        with contextlib.suppress(Exception):
            self._ray.kill(self.board)


def end_task(spec: dict[str, Any] | None) -> None:
    """The driver's stage of a `progress_task` returned: show its last line and close it."""
    if spec is not None:
        post(spec["board"], {"task": spec["task"], "end": True})


def post(board: Any, event: dict[str, Any]) -> None:
    """Fire and forget, from a worker or actor; never waits, never fails the caller. The event
    carries its time, so rates do not depend on when the driver reads the board."""
    if board is not None:
        with contextlib.suppress(Exception):
            board.post.remote({"time": time.time(), **event})


@dataclass
class Console:
    """What `console()` set up: the log file, and `start_progress()` once Ray is up."""

    mode: str
    stream: TextIO
    log_path: Path | None
    handler: ConsoleHandler
    progress: Progress | None = None
    _rerouted: list[tuple[logging.StreamHandler, Any]] = field(default_factory=list)
    _log_file: TextIO | None = None
    _started_ray: bool = False  # this command started a local Ray: it goes down with the console

    def start_ray(self, num_cpus: int | None, progress: bool = True) -> None:
        """`init_ray`, then `start_progress` (unless `progress` is False). A Ray this command
        started is shut down before the console closes, so the messages of its last moments
        (the raylet's worker warnings) land in the log file, not on the terminal after the result."""
        from selftrain.ray_runtime import init_ray

        self._started_ray = init_ray(num_cpus)
        if progress:
            self.start_progress()
        else:
            self.reroute_libraries()

    def reroute_libraries(self) -> None:
        """Point the console handlers of Ray's, MLflow's (...) loggers at the log file. Called
        again after `ray.init`, which configures Ray Data's loggers."""
        if self._log_file is None:
            return
        for handler in _stream_handlers():
            if handler.stream is not self._log_file and handler is not self.handler:
                self._rerouted.append((handler, handler.stream))
                handler.setStream(self._log_file)

    def start_progress(self) -> None:
        """After `ray.init`: reroute Ray's loggers and start the progress board (not in quiet mode)."""
        global _board

        self.reroute_libraries()
        if self.mode == "quiet" or self.progress is not None:
            return
        import ray.data

        if self.mode != "verbose":  # Ray Data's own bars: ours stand for them
            ray.data.DataContext.get_current().enable_progress_bars = False
        self.progress = Progress(self.stream, on_terminal=_is_terminal(self.stream))
        self.handler.bars = self.progress
        _board = self.progress.board


def _stream_handlers() -> list[logging.StreamHandler]:
    """The console handlers (not files) of the root logger and of the libraries' loggers."""
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in LIBRARY_LOGGERS]
    found = []
    for name in ["", *names]:
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                found.append(handler)
    return found


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def console(mode: str = "normal", log_dir: str | Path | None = None, command: str = "run") -> Iterator[Console]:
    """Around a CLI command. `normal`: selftrain's lines and progress on stdout, everything else
    (Ray's worker output, Ray/MLflow logging, Python warnings) in `log_dir/<command>-<time>.log`;
    `verbose`: all of it on the console, as Ray prints it; `quiet`: warnings and errors only
    (then the command's final table)."""
    global _board

    if mode not in MODES:
        raise ValueError(f"console mode {mode!r}: one of {', '.join(MODES)}")
    stream, err = sys.stdout, sys.stderr
    handler = ConsoleHandler(stream, time.monotonic())
    level = logging.WARNING if mode == "quiet" else logging.INFO
    previous_level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # the console handler is the one that prints
    log_file, log_path, saved_fd = None, None, None
    if mode != "verbose" and log_dir is not None:
        log_path = Path(log_dir) / LOG_DIR / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = LogFile(log_path)
        # What Ray's log thread and `warnings` print goes to sys.stdout/stderr as they are then.
        sys.stdout = sys.stderr = log_file
        if err is sys.__stderr__ and _fileno(err) == 2:  # a real process: Ray's C++ core logs to fd 2
            saved_fd = os.dup(2)
            os.dup2(log_file.fileno(), 2)
    logging.captureWarnings(True)
    state = Console(mode, stream, log_path, handler, _log_file=log_file)
    state.reroute_libraries()
    if log_path is not None:
        LOGGER.info(f"log: {log_path} (Ray, MLflow and warnings; --verbose shows them here)")
    try:
        yield state
    finally:
        if state.progress is not None:
            state.progress.stop()
        _board = None
        if state._started_ray:
            import ray

            ray.shutdown()
        for routed, original in reversed(state._rerouted):
            _point_at(routed, original)
        if log_file is not None:  # handlers made while sys.stderr was the log file (a late import)
            for late in _stream_handlers():
                if late.stream is log_file:
                    _point_at(late, err)
        logging.captureWarnings(False)
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        sys.stdout, sys.stderr = stream, err
        if log_file is not None:
            log_file.close()
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(previous_level)
        LOGGER.propagate = True


class LogFile(io.TextIOBase):
    """The command's log file, written best effort. Ray's log thread, `warnings` and the
    libraries' handlers all write here; on a full disk their lines are lost, not the run (an
    OSError in Ray's log thread or in a logging handler would end the one or fail the other)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
        except OSError:
            pass

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return self._file.encoding

    @property
    def buffer(self) -> io.BufferedIOBase:
        return self._file.buffer

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the last buffered lines, on a full disk
            self._file.close()
        super().close()


def _point_at(handler: logging.StreamHandler, stream: TextIO) -> None:
    """`handler.setStream(stream)`, which flushes the log file first: on a full disk that flush
    fails, and must not replace the error on its way out."""
    try:
        handler.setStream(stream)
    except OSError:
        handler.stream = stream


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
