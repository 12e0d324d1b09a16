"""The `mga` command: thin subcommands over the pipelines.

Only the chosen subcommand's module is imported, and `mga --help` reads each job's one-line
help from its module's docstring without importing it: the jobs load torch, timm, faiss and
Ray, which takes seconds, and a help text or a usage error should not wait for them.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from pipelines.command import CommandParser, add_s3_flags, apply_s3_flags, run_command, summary

COMMANDS = ("synth", "prepare", "train", "embed", "search", "query", "evaluate", "nightly", "vacuum", "demo")


def _docstring(module: str) -> str | None:
    """A module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `mga` parser; the flags of `command` (imported for that) when one is chosen."""
    parser = CommandParser(prog="mga", description="MGA fashion image retrieval on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        text = summary(_docstring(f"pipelines.{name}"))
        sub = commands.add_parser(name, help=text, description=text)
        if name == command:
            module = importlib.import_module(f"pipelines.{name}")
            module.build_parser(sub)
            add_s3_flags(sub)
            sub.set_defaults(module=module, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `mga` itself has no options but --help, so the first word that is not one names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args, unknown = build_parser(command if command in COMMANDS else None).parse_known_args(argv)
    if unknown:  # named by the subcommand's parser, which knows the flags it lacks
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    apply_s3_flags(args)
    run_command(lambda: args.module.run_args(args))


if __name__ == "__main__":
    main()
