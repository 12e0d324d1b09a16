"""The `mga` command: thin subcommands over the pipelines."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from pydantic import ValidationError


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command; expected failures become one line on stderr and exit code 2."""
    from mga.artifact import ArtifactError
    from mga.transforms import ImageDecodeError
    from pipelines.config import ConfigError, format_validation_error
    from pipelines.console import JobFailed
    from pipelines.storage import StorageError

    try:
        return action()
    except JobFailed as error:
        print(f"mga: failed: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except ValidationError as error:
        message = format_validation_error(error)
    except (ConfigError, StorageError, ArtifactError, ImageDecodeError, FileNotFoundError, ValueError) as error:
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted"
    print(f"mga: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _add_s3_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", help="S3 region (default: $AWS_REGION)")


def _apply_s3_flags(args: argparse.Namespace) -> None:
    # Flags become the standard variables, which init_ray forwards to every worker.
    if getattr(args, "s3_endpoint", None):
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    if getattr(args, "s3_region", None):
        os.environ["AWS_REGION"] = args.s3_region


def build_parser() -> argparse.ArgumentParser:
    from pipelines import demo, embed, evaluate, prepare, search, synth, train, vacuum

    parser = argparse.ArgumentParser(prog="mga", description="MGA fashion image retrieval on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("synth", synth), ("prepare", prepare), ("train", train), ("embed", embed), ("search", search), ("evaluate", evaluate), ("vacuum", vacuum), ("demo", demo)):
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.build_parser(sub)
        _add_s3_flags(sub)
        sub.set_defaults(module=module)
    return parser


def module_main(module_name: str, argv: list[str] | None = None) -> None:
    """`python -m pipelines.<name>`: the same flags as `mga <name>`."""
    module = sys.modules[module_name]
    name = module.__spec__.name if module.__spec__ else module_name  # "__main__" under `python -m`
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=(module.__doc__ or "").strip().splitlines()[0])
    module.build_parser(parser)
    _add_s3_flags(parser)
    args = parser.parse_args(argv)
    _apply_s3_flags(args)
    run_command(lambda: module.run_args(args))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _apply_s3_flags(args)
    run_command(lambda: args.module.run_args(args))


if __name__ == "__main__":
    main()
