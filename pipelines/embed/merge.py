"""`mga embed --incremental` as a merge (what to embed, which stored files to rewrite), and the
exactly-once check every embed makes of the files it wrote before committing them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import Location
from pipelines.tables import Snapshot, read_table

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


def plan_incremental(features: Snapshot, catalog: Snapshot, model_id: str) -> IncrementalPlan:
    """Compare the catalog with the stored features by image_id, sha256 (and identity) and model_id.

    Only id and hash columns are read, and the comparison is an Arrow hash join: no image
    bytes, no Python object per row.
    """
    now = read_table(catalog, ["image_id", *CHANGE_KEY, "__filename"]).rename_columns(["image_id", *CHANGE_KEY, "catalog_file"])
    now = now.append_column("in_catalog", pa.array(np.ones(now.num_rows, bool)))
    stored = read_table(features, ["image_id", *CHANGE_KEY, "model_id", "__filename"])
    stored = stored.rename_columns([name if name in ("image_id", "__filename") else f"stored_{name}" for name in stored.column_names])
    joined = now.join(stored, "image_id", join_type="full outer")
    in_catalog = pc.fill_null(joined.column("in_catalog"), False)
    in_store = pc.is_valid(joined.column("__filename"))
    same = pc.equal(joined.column("stored_model_id"), model_id)
    for name in CHANGE_KEY:
        now_value, stored_value = joined.column(name), joined.column(f"stored_{name}")
        # Null-aware: an unlabelled photo's null item_id is unchanged when it is still null.
        both_null = pc.and_(pc.is_null(now_value), pc.is_null(stored_value))
        same = pc.and_kleene(same, pc.or_kleene(pc.equal(now_value, stored_value), both_null))
    same = pc.fill_null(same, False)
    unchanged = pc.and_(pc.and_(in_catalog, in_store), same)
    new = pc.and_(in_catalog, pc.invert(in_store))
    changed = pc.and_(pc.and_(in_catalog, in_store), pc.invert(same))
    deleted = pc.and_(in_store, pc.invert(in_catalog))
    embed = joined.filter(pc.or_(new, changed))
    stale = joined.filter(pc.and_(in_store, pc.invert(unchanged))).select(["__filename", "image_id"]).sort_by("__filename")
    rewrite: dict[str, list[str]] = {}
    for path, image_id in zip(stale.column("__filename").to_pylist(), stale.column("image_id").to_pylist()):
        rewrite.setdefault(path, []).append(image_id)
    counts = {name: int(pc.sum(mask).as_py() or 0) for name, mask in (("new", new), ("changed", changed), ("unchanged", unchanged), ("deleted", deleted))}
    files = pc.unique(embed.column("catalog_file")).to_pylist()
    return IncrementalPlan(embed.column("image_id").combine_chunks(), files, rewrite, counts)


def check_exactly_once(table: Location, data_files: list[str], rejected: pa.Array, expected: pa.Array) -> int:
    """Every expected image is in the written files or the rejects exactly once, nothing else is; returns the rows written."""
    written = pa.chunked_array(
        [pq.read_table(path, columns=["image_id"], filesystem=table.fs).column("image_id").combine_chunks() for path in data_files], pa.string()
    ).combine_chunks()
    problems = []
    if len(pc.unique(written)) != len(written):
        problems.append(f"{len(written) - len(pc.unique(written))} duplicate rows")
    both = int(pc.sum(pc.is_in(written, value_set=rejected)).as_py() or 0)
    if both:
        problems.append(f"{both} images both written and rejected")
    accounted = pa.concat_arrays([written, rejected.cast(pa.string())])
    missing = int(pc.sum(pc.invert(pc.is_in(expected, value_set=accounted))).as_py() or 0)
    unexpected = int(pc.sum(pc.invert(pc.is_in(accounted, value_set=expected))).as_py() or 0)
    if missing or unexpected:
        problems.append(f"{missing} images missing, {unexpected} unexpected")
    if problems:
        raise RuntimeError(f"embed: the files written into {table.uri} are inconsistent ({'; '.join(problems)}); nothing was committed")
    return len(written)
