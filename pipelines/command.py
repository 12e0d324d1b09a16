"""Running one job from the command line: its parser, the S3 flags, and the one-line error handler.

Shared by the `mga` CLI (pipelines.cli) and by `python -m pipelines.<name>`, which must run
without the CLI: the jobs import this module, the CLI imports the jobs, never the reverse.
Kept free of torch and Ray, so that parsing (and a usage error) is quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NoReturn

from pydantic import ValidationError

from mga.errors import MGAError


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage error is one line, pointing at --help instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command the way a user wants its failures told.

    The project's own errors (mga.errors.MGAError: bad input, a storage failure, a failed
    job) and invalid settings become one line on stderr: exit code 1 for a job that ran and
    failed, 2 for anything the user can correct. Ctrl-C is one line and exit code 130.
    Anything else is a bug and keeps its traceback. MGA_DEBUG=1 shows tracebacks for all.
    """
    from pipelines.config import format_validation_error
    from pipelines.console import JobFailed

    if os.environ.get("MGA_DEBUG", "").strip() not in ("", "0"):
        return action()
    try:
        return action()
    except KeyboardInterrupt:
        print("mga: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except JobFailed as error:
        print(f"mga: failed: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (MGAError, ValidationError) as error:
        message = format_validation_error(error) if isinstance(error, ValidationError) else str(error)
        print(f"mga: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def add_s3_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", help="S3 region (default: $AWS_REGION)")


def apply_s3_flags(args: argparse.Namespace) -> None:
    # Flags become the standard variables, which init_ray forwards to every worker.
    if getattr(args, "s3_endpoint", None):
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    if getattr(args, "s3_region", None):
        os.environ["AWS_REGION"] = args.s3_region


def summary(doc: str | None) -> str:
    """The first line of a job module's docstring: its one-line help."""
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def module_main(module_name: str, argv: list[str] | None = None) -> None:
    """`python -m pipelines.<name>`: the same flags as `mga <name>`."""
    module = sys.modules[module_name]
    name = module.__spec__.name if module.__spec__ else module_name  # "__main__" under `python -m`
    parser = CommandParser(prog=f"python -m {name}", description=summary(module.__doc__))
    module.build_parser(parser)
    add_s3_flags(parser)
    args = parser.parse_args(argv)
    apply_s3_flags(args)
    run_command(lambda: module.run_args(args))
