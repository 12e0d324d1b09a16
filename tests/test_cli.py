"""The command line as a user meets it: help and usage errors without loading torch or Ray,
the one-line error handler, MGA_DEBUG, Ctrl-C. Each case is a process of its own."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
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


def _mga(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **env})


@pytest.mark.timeout(120)
def test_project_errors_are_one_line_and_mga_debug_shows_their_traceback(tmp_path):
    config = _mga("train", "--config", str(tmp_path / "nowhere.yaml"))  # ConfigError
    table = _mga("vacuum", str(tmp_path / "no-table"))  # TableNotFound, a StorageError
    for done, named in ((config, "nowhere.yaml"), (table, "no-table")):
        assert done.returncode == 2 and done.stderr.startswith("mga: error: ") and named in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    debug = _mga("train", "--config", str(tmp_path / "nowhere.yaml"), MGA_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr and "mga: error" not in debug.stderr


@pytest.mark.timeout(60)
def test_other_exceptions_keep_their_traceback():
    # The handler itself, around a real bug (a KeyError): not the project's kind of error.
    done = subprocess.run(
        [sys.executable, "-c", "from pipelines.command import run_command; run_command(lambda: {}['missing'])"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr and "mga:" not in done.stderr


@pytest.mark.timeout(240)
def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # reading the config blocks until the test writes: the command waits there
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(fifo)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 50
    while True:  # opening the write end fails (ENXIO) until the command has the FIFO open for reading
        assert process.poll() is None and time.time() < deadline, process.communicate()
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            assert error.errno == errno.ENXIO
            time.sleep(0.05)
    try:
        process.send_signal(signal.SIGINT)
        # Generous: a fresh-clone CI run on a loaded 2-core machine once took over 30 s to exit.
        _, stderr = process.communicate(timeout=150)
    finally:
        os.close(writer)
    assert process.returncode == 130 and stderr.strip() == "mga: interrupted", stderr
