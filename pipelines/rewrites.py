"""Copy-on-write: a table's data file copied without some of its rows, and the lineage a commit
records of such copies (which new file is a copy of which retired one, less some rows).

delta-rs cannot write deletion vectors, and the readers we promise (deltalake, Polars) refuse
them, so a merge that deletes or replaces rows rewrites every file that held one. With 1% of a
catalog changing at random that is nearly every file, each a copy of its old self less a few
rows. `mga embed --incremental` records its copies in its commit (`TableWriter.commit(copies=)`),
so that a reader of two versions (search.changes) compares each copy with its source by id, a
file at a time, rather than the identity of every row of the table on one node.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import Location
from pipelines.tables import COPIES_KEY, Snapshot, commit_history


def copy_without(table: Location, source: str, drop_ids: list[str], target: Location, schema: pa.Schema, **parquet_options: Any) -> tuple[int, int]:
    """Copy the data file `source` of `table` into `target` without the rows whose image_id is
    in `drop_ids`, a row group at a time (row groups keep their rows, so readers prune as
    before); returns (rows kept, rows dropped)."""
    dropped = pa.array(sorted(drop_ids), pa.string())
    kept = removed = 0
    source_file = pq.ParquetFile(source, filesystem=table.fs)
    with pq.ParquetWriter(target.path, schema, filesystem=target.fs, **parquet_options) as writer:
        for group in range(source_file.num_row_groups):
            rows = source_file.read_row_group(group)
            rows = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), value_set=dropped)))
            removed += source_file.metadata.row_group(group).num_rows - rows.num_rows
            if rows.num_rows:
                writer.write_table(rows.select(schema.names).cast(schema), row_group_size=rows.num_rows)
                kept += rows.num_rows
    return kept, removed


def copy_sources(old: Snapshot, new: Snapshot) -> dict[str, str]:
    """For each data file of `new` (a later version of `old`'s table) that `old` does not list,
    the file of `old`, retired since, that it is a copy of less some rows, following copies of
    copies through the commits between the two versions. Files with no such ancestor (new
    rows, a rewrite by another engine, commits whose log is gone) are left out."""
    location = old.location
    parent: dict[str, str] = {}
    for entry in commit_history(location, old.version, new.version):
        for copy, source in (entry.get(COPIES_KEY) or {}).items():
            parent[posixpath.join(location.path, copy)] = posixpath.join(location.path, source)
    old_paths, new_paths = set(old.files.column("path").to_pylist()), set(new.files.column("path").to_pylist())
    retired = old_paths - new_paths
    sources: dict[str, str] = {}
    for path in new_paths - old_paths:
        ancestor, seen = parent.get(path), {path}
        while ancestor is not None and ancestor not in old_paths and ancestor not in seen:
            seen.add(ancestor)
            ancestor = parent.get(ancestor)
        if ancestor in retired:
            sources[path] = ancestor
    return sources
