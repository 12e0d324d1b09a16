"""What changed in a selection of a features table between two of its versions, from the Delta
log and the rows' identity alone.

`mga embed --incremental` writes new and changed images to new files and rewrites the files
that held a changed or deleted row without it; a full embed replaces every file. Either way a
row that is unchanged between two versions is either in a file both versions list, or in a
removed file and again, with the same identity, in an added one. So only the files one
version lists and the other does not are read, and only their identity columns: a row is the
same when its `image_id`, item, split, domain, category, `sha256` and `embedded_at` are (the
last makes a re-embedding of the same image a change: its features may differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mga.errors import InputError
from pipelines.filters import RowFilter
from pipelines.schemas import IDENTITY_COLUMNS
from pipelines.storage import Location, StorageError
from pipelines.tables import Snapshot, TableNotFound, open_table, read_files

KEY_COLUMNS = (*IDENTITY_COLUMNS, "embedded_at")


class VersionGone(StorageError):
    """An old version (its log entry or its files) is no longer there to compare with."""


@dataclass(frozen=True)
class RowChanges:
    """The selected rows of the old version that the new one no longer has as they were
    (`removed`: deleted, changed, or no longer selected) and the selected rows of the new one
    that the old did not have (`added`), each `image_id, item_id`; `old` and `new` are the two
    versions restricted to the files only one of them lists (where those rows are stored)."""

    removed: pa.Table
    added: pa.Table
    old: Snapshot
    new: Snapshot

    def __bool__(self) -> bool:
        return bool(self.removed.num_rows or self.added.num_rows)


def _identity(snapshot: Snapshot, where: RowFilter) -> pa.Table:
    """The KEY_COLUMNS of the selected rows (none for no files); an image id twice is refused."""
    if not snapshot.files.num_rows:
        return pa.table({name: pa.array([], pa.string()) for name in KEY_COLUMNS})
    rows = read_files(snapshot, list(KEY_COLUMNS)).filter(where.expression).combine_chunks()  # filters name identity columns only
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
        mine, theirs = rows.column(name), aligned.column(name)
        equal = pc.or_(pc.fill_null(pc.equal(mine, theirs), False), pc.and_(pc.is_null(mine), pc.is_null(theirs)))
        same = pc.and_(same, equal)
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
    try:
        old_rows, new_rows = _identity(old, where), _identity(new, where)
    except StorageError as error:  # a vacuumed file of the old version
        raise VersionGone(f"the files of {location.uri} version {old_version} cannot be read any more ({error})") from error
    removed = old_rows.filter(pc.invert(_unchanged(old_rows, new_rows))).select(["image_id", "item_id"])
    added = new_rows.filter(pc.invert(_unchanged(new_rows, old_rows))).select(["image_id", "item_id"])
    return RowChanges(removed, added, old, new)
