"""`mga nightly CONFIG`: prepare -> embed -> search --incremental, then evaluate: the scheduled refresh.

    mga nightly s3://bucket/mga/nightly.yaml        (or python -m pipelines.nightly ...)

The config (YAML, a local path or s3://) names each table once, and each step's own flags
(the flag names without the dashes, `true` for a flag that takes no value):

    model: s3://bucket/mga/models/shop        # the artifact `mga train` wrote
    catalog: s3://bucket/mga/catalog/shop     # prepare's --out, embed's --catalog
    features: s3://bucket/mga/features/shop   # embed's --out, search's --features
    rankings: s3://bucket/mga/rankings/shop   # search's --out, evaluate's --rankings
    report: s3://bucket/mga/reports/shop      # evaluate's --out
    history: s3://bucket/mga/history          # optional (default: <rankings>_history)
    prepare:                                  # optional: without it another job keeps the catalog
      source: manifest
      manifest: s3://bucket/feeds/catalog.csv
    embed: {token_dtype: float16}
    search: {queries: s3://bucket/mga/features/uploads, depth: 100}
    evaluate: {ks: [1, 10, 20]}

prepare, embed and search run with `--incremental`, so each does only what changed and
commits nothing when nothing did; evaluate runs when the metrics history holds no evaluation
of the rankings' current version, so a run after a quiet day writes nothing at all, and a
run after a failed evaluation evaluates. Every step is one atomic commit: the first failure
stops the chain with each table at the version of its last successful commit, and the next
run starts from there. The whole config is checked against the steps' own flags before
anything runs. Exit code 0: done; 1: a step failed (named in the one-line error); 2: a bad config.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from pydantic import Field, ValidationError

from mga.config import StrictModel
from mga.errors import MGAError
from pipelines import storage
from pipelines.command import module_main
from pipelines.config import ConfigError, format_validation_error
from pipelines.console import JobFailed, first_line, print_summary

StepOptions = dict[str, Any]


class NightlyConfig(StrictModel):
    model: str = Field(min_length=1, description="model artifact URI (embed's --model)")
    catalog: str = Field(min_length=1, description="catalog table URI (prepare's --out, embed's --catalog)")
    features: str = Field(min_length=1, description="features table URI (embed's --out, search's --features)")
    rankings: str = Field(min_length=1, description="rankings table URI (search's --out, evaluate's --rankings)")
    report: str = Field(min_length=1, description="report directory (evaluate's --out)")
    history: str = Field("", description="metrics history table URI (default: <rankings>_history)")
    prepare: StepOptions | None = Field(None, description="prepare's source and flags; omitted: no prepare step")
    embed: StepOptions = Field(default_factory=dict)
    search: StepOptions = Field(default_factory=dict)
    evaluate: StepOptions = Field(default_factory=dict)


class _SectionParser(argparse.ArgumentParser):
    """A step's own parser whose errors name the config section instead of exiting."""

    section = ""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.section}: {message}")


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # the job module whose build_parser/run_args the step uses
    table: str  # the config key of the table it writes
    args: argparse.Namespace


def _flags(section: str, options: StepOptions, reserved: dict[str, str]) -> list[str]:
    """A config section as command-line flags; the chain's own flags are refused."""
    argv: list[str] = []
    for key, value in options.items():
        flag = str(key).replace("_", "-")
        if flag in reserved:
            raise ConfigError(f"{section}.{key}: set by the chain (from `{reserved[flag]}`); remove it")
        if value is True:
            argv.append(f"--{flag}")
        elif value is False or value is None:
            continue  # an unset flag
        else:
            argv += [f"--{flag}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def _parse(section: str, module: str, argv: list[str]) -> argparse.Namespace:
    # A class per section: argparse builds a step's subcommand parsers (prepare's sources) of its parser's class.
    parser = type("SectionParser", (_SectionParser,), {"section": section})(prog=f"mga nightly ({section})")
    importlib.import_module(module).build_parser(parser)
    return parser.parse_args(argv)


def plan_steps(config: NightlyConfig) -> list[Step]:
    """The chain's steps with their parsed flags; a bad section is a ConfigError naming it."""
    steps = []
    if config.prepare is not None:
        options = dict(config.prepare)
        source = options.pop("source", None)
        if not source:
            raise ConfigError("prepare.source: missing (manifest, inshop or consumer2shop)")
        argv = [str(source), "--out", config.catalog, "--incremental", *_flags("prepare", options, {"out": "catalog", "incremental": "always"})]
        steps.append(Step("prepare", "pipelines.prepare", "catalog", _parse("prepare", "pipelines.prepare", argv)))
    reserved = {"model": "model", "catalog": "catalog", "out": "features", "incremental": "always"}
    argv = ["--model", config.model, "--catalog", config.catalog, "--out", config.features, "--incremental", *_flags("embed", config.embed, reserved)]
    steps.append(Step("embed", "pipelines.embed", "features", _parse("embed", "pipelines.embed", argv)))
    reserved = {"features": "features", "out": "rankings", "incremental": "always"}
    argv = ["--features", config.features, "--out", config.rankings, "--incremental", *_flags("search", config.search, reserved)]
    steps.append(Step("search", "pipelines.search", "rankings", _parse("search", "pipelines.search", argv)))
    reserved = {"rankings": "rankings", "out": "report", "history": "history", "no-history": "history", "version": "the rankings' current version"}
    argv = ["--rankings", config.rankings, "--out", config.report, *_flags("evaluate", config.evaluate, reserved)]
    if config.history:
        argv += ["--history", config.history]
    steps.append(Step("evaluate", "pipelines.evaluate", "history", _parse("evaluate", "pipelines.evaluate", argv)))
    return steps


def load_nightly_config(uri: str) -> NightlyConfig:
    """The config at `uri`, validated; every error names the file and the key."""
    location = storage.resolve(uri)
    try:
        tree = yaml.safe_load(location.read_bytes())
    except yaml.YAMLError as error:
        raise ConfigError(f"{location.uri}: not valid YAML ({first_line(error)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{location.uri}: expected a mapping of settings, got {type(tree).__name__}")
    try:
        return NightlyConfig(**tree)
    except ValidationError as error:
        raise ConfigError(f"{location.uri}: {format_validation_error(error)}") from None


def _version(uri: str) -> int | None:
    """The current version of the table at `uri`, None when there is none yet."""
    from pipelines.tables import open_table, table_exists

    location = storage.resolve(uri)
    return open_table(location).version if table_exists(location) else None


def run(config_uri: str) -> dict[str, Any]:
    """Run the chain the config at `config_uri` describes; returns each step's outcome."""
    from pipelines.history import evaluated, history_location

    started = time.time()
    config = load_nightly_config(config_uri)
    try:
        steps = plan_steps(config)
    except ConfigError as error:
        raise ConfigError(f"{storage.resolve(config_uri).uri}: {error}") from None
    rankings = storage.resolve(config.rankings)
    history = history_location(rankings, config.history)
    tables = {"catalog": config.catalog, "features": config.features, "rankings": config.rankings, "history": history.uri}
    outcomes: dict[str, str] = {}
    results: dict[str, Any] = {}

    def attempt(step: Step, action: Callable[[], Any]) -> Any:
        print(f"\n>>> mga nightly: {step.name}", flush=True)
        before = _version(tables[step.table])
        try:
            result = action()
        except (MGAError, ValidationError) as error:
            outcomes[step.name] = f"FAILED: {first_line(error)}"
            _print(outcomes, started)
            raise JobFailed(f"nightly stopped at {step.name}: {first_line(error)} (every table is at its last committed version)") from error
        except BaseException:
            outcomes[step.name] = "FAILED (see the traceback)"
            _print(outcomes, started)
            raise
        after = _version(tables[step.table])
        outcomes[step.name] = f"{tables[step.table]}: " + (f"version {before} -> {after}" if after != before else f"unchanged at version {after}")
        return result

    for step in steps:
        module = importlib.import_module(step.module)
        if step.name == "evaluate":
            current = _version(config.rankings)
            depth = step.args.depth
            if current is not None and evaluated(history, rankings.uri, current, depth):
                outcomes["evaluate"] = f"skipped: {history.uri} already holds version {current} of the rankings"
                continue
        results[step.name] = attempt(step, lambda module=module, step=step: module.run_args(step.args))
    if "evaluate" in results:
        metrics = results["evaluate"]
        outcomes["metrics"] = ", ".join(f"{ordering} R@1 {metrics[ordering]['R@1']:.4f} mAP {metrics[ordering]['mAP']:.4f}" for ordering in ("global", "reranked") if "R@1" in metrics[ordering])
    _print(outcomes, started)
    return {"outcomes": outcomes, "results": results}


def _print(outcomes: dict[str, str], started: float) -> None:
    print_summary("mga nightly", {**outcomes, "wall time": f"{time.time() - started:.1f} s"})


def build_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of `mga nightly` and `python -m pipelines.nightly`."""
    parser.add_argument("config", help="the chain's YAML config (local path or s3://): tables, model and each step's flags")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.config)


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
