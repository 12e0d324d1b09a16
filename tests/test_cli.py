"""The command line as a user meets it: help and usage errors without loading torch or Ray,
the one-line error handler, MGA_DEBUG, Ctrl-C. Each case is a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "timm", "faiss", "ray"}


def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """(the process, the modules it imported, its stderr lines other than -X importtime's)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    timing = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in timing}
    return done, imported, [line for line in done.stderr.splitlines() if not line.startswith("import time:") and line.strip()]


@pytest.mark.timeout(120)
def test_help_and_usage_errors_load_neither_torch_nor_ray():
    done, imported, _ = _run("-m", "pipelines.cli", "--help")
    assert done.returncode == 0 and "pipelines.command" in imported  # -X importtime saw the imports
    assert {name.split(".")[0] for name in imported}.isdisjoint(HEAVY), sorted(HEAVY & {name.split(".")[0] for name in imported})
    for command in ("synth", "prepare", "train", "embed", "search", "evaluate", "vacuum", "demo"):
        assert f"    {command} " in done.stdout, done.stdout
    assert "pipelines.config" not in imported  # the jobs are listed from their docstrings, not imported

    for argv in (["-m", "pipelines.cli", "train", "--bogus"], ["-m", "pipelines.train", "--bogus"]):
        done, imported, errors = _run(*argv)
        # (importlib.import_module escapes -X importtime: train's own imports show that it loaded.)
        assert done.returncode == 2 and "pipelines.config" in imported
        assert {name.split(".")[0] for name in imported}.isdisjoint(HEAVY), argv
        assert len(errors) == 1 and "error: unrecognized arguments: --bogus" in errors[0] and "--help" in errors[0], errors
