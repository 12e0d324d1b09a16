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

import pyarrow as pa
import pyarrow.compute as pc

from mga.errors import InputError
from pipelines.filters import RowFilter
from pipelines.schemas import IDENTITY_COLUMNS
from pipelines.storage import Location, StorageError
from pipelines.tables import Snapshot, TableNotFound, open_table, read_table

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


def _identity(snapshot: Snapshot, where: RowFilter) -> tuple[pa.Table, pa.Array]:
    """The selected rows' `image_id, item_id` and one key string per row over KEY_COLUMNS."""
    if not snapshot.files.num_rows:
        return pa.table({"image_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}), pa.array([], pa.string())
    rows = read_table(snapshot, list(KEY_COLUMNS), where.expression)
    parts = [rows.column(name).cast(pa.string()) for name in KEY_COLUMNS]
    # Null-aware: an unlabelled photo's null item is part of its identity.
    key = pc.binary_join_element_wise(*parts, "\x1f", null_handling="replace", null_replacement="\x00")
    return rows.select(["image_id", "item_id"]), key


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
        (old_rows, old_key), (new_rows, new_key) = _identity(old, where), _identity(new, where)
    except StorageError as error:  # a vacuumed file of the old version
        raise VersionGone(f"the files of {location.uri} version {old_version} cannot be read any more ({error})") from error
    removed = old_rows.filter(pc.invert(pc.is_in(old_key, value_set=new_key)))
    added = new_rows.filter(pc.invert(pc.is_in(new_key, value_set=old_key)))
    return RowChanges(removed, added, old, new)
