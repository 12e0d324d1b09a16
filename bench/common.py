"""Shared pieces of the benchmarks: the machine they ran on, a random-init artifact, a catalog."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from mga.artifact import pack_artifact
from mga.config import ModelConfig
from mga.model import MGAModel
from pipelines.config import load_config
from pipelines.model_store import write_artifact


def machine() -> str:
    """CPU model, cores, memory and GPU, as one line for RESULTS.md."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}; torch {torch.__version__}"


def tiny_model_config(**changes) -> tuple[ModelConfig, int]:
    """The demo's model config and image size."""
    config = load_config("tiny")
    return config.model.model_copy(update=changes), config.data.image_size


def write_random_artifact(uri: str, model_config: ModelConfig, image_size: int, seed: int = 0, weights_file: str | None = None) -> MGAModel:
    """An untrained model's artifact: random init, or a backbone from `weights_file` with random heads."""
    torch.manual_seed(seed)
    model = MGAModel(model_config, weights_file=weights_file).eval()
    write_artifact(uri, pack_artifact(model, {"image_size": image_size}))
    return model


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then t[0] is the elapsed seconds."""
    box: list[float] = []
    started = time.perf_counter()
    yield box
    box.append(time.perf_counter() - started)


def tree_pss(pid: int) -> int:
    """Proportional set size summed over a process and all its descendants (shared pages counted once)."""
    import psutil  # the bench extra

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
