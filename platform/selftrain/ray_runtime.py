"""Starting or joining Ray: called by entry points (CLI, tests) only, never by the library."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

from selftrain.errors import ClusterError

# Ray Train V2 releases `ray.train.report` on the controller's poll, every 2 s by default:
# 2 s per epoch, which dwarfs the short epochs of small runs. A local run polls faster.
#
# Ray keeps only `num_cpus` idle workers and kills the rest after 1 s; each pass over a training
# stream (every few dozen steps on a small pool) then starts fresh workers that import torch
# again (28 worker starts in 3 minutes of a FixMatch run on 2 cores). A local run keeps more
# warm for longer: as many as its half-CPU pool tasks run at once (two per CPU), at least 8.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_idle_worker_killing_time_threshold_ms": "60000"}
MIN_WARM_WORKERS = 8
# What every node must import to run a pipeline stage.
REQUIRED_MODULES = ("selftrain", "torch", "torchvision", "mlflow")
_PROBE_TIMEOUT_S = 5.0


def init_ray(num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS, or start a private local Ray; True when this call started or
    joined one (False: Ray was already up in this process)."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_address_answers(address)  # before importing ray: seconds, not the import's cost
    import ray
    import ray.data

    if ray.is_initialized():  # e.g. the CLI called in-process by a test that shares one Ray
        return False
    if address:
        # Submitted as a Ray job (or pointed at a cluster): join that cluster, never a new one.
        ray.init(address=address)
        check_cluster_dependencies()
    else:
        warm = max(MIN_WARM_WORKERS, 2 * (num_cpus or os.cpu_count() or 1))
        for key, value in {**LOCAL_ENV, "RAY_num_workers_soft_limit": str(warm)}.items():
            os.environ.setdefault(key, value)  # inherited by the Ray processes started below
        # `address="local"` starts a private Ray even when another one runs on this machine.
        # The dashboard (loopback only) hosts the State API that Ray Train V2's placement-group
        # cleaner polls; without it the cleaner warns every second.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return True


def check_address_answers(address: str) -> None:
    """Fail in seconds when nothing listens at RAY_ADDRESS: ray.init (2.60) retries a dead GCS
    address for minutes before it gives up."""
    if address in ("auto", "local"):
        return  # Ray resolves these itself (a running local cluster / a new one)
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"RAY_ADDRESS={address!r} is not host:port (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} (RAY_ADDRESS): {exc}; start one (`ray up cluster.yaml`, "
            "`ray start --head`) or unset RAY_ADDRESS to run on a private local Ray") from None


def check_cluster_dependencies(modules: tuple[str, ...] = REQUIRED_MODULES, timeout_s: float = 600) -> None:
    """One tiny task per live node imports what the pipeline needs, so a node without the
    project fails here with the module's name, not deep inside a training worker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_import_modules)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    pending = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(modules) for n in nodes]
    try:
        answers = ray.get(pending, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"the cluster's nodes did not import {', '.join(modules)} within {timeout_s:.0f} s") from None
    missing = {f"{node}: {module} ({error})" for node, failed in answers for module, error in failed.items()}
    if missing:
        raise ClusterError(
            "a node of the cluster cannot import the project's dependencies: " + "; ".join(sorted(missing))
            + ". Install the project on every node (setup_commands in cluster.yaml) or ship it with the job "
            "(`ray job submit --working-dir .` plus runtime_env `pip`)")


def _import_modules(modules: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    import importlib

    import ray

    failed = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 -- any import failure is reported by name
            failed[module] = f"{type(exc).__name__}: {exc}"
    return ray.util.get_node_ip_address(), failed
