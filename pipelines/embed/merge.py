"""`mga embed --incremental` as a merge (what to embed, which stored files to rewrite), and the
exactly-once check every embed makes of the files it wrote before committing them: both join
image ids a hash bucket at a time in Ray tasks (imported there; one bucket's worth in the
driver), so no node holds a catalog's ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schemas import arrow_tie_keys, same_values
from pipelines.storage import Location
from pipelines.tables import Snapshot

# Columns that decide whether a stored row is still valid for a catalog row.
CHANGE_KEY = ("sha256", "item_id", "split", "domain", "category")


@dataclass
class IncrementalPlan:
    """What a merge changes: the catalog rows to embed, and the stored files to rewrite without their stale rows."""

    embed_ids: pa.Array  # image_id of new and changed rows
    embed_files: list[str]  # the catalog files that hold them: the only files whose images are read
    rewrite: dict[str, list[str]]  # stored file -> image_ids to drop from it (changed or deleted)
    counts: dict[str, int]


def mergeable(features: Snapshot, model_id: str, token_dtype: str) -> bool:
    """A merge keeps the stored rows: only when they come from the same model with the same token dtype."""
    return features.info.get("model_id") == model_id and features.info.get("token_dtype") == token_dtype


# Rows (catalog and stored together) a task of the merge's join takes: its memory, ~0.8 GB a
# million rows of keys (measured: the join of 2M + 2M rows on one node peaked at 3.3 GB).
JOIN_ROWS = 1_000_000


def plan_incremental(features: Snapshot, catalog: Snapshot, model_id: str) -> IncrementalPlan:
    """Compare the catalog with the stored features by image_id, sha256 (and identity) and model_id.

    Only id and hash columns are read, and no node holds them all: a Ray task a file reads its
    keys and splits them by a hash of image_id into buckets of about JOIN_ROWS rows, a task a
    bucket joins its catalog and stored rows (`classify`), and the driver receives only the
    rows to embed or drop (the changes) and the counts (`_Buckets`: one bucket is joined in the
    driver). No image bytes, no Python object a row.
    """
    buckets = _Buckets(catalog.rows + features.rows)
    catalog_paths, stored_paths = catalog.files.column("path").to_pylist(), features.files.column("path").to_pylist()
    now = buckets.files(catalog.location, catalog_paths, ["image_id", *CHANGE_KEY])
    stored = buckets.files(features.location, stored_paths, ["image_id", *CHANGE_KEY, "model_id"])
    results = buckets.run(_join_bucket, [(model_id, len(now[bucket]), *now[bucket], *stored[bucket]) for bucket in range(buckets.count)])
    embed = pa.concat_tables([result[0] for result in results])
    stale = pa.concat_tables([result[1] for result in results])
    counts = {name: sum(result[2][name] for result in results) for name in ("new", "changed", "unchanged", "deleted")}
    by_file = stale.group_by("file").aggregate([("image_id", "list")])
    rewrite = {stored_paths[file]: sorted(ids) for file, ids in zip(by_file.column("file").to_pylist(), by_file.column("image_id_list").to_pylist())}
    files = [catalog_paths[file] for file in pc.unique(embed.column("file")).to_pylist()]
    return IncrementalPlan(embed.column("image_id").combine_chunks(), files, rewrite, counts)


class _Buckets:
    """Key rows split by a hash of image_id into buckets of about JOIN_ROWS, and a function run on
    each bucket's parts: a Ray task a file splits its rows and a task a bucket runs it, so no node
    holds all the keys; where they are one bucket, the driver does both (no worker to start: ~1 s
    of CPU a worker on a cold cluster, most of a small embed's check)."""

    def __init__(self, rows: int) -> None:
        self.count = max(1, -(-rows // JOIN_ROWS))
        self.local = self.count == 1

    def files(self, location: Location, paths: list[str], columns: list[str]) -> list[list]:
        """`columns` of the data files `paths` and each row's file number, as [bucket][file] parts
        (tables, or object refs of them)."""
        if not paths:  # a table whose every file a merge removed
            return self.held(pa.table({**{name: pa.array([], pa.string()) for name in columns}, "file": pa.array([], pa.int32())}))
        if self.local:
            return [[_split_keys(location, path, number, columns, 1) for number, path in enumerate(paths)]]
        import ray

        split = ray.remote(_split_keys).options(num_returns=self.count, num_cpus=0.5)
        return [list(bucket) for bucket in zip(*[split.remote(location, path, number, columns, self.count) for number, path in enumerate(paths)])]

    def held(self, rows: pa.Table) -> list[list]:
        """Rows the driver holds (the plan's ids, the rejects), as [bucket][one part]."""
        if self.local:
            return [[rows]]
        import ray

        return [[ray.put(part)] for part in _split(rows, self.count)]

    def run(self, function: Any, arguments: list[tuple]) -> list:
        """`function(*arguments[bucket])` for every bucket."""
        if self.local:
            return [function(*arguments[0])]
        import ray

        remote = ray.remote(function).options(num_cpus=0.5)
        return ray.get([remote.remote(*bucket) for bucket in arguments])


def _split_keys(location: Location, path: str, number: int, columns: list[str], buckets: int) -> tuple[pa.Table, ...] | pa.Table:
    """A Ray task (or the driver's call, for one bucket): `columns` of one data file and its number (`file`), split into `buckets` tables by a hash of image_id."""
    with pq.ParquetFile(path, filesystem=location.fs) as file:
        rows = file.read(columns=columns, use_threads=False)
    parts = _split(rows.append_column("file", pa.array(np.full(rows.num_rows, number, np.int32))), buckets)
    return parts if buckets > 1 else parts[0]


def _split(rows: pa.Table, buckets: int) -> tuple[pa.Table, ...]:
    """`rows` split into `buckets` tables by a hash of image_id (the tie keys', so every job buckets an id alike)."""
    if buckets == 1:  # the driver's one bucket: nothing to sort or copy
        return (rows,)
    bucket = arrow_tie_keys(rows.column("image_id").combine_chunks()) % buckets
    order = np.argsort(bucket, kind="stable")
    rows, ends = rows.take(pa.array(order)), np.searchsorted(bucket[order], np.arange(1, buckets + 1))
    return tuple(rows.slice(start, end - start) for start, end in zip([0, *ends[:-1]], ends))


def _join_bucket(model_id: str, catalog_parts: int, *parts: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """One bucket's catalog rows (the first `catalog_parts`) and stored rows, classified (a Ray task, or the driver's call)."""
    return classify(pa.concat_tables(parts[:catalog_parts]), pa.concat_tables(parts[catalog_parts:]), model_id)


def classify(now: pa.Table, stored: pa.Table, model_id: str) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """The catalog rows `now` (image_id, CHANGE_KEY, file) against the stored rows (the same and
    model_id): the catalog rows to embed (new or changed: image_id, file), the stored rows to
    drop (changed or deleted: image_id, file) and the counts. An Arrow hash join."""
    now = now.rename_columns([name if name == "image_id" else f"now_{name}" for name in now.column_names])
    now = now.append_column("in_catalog", pa.array(np.ones(now.num_rows, bool)))
    stored = stored.rename_columns([name if name == "image_id" else f"stored_{name}" for name in stored.column_names])
    joined = now.join(stored, "image_id", join_type="full outer")
    in_catalog = pc.fill_null(joined.column("in_catalog"), False)
    in_store = pc.is_valid(joined.column("stored_file"))
    same = pc.fill_null(pc.equal(joined.column("stored_model_id"), model_id), False)
    for name in CHANGE_KEY:  # an unlabelled photo's null item_id is unchanged while it stays null
        same = pc.and_(same, same_values(joined.column(f"now_{name}"), joined.column(f"stored_{name}")))
    unchanged = pc.and_(pc.and_(in_catalog, in_store), same)
    new = pc.and_(in_catalog, pc.invert(in_store))
    changed = pc.and_(pc.and_(in_catalog, in_store), pc.invert(same))
    deleted = pc.and_(in_store, pc.invert(in_catalog))
    embed = joined.filter(pc.or_(new, changed)).select(["image_id", "now_file"]).rename_columns(["image_id", "file"])
    stale = joined.filter(pc.and_(in_store, pc.invert(unchanged))).select(["image_id", "stored_file"]).rename_columns(["image_id", "file"])
    counts = {name: int(pc.sum(mask).as_py() or 0) for name, mask in (("new", new), ("changed", changed), ("unchanged", unchanged), ("deleted", deleted))}
    return embed, stale, counts


def check_exactly_once(table: Location, data_files: list[str], rejected: pa.Array, expected: pa.Array | Snapshot) -> int:
    """Every expected image (the ids of `expected`, or every row of the table it is) is in the
    written files or the rejects exactly once, nothing else is; returns the rows written.

    The ids are compared as the plan joins them (`_Buckets`): a Ray task a file splits its ids
    by a hash into buckets of about JOIN_ROWS, a task a bucket counts its problems
    (`exactly_once_problems`); the driver gets the counts. A full embed of 10^7 images holds no
    id on one node.
    """
    expected_rows = len(expected) if isinstance(expected, pa.Array) else expected.rows
    buckets = _Buckets(2 * expected_rows + len(rejected))

    def ids(values: pa.Array) -> pa.Table:
        return pa.table({"image_id": values.cast(pa.string())})

    written = buckets.files(table, data_files, ["image_id"])
    if isinstance(expected, pa.Array):
        wanted = buckets.held(ids(expected))
    else:
        wanted = buckets.files(expected.location, expected.files.column("path").to_pylist(), ["image_id"])
    set_aside = buckets.held(ids(rejected))
    results = buckets.run(_count_bucket, [(len(written[bucket]), len(wanted[bucket]), *written[bucket], *wanted[bucket], *set_aside[bucket])
                                          for bucket in range(buckets.count)])
    totals = {name: sum(result[name] for result in results) for name in results[0]}
    problems = []
    if totals["duplicates"]:
        problems.append(f"{totals['duplicates']} duplicate rows")
    if totals["both"]:
        problems.append(f"{totals['both']} images both written and rejected")
    if totals["missing"] or totals["unexpected"]:
        problems.append(f"{totals['missing']} images missing, {totals['unexpected']} unexpected")
    if problems:
        raise RuntimeError(f"embed: the files written into {table.uri} are inconsistent ({'; '.join(problems)}); nothing was committed")
    return totals["written"]


def _count_bucket(written_parts: int, expected_parts: int, *parts: pa.Table) -> dict[str, int]:
    """One bucket's written ids (the first `written_parts`), expected ids (the next `expected_parts`) and rejected ids, checked (a Ray task, or the driver's call)."""
    def ids(tables: tuple[pa.Table, ...]) -> pa.Array:
        return pa.chunked_array([chunk for table in tables for chunk in table.column("image_id").chunks], pa.string()).combine_chunks()

    return exactly_once_problems(ids(parts[:written_parts]), ids(parts[written_parts:written_parts + expected_parts]),
                                 ids(parts[written_parts + expected_parts:]))


def exactly_once_problems(written: pa.Array, expected: pa.Array, rejected: pa.Array) -> dict[str, int]:
    """The rows `written`, and how they and the `rejected` ids fail to hold each `expected` id exactly once."""
    distinct = len(pc.unique(written))
    accounted = pa.concat_arrays([written, rejected])
    return {
        "written": len(written),
        "duplicates": len(written) - distinct,
        "both": int(pc.sum(pc.is_in(written, value_set=rejected)).as_py() or 0),
        "missing": int(pc.sum(pc.invert(pc.is_in(expected, value_set=accounted))).as_py() or 0),
        "unexpected": int(pc.sum(pc.invert(pc.is_in(accounted, value_set=expected))).as_py() or 0),
    }
