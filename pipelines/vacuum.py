"""`mga vacuum`: delete the files of table versions older than a horizon, and killed jobs' leftovers.

    mga vacuum URI [URI ...] --retain-hours 168

Every version younger than `--retain-hours` stays readable (Delta time travel, and readers
still on it), the current one always; files that no such version reads are deleted, and so
are files no version ever listed (a killed job's run directory) once older than the horizon.
A table's companions (`<uri>_rejects`, `<uri>_positives`, `<uri>_shortlists`) are vacuumed
with it. `mga search --incremental` compares the features table's current version with the
one its rankings were made from: vacuum features tables with a horizon longer than the time
between searches, or the next one is a full search (it says so).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.storage import resolve
from pipelines.tables import companion, open_table, table_exists, vacuum

DEFAULT_RETAIN_HOURS = 168.0  # Delta's own default horizon: a week of time travel
COMPANIONS = ("rejects", "positives", "shortlists")


def run(tables: list[str], retain_hours: float = DEFAULT_RETAIN_HOURS) -> dict[str, Any]:
    started = time.time()
    results: dict[str, Any] = {}
    for uri in tables:
        location = resolve(uri)
        current = open_table(location)  # refuses a URI that holds no Delta table
        results[location.uri] = {"version": current.version, "deleted": len(vacuum(location, retain_hours))}
        for name in COMPANIONS:
            part = companion(location, name)
            if table_exists(part):
                results[part.uri] = {"version": open_table(part).version, "deleted": len(vacuum(part, retain_hours))}
    rows = {uri: f"current version {result['version']}, {result['deleted']} files deleted" for uri, result in results.items()}
    rows["horizon"] = f"{retain_hours:g} hours"
    rows["wall time"] = f"{time.time() - started:.1f} s"
    print_summary("mga vacuum", rows)
    return results


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tables", nargs="+", metavar="URI", help="Delta tables to vacuum (local paths or s3://)")
    parser.add_argument("--retain-hours", type=float, default=DEFAULT_RETAIN_HOURS, help=f"keep every version younger than this (default {DEFAULT_RETAIN_HOURS:g})")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.tables, args.retain_hours)


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
