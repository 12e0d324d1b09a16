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
COMMANDS = ("synth", "prepare", "train", "embed", "search", "query", "evaluate", "vacuum", "demo")


def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """(the process, the modules it imported, its stderr lines other than -X importtime's)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    timing = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in timing}
    return done, imported, [line for line in done.stderr.splitlines() if not line.startswith("import time:") and line.strip()]


@pytest.mark.timeout(120)
def test_help_lists_every_job_without_importing_them():
    done, imported, _ = _run("-m", "pipelines.cli", "--help")
    assert done.returncode == 0 and "pipelines.command" in imported  # -X importtime saw the imports
    assert {name.split(".")[0] for name in imported}.isdisjoint(HEAVY), sorted(HEAVY & {name.split(".")[0] for name in imported})
    for command in COMMANDS:
        assert f"    {command} " in done.stdout, done.stdout
    assert "pipelines.config" not in imported  # the jobs are listed from their docstrings, not imported


# Every job's parser, as `mga <job>` and as `python -m pipelines.<job>` build it, in one process;
# after each, the heavy modules loaded so far (none, or a job imports them at parse time).
PARSE_EVERY_JOB = f"""
import importlib, sys
from pipelines import cli
for command in {COMMANDS!r}:
    for entry, argv in ((cli.main, [command, "--help"]), (cli.main, [command, "--bogus"]),
                        (importlib.import_module("pipelines." + command).main, ["--bogus"])):
        try:
            entry(argv)
        except SystemExit as exit:
            print("|", command, argv[-1], exit.code, *sorted({{name.split(".")[0] for name in sys.modules}}.intersection({sorted(HEAVY)!r})))
"""


@pytest.mark.timeout(120)
def test_every_job_parses_its_flags_without_torch_or_ray():
    done = subprocess.run([sys.executable, "-c", PARSE_EVERY_JOB], capture_output=True, text=True, timeout=120, cwd=REPO)
    outcomes = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("| ")]
    expected = [[command, flag, "0" if flag == "--help" else "2"] for command in COMMANDS for flag in ("--help", "--bogus", "--bogus")]
    assert outcomes == expected, (outcomes, done.stderr)  # a heavy module would be listed after the exit code
    errors = done.stderr.splitlines()  # a usage error is one line naming the problem and --help
    assert len(errors) == 2 * len(COMMANDS) and all(": error: " in line and "--help)" in line for line in errors), errors
    assert sum(line.startswith("python -m pipelines.") for line in errors) == len(COMMANDS), errors


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
    # SIGINT as a terminal gives it: a pytest started in the background (`pytest &`, nohup) has
    # SIGINT ignored, children inherit that, and Python then installs no handler for it.
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(fifo)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        time.sleep(1)
    finally:
        # Closing the write end ends the command's read() whatever happened to the signal: a
        # command that missed it then fails the assertion below instead of hanging the test.
        os.close(writer)
    _, stderr = process.communicate(timeout=150)
    assert process.returncode == 130 and stderr.strip() == "mga: interrupted", stderr
