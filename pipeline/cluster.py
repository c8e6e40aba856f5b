"""Where this process runs with respect to Ray: inside a Ray job, attached to a cluster, or local."""

from __future__ import annotations

import json
import logging
import os
import time

from hqsam.hqsam_core.errors import HqsamError

log = logging.getLogger(__name__)

IN_JOB_ENV = "HQSAM_IN_RAY_JOB"  # set in the runtime_env of the jobs hqsam submits
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for every job driver
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def in_ray_job() -> bool:
    """True inside a Ray job's driver (ours or any other, KubeRay's included): commands run in-process."""
    return bool(os.environ.get(IN_JOB_ENV) or os.environ.get(RAY_JOB_ENV))


def on_cluster() -> bool:
    """Whether this driver attaches to a Ray cluster (inside a job, or RAY_ADDRESS), not a local Ray."""
    return in_ray_job() or os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def init_ray() -> None:
    """Start (or attach to) Ray once per process; Ray Data's own progress bars off (ours show).

    Off a cluster this always starts a Ray of its own: never another user's or another run's Ray
    that happens to run on the same machine (set RAY_ADDRESS to use one). Its workers' output
    reaches this terminal with -v (pipeline/console.py); it always stays in Ray's
    log folder."""
    import ray

    from hqsam.pipeline import console

    if not ray.is_initialized():
        local = not on_cluster()
        if local:
            keep_token_auth_quietly()
        console.before_ray_starts()
        address = "local" if local else None
        ray.init(address, include_dashboard=False, log_to_driver=console.verbose(), configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    console.quiet_ray()


def keep_token_auth_quietly() -> None:
    """A local Ray of ours keeps Ray's default, token authentication, without Ray's notice about it.

    With RAY_AUTH_MODE unset, Ray enables token authentication for a new local cluster and prints
    a notice that says so; setting the same mode explicitly (as Ray itself then does, for this
    process and its children) enables the same authentication without the notice. A RAY_AUTH_MODE
    the user set is kept as it is, and a cluster's auth is never changed."""
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return
    os.environ[AUTH_MODE_ENV] = "token"
    try:
        from ray._raylet import Config  # private: what Ray's own default does to pick up the mode

        Config.initialize("")
    except Exception as error:  # moved in another Ray: Ray then enables it itself, with its notice
        os.environ.pop(AUTH_MODE_ENV, None)
        log.debug("could not set Ray's token authentication explicitly: %s", error)


GPU_WAIT_S = 900.0  # default of --gpu-wait-s: a cloud autoscaler's GPU node takes minutes to join
GPU_POLL_S = 5.0


class NoGpuError(HqsamError):
    """A CUDA device was asked for on a Ray cluster that has no GPU and does not get one."""


def wait_for_gpus(device: str, timeout_s: float = GPU_WAIT_S, *, needed: int = 1) -> None:
    """Return once the Ray cluster has `needed` GPUs, at once for a CPU device. NoGpuError at once
    when it has too few and no autoscaler can add GPU nodes; on an autoscaling cluster, NoGpuError
    when they have not joined within `timeout_s` (without this check the refine actors would wait
    for a GPU for ever)."""
    if not device.startswith("cuda"):
        return
    import ray

    deadline = time.monotonic() + timeout_s
    while (gpus := ray.cluster_resources().get("GPU", 0)) < needed:
        if not autoscaler_may_add_gpus():
            raise NoGpuError(
                f"--device {device} needs a GPU, but the Ray cluster has {gpus:g} and no autoscaler "
                "that can add GPU nodes; use --device cpu or a cluster with GPU nodes"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoGpuError(
                f"no GPU node joined the Ray cluster within {timeout_s:g} s (--gpu-wait-s); check the "
                "autoscaler's GPU node types and cloud quota with `ray status`, or wait longer"
            )
        log.info("waiting up to %.0f s more for a GPU node to join the Ray cluster", left)
        time.sleep(min(GPU_POLL_S, left))


def autoscaler_may_add_gpus() -> bool:
    """Whether an autoscaler on the connected cluster may start GPU nodes: one that reports its node
    types (autoscaler v2, KubeRay) has a node type with GPUs; a v1 autoscaler with a cloud provider
    (`ray up`) is given the benefit of the doubt. False on a local Ray and on a fixed cluster, whose
    monitor only mirrors the nodes there are (each its own type, named node_<node id>)."""
    import ray._private.state
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config()
        if most is not None:
            return most.get("GPU", 0) > 0
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}")
        types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return any(node_type != f"node_{node}" for node, node_type in types.items())
    except Exception as error:  # private Ray API: if it moved, wait rather than refuse
        log.warning("could not read the autoscaler's state (%s); assuming it may add GPU nodes", error)
        return True
