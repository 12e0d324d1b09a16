"""Ray resources for the jobs that run models in actor pools (embed, search), and job execution.

- `--use-gpu auto|yes|no` and `--gpus-per-actor` decide the GPUs each actor asks for
  (`actor_gpus`); `yes` asks even when none are up, so an autoscaling cluster scales a GPU
  group up from zero.
- Pools autoscale (`actor_pool`): Ray Data starts one actor and adds more, up to the
  maximum, while blocks queue for them.
- Inside an actor, the threads torch and faiss use come from the CPUs Ray assigned to
  that actor (`assigned_threads`), never from the node's core count: actors sharing a
  node must not oversubscribe it.
- `execute` runs a Ray Data job and turns a storage failure deep inside it into one
  StorageError line naming the URIs.

Ray is imported by the functions that use it: the jobs' parsers take their GPU flags from
here, and `mga <job> --help` must not wait for Ray.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from mga.errors import InputError
from pipelines.storage import StorageError, credentials_hint

if TYPE_CHECKING:
    import ray.data
    import torch

USE_GPU = ("auto", "yes", "no")
RERANK_PRECISIONS = ("auto", "float32", "bfloat16")


def actor_gpus(use_gpu: str, gpus_up: int, gpus_per_actor: float = 1.0) -> float:
    """GPUs each model actor asks Ray for: `auto` follows the GPUs up at start, `yes` asks
    even when none are up (an autoscaler then adds GPU nodes), `no` never asks."""
    if use_gpu not in USE_GPU:
        raise InputError(f"--use-gpu must be one of {', '.join(USE_GPU)}, got {use_gpu!r}")
    if not gpus_per_actor > 0:
        raise InputError(f"--gpus-per-actor must be positive, got {gpus_per_actor}")
    if use_gpu == "yes" or (use_gpu == "auto" and gpus_up > 0):
        return float(gpus_per_actor)
    return 0.0


def add_gpu_arguments(parser: argparse.ArgumentParser, actor: str, cpus_per_actor: float = 2.0) -> None:
    """`--use-gpu` and `--gpus-per-actor`, shared by the jobs that run models in actor pools."""
    parser.add_argument(
        "--use-gpu",
        default="auto",
        choices=USE_GPU,
        help="auto: GPUs if the cluster has some up at start; yes: ask for them even if none are up "
        "(an autoscaling cluster scales its GPU group from zero); no: CPU only",
    )
    parser.add_argument("--gpus-per-actor", type=float, default=1.0, help=f"GPUs per {actor} actor when GPUs are used (0.5 packs two per GPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=cpus_per_actor, help=f"CPUs (and so torch threads) per {actor} actor on CPU (default {cpus_per_actor:g})")


def actor_cpus(gpus: float, cpus_per_actor: float) -> float:
    """CPUs each actor asks for: one beside a GPU (the GPU does the work), else `cpus_per_actor`."""
    if not cpus_per_actor > 0:
        raise InputError(f"--cpus-per-actor must be positive, got {cpus_per_actor}")
    return 1.0 if gpus > 0 else float(cpus_per_actor)


def default_actors(gpus: float, gpus_up: int, cpus_up: float = 0.0, cpus_per_actor: float = 1.0) -> int:
    """The largest pool by default: one actor per GPU that is up (at least one); on CPU, as many
    actors of `cpus_per_actor` as the `cpus_up` of the cluster hold, or one where not given."""
    if gpus > 0:
        return max(1, int(gpus_up / gpus))
    return max(1, int(cpus_up // cpus_per_actor))


def actor_pool(max_actors: int) -> ray.data.ActorPoolStrategy:
    """An autoscaling pool: one actor at first, up to `max_actors` while work queues."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, max_actors))


def assigned_threads() -> int:
    """Threads for torch/faiss in this actor: the CPUs Ray assigned to it (at least one)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def actor_device(use_gpu: bool) -> torch.device:
    """The device a model actor computes on; on a CPU, torch gets the actor's assigned CPUs as threads."""
    import torch  # only actors need it: the jobs' drivers and the CLI stay light

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(assigned_threads())
    return device


def cpu_multiplies_bf16() -> bool:
    """Whether this machine's CPU has bfloat16 dot products (AVX512-BF16 or AMX-BF16 in
    /proc/cpuinfo): there ATA in bfloat16 scores ~1.3x the pairs of float32 a second
    (bench/RESULTS.md); elsewhere torch emulates bfloat16, slower than float32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def io_failure(error: BaseException) -> OSError | None:
    """The I/O error (S3 outage, missing file) at the root of a failed Ray Data job, if any."""
    import ray.exceptions

    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, ray.exceptions.RayError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


# Where Ray Data logs a failed task's tracebacks (twice) before the failure reaches the driver's call.
RAY_DATA_FAILURE_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _off_the_console(record: logging.LogRecord) -> bool:
    """Keep an error record out of the console and in Ray Data's log file: its console handler
    drops records marked `hide` (ray.data._internal.logging.HiddenRecordFilter)."""
    if record.levelno >= logging.ERROR:
        record.hide = True
    return True


def execute(job: Any, reading: str, writing: str) -> Any:
    """Run a Ray job (a Ray Data job, or tasks); a storage failure inside it becomes one
    StorageError line naming the URIs. The failure is told once: as that line, or as the
    exception itself (a bug keeps its traceback, the failed task's included); Ray Data's own
    logs of it go to its log file only."""
    loggers = [logging.getLogger(name) for name in RAY_DATA_FAILURE_LOGGERS]
    for logger in loggers:
        logger.addFilter(_off_the_console)
    try:
        return job()
    except Exception as error:  # noqa: BLE001
        cause = io_failure(error)
        if cause is None:
            raise
        # An OSError with an errno is "[Errno N] strerror: 'filename'", where Ray Data's retry note can stand in for the filename.
        told = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno and cause.strerror else str(cause)
        first_line = (told.strip().splitlines() or [type(cause).__name__])[0]
        raise StorageError(f"reading {reading} / writing {writing} failed (retries exhausted): {first_line}{credentials_hint(reading)}") from error
    finally:
        for logger in loggers:
            logger.removeFilter(_off_the_console)
