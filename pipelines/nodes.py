"""What every node of a Ray cluster must have before a job sends it work.

A job's tasks and actors run on whichever nodes have room. A node without the project (an
image of another version, a pod started from the wrong template) cannot unpickle the job's
functions, and a node without the S3 settings (the `mga-s3` secret not mounted, no pod or
instance role) fails its first read after minutes of retries; either way the job dies deep
inside Ray Data or Ray Train, or waits on work that never ends. So a job joining a cluster
first sends one zero-CPU probe to every alive node (`check_nodes`) and fails in one line
naming the node and what it lacks. Nodes an autoscaler adds later are not probed: give every
node group the same image and settings (cluster/README.md).
"""

from __future__ import annotations

import os
import re
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mga.errors import InputError
from pipelines.console import first_line
from pipelines.resources import cpu_multiplies_bf16
from pipelines.storage import credentials_configured, resolve

# Where a node reaches the job's S3 storage (as whom: storage.credentials_configured).
S3_PLACE = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
PROBE_TIMEOUT_S = 120.0


def s3_settings() -> dict[str, Any]:
    """This process's S3 place settings and whether it has credentials."""
    return {"place": {name: os.environ[name] for name in S3_PLACE if os.environ.get(name)}, "credentials": credentials_configured()}


def on_every_node(function: Any, *args: Any, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[list[tuple[dict[str, Any], Any]], list[dict[str, Any]]]:
    """Run the remote `function(*args)` once on every alive node (pinned there): the nodes that
    answered within `timeout_s` with their results (a RayError where it failed), and the nodes
    that did not answer. A node that left the cluster meanwhile is in neither: the cluster's
    node list still shows a lost node alive for a while, and nothing will be sent there."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    probes = {function.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(*args): node for node in nodes}
    answered, late = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s)
    results = []
    for probe in answered:
        try:
            results.append((probes[probe], ray.get(probe)))
        except (ray.exceptions.NodeDiedError, ray.exceptions.TaskUnschedulableError):
            continue  # gone: "the node specified via NodeAffinitySchedulingStrategy doesn't exist any more"
        except ray.exceptions.RayError as error:
            results.append((probes[probe], error))
    return results, [probes[probe] for probe in late]


@ray.remote(num_cpus=0, max_retries=0)
def _probe(uris: list[str]) -> dict[str, Any]:
    """On one node: its S3 settings, and the first of `uris` it cannot list (None: all fine).

    Being here at all means the node imported this module, so the project is installed."""
    unreachable = None
    for uri in uris:
        location = resolve(uri)
        try:
            location.fs.get_file_info(location.path)
        except OSError as error:
            unreachable = f"cannot reach {uri}: {str(error).splitlines()[0]}"
            break
    return {**s3_settings(), "unreachable": unreachable}


def _lacks(driver: dict[str, Any], node: dict[str, Any], s3: bool) -> str | None:
    """What the node lacks that the driver has, for a job on S3; None: nothing."""
    if s3:
        missing = [name for name in driver["place"] if name not in node["place"]]
        if missing:
            driver_has = ", ".join(f"{name}={driver['place'][name]}" for name in missing)
            return f"no {', '.join(missing)} in its environment (the driver has {driver_has})"
        if driver["credentials"] and not node["credentials"]:
            return "no AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, a web identity, ~/.aws), which the driver has"
    return node["unreachable"]


def check_nodes(uris: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Probe every alive node of the cluster for the project and for access to `uris`; returns
    how many answered. InputError naming the first node that cannot work, or that does not answer."""
    answered, late = on_every_node(_probe, uris, timeout_s=timeout_s)
    driver = s3_settings()
    s3 = any(uri.startswith("s3://") for uri in uris)
    for node, result in answered:
        where = f"Ray node {node['NodeManagerAddress']} (node id {node['NodeID'][:12]})"
        if isinstance(result, ray.exceptions.RayError):
            missing = re.search(r"No module named '[^']+'", str(result))
            if missing:  # the probe's own module could not be imported there
                raise InputError(f"{where} cannot run this job: the project is not installed there ({missing.group(0)}); give every node the mga image")
            raise InputError(f"{where} cannot run this job: {first_line(result)}")
        lacks = _lacks(driver, result, s3)
        if lacks:
            raise InputError(f"{where} cannot run this job: {lacks}")
    if late:
        silent = [f"{node['NodeManagerAddress']} (node id {node['NodeID'][:12]})" for node in late]
        raise InputError(f"Ray node(s) {', '.join(silent)} ran no probe within {timeout_s:.0f} s: check that they are healthy and have the project installed")
    return len(answered)


@ray.remote(num_cpus=0, max_retries=0)
def _multiplies_bf16() -> bool:
    return cpu_multiplies_bf16()


def every_node_multiplies_bf16(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the CPU of every alive node has bfloat16 dot products (cpu_multiplies_bf16); a
    node that does not answer counts as one without."""
    answered, late = on_every_node(_multiplies_bf16, timeout_s=timeout_s)
    return not late and all(result is True for _, result in answered)
