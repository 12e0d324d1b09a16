"""Connecting to Ray: a cluster when one is given, else a local instance in-process."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ray

from pipelines.nodes import check_nodes
from pipelines.storage import S3_ENV_VARS


def cluster_address() -> str | None:
    """The Ray cluster a job joins (RAY_ADDRESS, as `ray job submit` sets it for its driver), or None for a local Ray."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if address and address != "local" else None


def cores_up() -> float:
    """The cores a job's CPU actors may fill: the cluster's CPUs, or on the local Ray (which
    `init_ray` starts with twice the cores as logical CPUs) this machine's cores."""
    if cluster_address() is None:
        return float(os.cpu_count() or 1)
    return float(ray.cluster_resources().get("CPU", 1.0))


def init_ray(address: str | None = None, num_cpus: int | None = None, storage: Sequence[str] = ()) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray.

    On a cluster every alive node is first probed for the project and for access to the
    job's `storage` URIs (pipelines.nodes.check_nodes): a node that cannot work fails the job
    in one line naming it, before any work is sent there.

    A local instance gets twice the machine's cores as logical CPUs: Ray Train workers
    and Ray Data tasks then fit beside each other on a 2-core laptop instead of waiting
    forever on a "0 CPU available" scheduler. S3 settings are forwarded to every worker.
    """
    if ray.is_initialized():
        return
    env_vars = {name: os.environ[name] for name in S3_ENV_VARS if name in os.environ}
    # Threads per worker: torch otherwise starts one per core in every actor.
    env_vars.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    address = address or cluster_address()
    if address:
        # On a cluster the job's own runtime env (ray_job.yaml) and the pods' secrets or
        # instance roles configure the workers; a second env_vars would conflict with it.
        ray.init(address=address, logging_level=logging.WARNING)
        check_nodes(list(storage))
        return
    cpus = num_cpus or int(os.environ.get("MGA_RAY_CPUS", 0)) or 2 * (os.cpu_count() or 1)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars, "worker_process_setup_hook": "pipelines.worker_setup.quiet_worker_logs"},
        logging_level=logging.WARNING,
        configure_logging=True,
        log_to_driver=True,
    )
