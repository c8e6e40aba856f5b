"""Where this process runs with respect to Ray: inside a Ray job, attached to a cluster, or local."""

from __future__ import annotations

import os

IN_JOB_ENV = "HQSAM_IN_RAY_JOB"  # set in the runtime_env of the jobs hqsam submits
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for every job driver


def in_ray_job() -> bool:
    """True inside a Ray job's driver (ours or any other, KubeRay's included): commands run in-process."""
    return bool(os.environ.get(IN_JOB_ENV) or os.environ.get(RAY_JOB_ENV))


def on_cluster() -> bool:
    """Whether this driver attaches to a Ray cluster (inside a job, or RAY_ADDRESS), not a local Ray."""
    return in_ray_job() or os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def init_ray(*, log_to_driver: bool = False) -> None:
    """Start (or attach to) Ray once per process, quietly; Ray Data's own progress bars off."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=log_to_driver, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
