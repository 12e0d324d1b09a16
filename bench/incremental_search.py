"""`mga search --incremental` against a full search after a night's churn: wall time, bytes read, equality.

Issue 27's targets: gallery 250k (paper token size, random vectors), 10^4 queries; 1% of the
gallery changes (0.5% new images of new items, 0.25% re-embedded, 0.25% deleted) and 1% new
queries; the incremental run reads <= 5% of the gallery's bytes and takes <= 10% of a full
search's wall time, and its rankings equal the full search's.

The tables are bench.search_scale's (D 512, 3 layers x M 8 x d 128, float16 tokens: 8 KB an
image), written as `mga embed` writes them (files of 50,000 rows, a row group per 64 rows), the
queries in a table of their own; the change is committed as `mga embed --incremental` commits
one (new and changed rows in a new file, every file that held a changed or deleted row
rewritten without it, a row group at a time, its lineage recorded). Each search is a fresh `python -m
pipelines.search` process with its own local Ray. The gallery bytes a run reads are measured
by the page cache: every file of the gallery table (all versions) is dropped from it before
the run (fsync + POSIX_FADV_DONTNEED) and its resident bytes counted after (`fincore`): an
upper bound, since the kernel's readahead around each read is counted too.

Usage: python -m bench.incremental_search [--gallery 250000] [--queries 10000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import search_scale
from bench.common import machine, write_random_artifact
from bench.search_scale import PAPER, unit_rows, write_features
from pipelines.schemas import vector_column
from pipelines.storage import resolve, write_parquet
from pipelines.rewrites import copy_without
from pipelines.tables import TableWriter, open_table, read_table
from pipelines.token_ranges import parquet_options

ROW_GROUP_ROWS = 64


def _files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))


def evict(directory: str) -> None:
    """Drop the Parquet files under `directory` from the page cache."""
    for path in _files(directory):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def cached(directory: str) -> int:
    """Bytes of the Parquet files under `directory` resident in the page cache."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *_files(directory)], capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in output.split())


def measure(command: list[str], gallery: str) -> dict[str, float]:
    """bench.search_scale's figures of `command`, and the bytes of `gallery`'s files it read."""
    evict(gallery)
    assert cached(gallery) == 0, "the page cache kept gallery pages"
    return {**search_scale.measure(command), "read": cached(gallery)}


def churn(uri: str, drop: np.ndarray, rows: pa.Table) -> None:
    """Commit a change as `mga embed --incremental` does: `rows` in a new file, the files that
    hold an id of `drop` rewritten without it (their lineage recorded)."""
    table = resolve(uri)
    with TableWriter(table) as writer:
        stored = read_table(writer.base, ["image_id", "__filename"])
        dropped = pa.array(drop, pa.string())
        remove = pc.unique(stored.filter(pc.is_in(stored.column("image_id"), value_set=dropped)).column("__filename")).to_pylist()
        copies = {}
        for number, path in enumerate(remove):
            schema = pq.read_schema(path, filesystem=table.fs)
            target = writer.file(f"rewritten-{number:03d}.parquet")
            copy_without(table, path, dropped.to_pylist(), target, schema, **parquet_options(schema))
            copies[target.path] = path
        write_parquet(writer.file("new.parquet"), rows, row_group_size=ROW_GROUP_ROWS, **parquet_options(rows.schema))
        writer.commit(rows.schema, writer.base.info, remove=remove, copies=copies)


def changed_rows(rows: pa.Table, rng: np.random.Generator) -> pa.Table:
    """`rows` with new features, a new sha256 and a later embedded_at (re-embedded images)."""
    count = rows.num_rows
    replace = {
        "global": pa.FixedSizeListArray.from_arrays(pa.array(unit_rows(rng, count, 1, PAPER.global_dim, np.float32).reshape(-1)), PAPER.global_dim),
        "sha256": pa.array(["1" * 64] * count),
        "embedded_at": pa.array(np.ones(count, "datetime64[us]"), pa.timestamp("us", tz="UTC")),
    }
    for layer in range(len(PAPER.layers)):
        replace[f"tokens_{layer}"] = vector_column(unit_rows(rng, count, PAPER.num_tokens, PAPER.token_dim, np.float16), rows.schema.field(f"tokens_{layer}").type)
    for name, column in replace.items():
        rows = rows.set_column(rows.schema.get_field_index(name), name, column)
    return rows


def renamed(rows: pa.Table, prefix: str, items: np.ndarray | None = None) -> pa.Table:
    rows = rows.set_column(0, "image_id", pa.array([f"{prefix}-{i:08d}" for i in range(rows.num_rows)]))
    if items is not None:
        rows = rows.set_column(1, "item_id", pa.array([f"{prefix}-item-{i:08d}" for i in items]))
    return rows


def same_rankings(first: str, second: str) -> str:
    """'yes', or what differs between the rankings (and positives) at two URIs."""
    def rows(uri: str, part: str | None) -> pa.Table:
        info = open_table(resolve(uri)).info
        table = open_table(resolve(info[part]["table"]), info[part]["version"]) if part else open_table(resolve(uri))
        keys = ["query_id", "rank"] if part is None else ["query_id", "gallery_id"]
        return read_table(table).sort_by([(key, "ascending") for key in keys])

    for part, exact, close in ((None, ("query_id", "rank", "gallery_id"), ("score_global", "score_token", "score")),
                               ("positives", ("query_id", "gallery_id", "rank_global", "rank_reranked"), ())):
        a, b = rows(first, part), rows(second, part)
        if a.num_rows != b.num_rows:
            return f"{part or 'rankings'}: {a.num_rows} vs {b.num_rows} rows"
        for name in exact:
            if not a.column(name).equals(b.column(name)):
                return f"{part or 'rankings'}.{name} differs"
        for name in close:
            x, y = (pc.fill_null(t.column(name), -9.0).to_numpy() for t in (a, b))
            if not np.allclose(x, y, atol=1e-5):
                return f"{part or 'rankings'}.{name} differs by up to {np.abs(x - y).max():.2e}"
    return "yes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=250_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-incremental-search-")
    model_uri, features, queries = f"{workdir}/model", f"{workdir}/gallery", f"{workdir}/queries"
    write_random_artifact(model_uri, PAPER, 224)
    from pipelines.model_store import read_artifact_files

    model_id = json.loads(read_artifact_files(model_uri)["artifact.json"])["model_id"]
    started = time.time()
    write_features(features, model_uri, model_id, args.gallery, queries=0, row_group_rows=ROW_GROUP_ROWS)
    write_features(queries, model_uri, model_id, args.gallery, queries=args.queries, with_gallery=False, row_group_rows=ROW_GROUP_ROWS)
    gallery_bytes = sum(open_table(resolve(features)).files.column("size_bytes").to_pylist())
    print(f"wrote the tables in {time.time() - started:.0f} s (gallery {gallery_bytes / 2**20:.0f} MiB)", flush=True)

    search = [sys.executable, "-m", "pipelines.search", "--features", features, "--queries", queries]
    full_before = measure([*search, "--out", f"{workdir}/rankings"], features)
    print(f"full search: {full_before['wall']:.0f} s", flush=True)

    rng = np.random.default_rng(1)
    gallery_ids = read_table(open_table(resolve(features)), ["image_id"]).column("image_id").to_numpy(zero_copy_only=False)
    picked = rng.choice(len(gallery_ids), args.gallery // 200, replace=False)  # 0.5%: half changed, half deleted
    changed_ids, deleted_ids = gallery_ids[picked[: len(picked) // 2]], gallery_ids[picked[len(picked) // 2:]]
    stored = read_table(open_table(resolve(features)), None, pc.field("image_id").isin(pa.array(changed_ids)))
    template = read_table(open_table(resolve(features)), None, pc.field("image_id").isin(pa.array(gallery_ids[:args.gallery // 200])))
    new_items = np.repeat(np.arange(args.gallery), rng.integers(2, 6, args.gallery))[: template.num_rows]
    added = renamed(changed_rows(template, rng), "new", new_items)
    churn(features, np.concatenate([changed_ids, deleted_ids]), pa.concat_tables([changed_rows(stored, rng), added]))
    query_template = read_table(open_table(resolve(queries))).slice(0, args.queries // 100)
    churn(queries, np.array([], str), renamed(changed_rows(query_template, rng), "newq"))
    print(f"changed the gallery (+{added.num_rows} new, {len(changed_ids)} changed, -{len(deleted_ids)}) and added {query_template.num_rows} queries", flush=True)

    incremental = measure([*search, "--out", f"{workdir}/rankings", "--incremental"], features)
    print(f"incremental: {incremental['wall']:.0f} s\n{incremental['summary']}", flush=True)
    nothing = measure([*search, "--out", f"{workdir}/rankings", "--incremental"], features)
    full_after = measure([*search, "--out", f"{workdir}/rankings-full"], features)
    equal = same_rankings(f"{workdir}/rankings", f"{workdir}/rankings-full")

    def row(name: str, figures: dict[str, float]) -> str:
        return f"| {name} | {figures['wall']:.1f} | {figures['pss'] / 2**30:.2f} GiB | {figures['read'] / 2**20:.1f} MiB | {figures['read'] / gallery_bytes:.2%} |"

    print(f"\nmachine: {machine()}")
    print(f"gallery {args.gallery:,} images ({gallery_bytes / 2**20:.0f} MiB), {args.queries:,} queries; incremental equals the full search: {equal}\n")
    print("| run | wall s | peak PSS, process tree | gallery bytes read | of the gallery's bytes |")
    print("|---|---|---|---|---|")
    for name, figures in (("full search, before", full_before), ("full search, after the change", full_after),
                          ("incremental", incremental), ("incremental, nothing changed", nothing)):
        print(row(name, figures))
    print(f"| **incremental / full** | **{incremental['wall'] / full_after['wall']:.3f}** | | | |")


if __name__ == "__main__":
    main()
