"""`mga prepare --incremental`: a rebuilt listing merged into the stored catalog.

An image whose row would be what is stored (the same bytes by sha256, and the same item,
split, domain, category, box and source path) stays where it is stored and is not
written again; new and changed images go to new files; images no longer listed, or now
rejected, are removed. A stored file that holds a changed or removed row is rewritten
without it (copy-on-write: delta-rs cannot write deletion vectors). The whole merge is
one commit. So the images of new and changed rows sit in files of their own, and
`mga embed --incremental` reads no other image bytes.

The comparison reads only id, key and file-name columns of the stored catalog: no image
bytes, no Python object per stored row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.prepare.listing import Entry
from pipelines.tables import Snapshot, read_table

# The columns that make a stored row the same as a rebuilt one (width and height follow from the bytes).
MERGE_KEY = ("item_id", "split", "domain", "category", "bbox", "sha256", "source_path")


@dataclass
class MergePlan:
    """What a merge changes in the stored catalog."""

    stale: dict[str, list[str]]  # stored file -> image ids to drop from it (changed or removed)
    counts: dict[str, int]  # new, changed, unchanged, deleted


def stored_rows(base: Snapshot) -> pa.Table:
    """The stored catalog's image ids, merge keys and data file of every row."""
    return read_table(base, ["image_id", *MERGE_KEY, "__filename"])


def stored_per_task(stored: pa.Table, tasks: list[list[Entry]]) -> list[pa.Table]:
    """For each write task, the stored rows of the images it lists (one hash join, then slices)."""
    sizes = [len(task) for task in tasks]
    listed = pa.table(
        {
            "image_id": pa.array([entry.image_id for task in tasks for entry in task], pa.string()),
            "task": pa.array(np.repeat(np.arange(len(tasks), dtype=np.int32), sizes)),
        }
    )
    # Acero joins no fixed-size lists (bbox): join row numbers, then take the rows.
    numbers = pa.table({"image_id": stored.column("image_id"), "row": pa.array(np.arange(stored.num_rows, dtype=np.int64))})
    joined = listed.join(numbers, "image_id", join_type="inner").sort_by("task")
    rows = stored.drop_columns(["__filename"]).take(joined.column("row"))
    bounds = np.searchsorted(joined.column("task").to_numpy(), np.arange(len(tasks) + 1))
    return [rows.slice(start, end - start) for start, end in zip(bounds[:-1], bounds[1:])]


def unchanged_ids(stored: pa.Table | None, rows: list[dict]) -> set[str]:
    """The image ids among `rows` (rebuilt catalog rows) whose stored row has the same merge key."""
    if stored is None or not stored.num_rows:
        return set()
    known = {row["image_id"]: row for row in stored.to_pylist()}
    return {row["image_id"] for row in rows if (old := known.get(row["image_id"])) is not None and all(old[key] == row[key] for key in MERGE_KEY)}


def plan_merge(stored: pa.Table, written_ids: pa.Array, kept_ids: pa.Array) -> MergePlan:
    """Compare the stored rows with the rebuild: `written_ids` are every image of the rebuilt
    catalog, `kept_ids` those left as stored; the stored rest is stale."""
    ids = stored.column("image_id")
    kept = pc.is_in(ids, value_set=kept_ids)
    listed = pc.is_in(ids, value_set=written_ids)
    stale = stored.filter(pc.invert(kept)).select(["__filename", "image_id"]).sort_by("__filename")
    grouped: dict[str, list[str]] = {}
    for path, image_id in zip(stale.column("__filename").to_pylist(), stale.column("image_id").to_pylist()):
        grouped.setdefault(path, []).append(image_id)
    changed = int(pc.sum(pc.and_(listed, pc.invert(kept))).as_py() or 0)
    counts = {
        "new": len(written_ids) - len(kept_ids) - changed,
        "changed": changed,
        "unchanged": len(kept_ids),
        "deleted": int(pc.sum(pc.invert(listed)).as_py() or 0),
    }
    return MergePlan(grouped, counts)
