"""What changed in a large features table after churn scattered over it (`search.changes.row_changes`,
the first step of `mga search --incremental`): with the lineage of the rewritten files that
`mga embed --incremental` commits, against without it (a rewrite by another engine, or before
lineage was recorded). Wall time and peak memory of the process that finds the changes.

The tables hold the identity columns only (all row_changes reads): N rows in files of 50,000
rows, a row group per 64 rows, ids in order, as `mga embed` writes them. The change re-embeds
0.25% and deletes 0.25% of the rows, picked at random (so every file holds some and is
rewritten), and adds 0.5% new rows; the same change is committed to two copies of the table,
with and without lineage. Each row_changes runs in a fresh process (its peak RSS, getrusage,
less its RSS before the call).

Usage: python -m bench.row_changes [--rows 2000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import machine
from pipelines.filters import parse_filter
from pipelines.rewrites import copy_without
from pipelines.search.changes import KEY_COLUMNS
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table

FILE_ROWS, GROUP_ROWS = 50_000, 64


def identity_rows(ids: np.ndarray, sha: str, embedded_at: int) -> pa.Table:
    count = len(ids)
    return pa.table({
        "image_id": pa.array([f"img-{i:09d}" for i in ids]), "item_id": pa.array([f"item-{i // 4:08d}" for i in ids]),
        "split": pa.array(["gallery"] * count), "domain": pa.array(["shop"] * count), "category": pa.array(["top"] * count),
        "sha256": pa.array([sha] * count), "embedded_at": pa.array(np.full(count, embedded_at, "datetime64[us]"), pa.timestamp("us", tz="UTC")),
    }).select(list(KEY_COLUMNS))


def write_table(uri: str, rows: int) -> None:
    with TableWriter(resolve(uri)) as writer:
        for start in range(0, rows, FILE_ROWS):
            write_parquet(writer.file(f"part-{start // FILE_ROWS:05d}.parquet"), identity_rows(np.arange(start, min(rows, start + FILE_ROWS)), "0" * 64, 0), row_group_size=GROUP_ROWS)
        writer.commit(identity_rows(np.arange(0), "", 0).schema, {"table": "features"})


def churn(uri: str, drop: np.ndarray, new: pa.Table, lineage: bool) -> None:
    """One commit as `mga embed --incremental` makes it: every file rewritten without `drop`, `new` in a file of its own."""
    location = resolve(uri)
    drop_ids = [f"img-{i:09d}" for i in drop]
    with TableWriter(location) as writer:
        remove, copies = writer.base.files.column("path").to_pylist(), {}
        for number, path in enumerate(remove):
            target = writer.file(f"rewritten/part-{number:05d}.parquet")
            copy_without(location, path, drop_ids, target, pq.read_schema(path, filesystem=location.fs))
            copies[target.path] = path
        write_parquet(writer.file("new.parquet"), new, row_group_size=GROUP_ROWS)
        writer.commit(new.schema, writer.base.info, remove=remove, copies=copies if lineage else None)


def measure(uri: str) -> None:
    """In a process of its own: row_changes from version 0 to the current one, as JSON."""
    from pipelines.search.changes import row_changes

    location = resolve(uri)
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * resource.getpagesize()  # resident after the imports
    started = time.perf_counter()
    changes = row_changes(location, 0, open_table(location), parse_filter("split = 'gallery'"))
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rise": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
                      "removed": changes.removed.num_rows, "added": changes.added.num_rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-row-changes-")
    rng = np.random.default_rng(0)
    picked = rng.choice(args.rows, args.rows // 200, replace=False)
    changed, deleted = picked[: len(picked) // 2], picked[len(picked) // 2:]
    new = pa.concat_tables([identity_rows(np.sort(changed), "1" * 64, 1), identity_rows(np.arange(args.rows, args.rows + args.rows // 200), "1" * 64, 1)])
    for name, lineage in (("lineage", True), ("no-lineage", False)):
        write_table(f"{workdir}/{name}", args.rows)
        churn(f"{workdir}/{name}", picked, new, lineage)
    print(f"machine: {machine()}\n{args.rows:,} rows in {-(-args.rows // FILE_ROWS)} files; {len(changed):,} re-embedded, {len(deleted):,} deleted, "
          f"{args.rows // 200:,} new\n\n| lineage | row_changes s | peak RSS rise | removed | added |\n|---|---|---|---|---|")
    for attempt in range(2):  # alternating, twice
        for name in ("lineage", "no-lineage"):
            output = subprocess.run([sys.executable, "-m", "bench.row_changes", "--measure", f"{workdir}/{name}"], capture_output=True, text=True, check=True)
            result = json.loads(output.stdout.strip().splitlines()[-1])
            print(f"| {name} | {result['seconds']:.2f} | {result['peak_rise'] / 2**20:.0f} MiB | {result['removed']:,} | {result['added']:,} |", flush=True)


if __name__ == "__main__":
    main()
