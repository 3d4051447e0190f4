"""Starting or joining Ray: called by entry points (CLI, tests) only, never by the library."""

from __future__ import annotations

import os
import sys

# Ray Train V2 releases `ray.train.report` on the controller's poll, every 2 s by default:
# 2 s per epoch, which dwarfs the short epochs of small runs. A local run polls faster.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def init_ray(num_cpus: int | None = None) -> None:
    import ray
    import ray.data

    if ray.is_initialized():  # e.g. the CLI called in-process by a test that shares one Ray
        return
    if os.environ.get("RAY_ADDRESS"):
        # Submitted as a Ray job (or pointed at a cluster): join that cluster, never a new one.
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)  # inherited by the Ray processes started below
        # `address="local"` starts a private Ray even when another one runs on this machine.
        # The dashboard (loopback only) hosts the State API that Ray Train V2's placement-group
        # cleaner polls; without it the cleaner warns every second.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
