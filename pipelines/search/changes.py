"""What changed in a selection of a features table between two of its versions, from the Delta
log and the rows' identity alone.

`mga embed --incremental` writes new and changed images to new files and rewrites the files
that held a changed or deleted row without it; a full embed replaces every file. Either way a
row that is unchanged between two versions is either in a file both versions list, or in a
removed file and again, with the same identity, in an added one. So only the files one
version lists and the other does not are read, and only their identity columns: a row is the
same when its `image_id`, item, split, domain, category, `sha256` and `embedded_at` are (the
last makes a re-embedding of the same image a change: its features may differ).

A rewritten file whose commit names the file it copies (pipelines.rewrites) holds that file's
rows unchanged, less the dropped ones: its ids are compared with its source's, a pair of files
at a time, and only the dropped rows' identity is read. With churn scattered over the whole
table every file is rewritten, and the rows held at once stay those of a few files and of the
changes, not the identity of every row of the table.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mga.errors import InputError
from pipelines.filters import RowFilter
from pipelines.memory import release_freed_memory
from pipelines.schemas import IDENTITY_COLUMNS, same_values
from pipelines.rewrites import copy_sources
from pipelines.storage import Location, StorageError, credentials_hint
from pipelines.tables import Snapshot, TableNotFound, open_table, read_files

KEY_COLUMNS = (*IDENTITY_COLUMNS, "embedded_at")


class VersionGone(StorageError):
    """An old version (its log entry or its files) is no longer there to compare with."""


@dataclass(frozen=True)
class RowChanges:
    """The selected rows of the old version that the new one no longer has as they were
    (`removed`: deleted, changed, or no longer selected) and the selected rows of the new one
    that the old did not have (`added`), each `image_id, item_id`; `old` and `new` are the two
    versions restricted to the files where those rows are stored (only one version lists them;
    the new one's copy nothing)."""

    removed: pa.Table
    added: pa.Table
    old: Snapshot
    new: Snapshot

    def __bool__(self) -> bool:
        return bool(self.removed.num_rows or self.added.num_rows)


def _empty() -> pa.Table:
    return pa.table({name: pa.array([], pa.timestamp("us", tz="UTC") if name == "embedded_at" else pa.string()) for name in KEY_COLUMNS})


def _identity(snapshot: Snapshot, where: RowFilter) -> pa.Table:
    """The KEY_COLUMNS of the selected rows (none for no files)."""
    if not snapshot.files.num_rows:
        return _empty()
    return read_files(snapshot, list(KEY_COLUMNS)).filter(where.expression).combine_chunks()  # filters name identity columns only


def _unique(rows: pa.Table, snapshot: Snapshot) -> pa.Table:
    """`rows`, unless an image id is in two of them."""
    if pc.count_distinct(rows.column("image_id")).as_py() != rows.num_rows:
        raise InputError(f"{snapshot.uri} version {snapshot.version}: an image_id is in more than one row of its changed files (image_id must be unique)")
    return rows


def _unchanged(rows: pa.Table, other: pa.Table) -> pa.Array:
    """Whether each of `rows` has a row in `other` with the same KEY_COLUMNS (null equal to
    null: an unlabelled photo's null item is part of its identity). Ids are unique in both, so
    the rows are compared with the row of the same id, a column at a time."""
    if not rows.num_rows or not other.num_rows:
        return pa.array(np.zeros(rows.num_rows, bool))
    match = pc.index_in(rows.column("image_id"), value_set=other.column("image_id").combine_chunks())
    aligned = other.take(pc.fill_null(match, 0))
    same = pc.is_valid(match)
    for name in KEY_COLUMNS[1:]:
        same = pc.and_(same, same_values(rows.column(name), aligned.column(name)))
    return same


def row_changes(location: Location, old_version: int, new: Snapshot, where: RowFilter) -> RowChanges:
    """The changes of the rows passing `where` from `old_version` of the table at `location` to
    `new` (a later version of it). Raises VersionGone when the old version cannot be read."""
    try:
        old = open_table(location, old_version)
    except TableNotFound:
        raise
    except StorageError as error:
        raise VersionGone(f"{location.uri} version {old_version} cannot be read any more ({error})") from error
    if old.version != old_version:
        raise InputError(f"{location.uri} has no version {old_version}")
    old_paths = set(old.files.column("path").to_pylist())
    new_paths = set(new.files.column("path").to_pylist())
    old, new = old.only(old_paths - new_paths), new.only(new_paths - old_paths)
    copies = copy_sources(old, new)
    copied: dict[str, list[str]] = {}
    for copy, source in copies.items():
        copied.setdefault(source, []).append(copy)
    # The new rows are only in the files that copy nothing.
    new = new.only(set(new.files.column("path").to_pylist()) - set(copies))
    try:
        new_rows = _unique(_identity(new, where), new)
        dropped = _dropped_rows(old, copied, new_rows.column("image_id").combine_chunks())
        old_rows = pa.concat_tables([_identity(old.only(set(old.files.column("path").to_pylist()) - set(copied)), where),
                                     dropped.filter(where.expression)], promote_options="permissive").combine_chunks()
    except StorageError as error:  # a vacuumed file of the old version
        raise VersionGone(f"the files of {location.uri} version {old_version} cannot be read any more ({error})") from error
    _unique(old_rows, old)  # the same id in an unpaired file and dropped from a copied one
    removed = old_rows.filter(pc.invert(_unchanged(old_rows, new_rows))).select(["image_id", "item_id"])
    added = new_rows.filter(pc.invert(_unchanged(new_rows, old_rows))).select(["image_id", "item_id"])
    return RowChanges(removed, added, old, new)


def _dropped_rows(old: Snapshot, copied: dict[str, list[str]], new_ids: pa.Array) -> pa.Table:
    """The KEY_COLUMNS of the rows of each retired file in `copied` that none of its copies
    kept, its copies' ids compared with its own a file at a time (side by side); a copy that
    holds an id its source did not, or one of `new_ids` (rows in files that copy nothing), is
    refused: the log's lineage would be wrong, or an image_id in the table twice."""
    fs = old.location.fs

    def dropped(source: str) -> pa.Table:
        kept = pa.chunked_array([pq.read_table(copy, columns=["image_id"], filesystem=fs, use_threads=False).column("image_id")
                                 for copy in copied[source]], pa.string()).combine_chunks()
        with pq.ParquetFile(source, filesystem=fs) as file:
            ids = file.read(columns=["image_id"], use_threads=False).column("image_id").combine_chunks()
            if not pc.all(pc.is_in(kept, value_set=ids)).as_py():
                raise InputError(f"{old.uri}: {', '.join(copied[source])} holds rows that {source}, which the log says it copies, did not")
            if len(new_ids) and pc.any(pc.is_in(kept, value_set=new_ids)).as_py():
                raise InputError(f"{old.uri}: an image_id is both in {', '.join(copied[source])} and in a new file (image_id must be unique)")
            gone = np.flatnonzero(pc.invert(pc.is_in(ids, value_set=kept)).to_numpy(zero_copy_only=False))
            # Only the row groups that held a dropped row are read (embed writes groups of 64 rows).
            ends = np.cumsum([file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)])
            groups = np.unique(np.searchsorted(ends, gone, side="right")).tolist()
            rows = file.read_row_groups(groups, columns=list(KEY_COLUMNS), use_threads=False) if groups else _empty()
        rows = rows.filter(pc.is_in(rows.column("image_id"), value_set=ids.take(pa.array(gone))))
        release_freed_memory()
        return rows

    if not copied:
        return _empty()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return pa.concat_tables(pool.map(dropped, sorted(copied)), promote_options="permissive")
    except OSError as error:
        raise StorageError(f"cannot read {old.uri} (version {old.version}): {error}{credentials_hint(old.uri)}") from error
