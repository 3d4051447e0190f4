"""A real `mlflow server` for tests: its own sqlite store and artifact root, a free loopback
port, stopped by its process group (started here), never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, timeout: float = 180, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields (url, process); the store is `root/mlflow.db`, artifacts go to `root/artifacts`.
    `port`: the one a server of this store had before (a restart), else a free one."""
    port, log = port or free_port(), root / "mlflow-server.log"
    with log.open("a") as out:
        server = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            # MLflow 3's GenAI job runner (eight more Python processes, huey consumers that poll):
            # nothing of selftrain's uses it, and on two cores it took a core for its start-up.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log, timeout)
        yield url, server
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # its own session: the workers go with it
        server.wait(timeout=30)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} not healthy within {timeout} s: {log.read_text()[-2000:]}")
