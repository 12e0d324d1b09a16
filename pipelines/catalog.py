"""The catalog: opening it, the images of a few of its ids, published tables as Ray datasets,
and copy-on-write of their files from Ray tasks. Ray is imported by the functions that run
on it: `mga query` and `mga evaluate` read a few images without it."""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines.rewrites import copy_without
from pipelines.storage import Location, StorageError, resolve
from pipelines.tables import Snapshot, TableWriter, open_table, read_table

if TYPE_CHECKING:
    import ray.data

# What reading an optional catalog may raise: no table, a version or a file vacuumed since, a
# missing column. Pictures are then drawn without the images.
TABLE_ERRORS = (StorageError, OSError, pa.ArrowException)


def open_catalog(uri: str, version: int | None = None) -> Snapshot:
    """The catalog table's current version (or `version`); refuses a URI that holds no Delta table."""
    return open_table(resolve(uri), version)


def features_catalog(features: Snapshot, notes: list[str]) -> Snapshot | None:
    """The catalog a features table was embedded from, at the version it read; None (and a note) when unavailable."""
    catalog = features.info.get("catalog")
    if not catalog:
        notes.append(f"The metadata of the features table {features.uri} names no catalog: no pictures of its images.")
        return None
    try:
        return open_table(resolve(catalog), features.info.get("catalog_version"))
    except TABLE_ERRORS as error:
        notes.append(f"Catalog unavailable ({error}): no pictures of its images.")
        return None


def catalog_images(catalog: Snapshot | None, ids: Iterable[str], notes: list[str]) -> dict[str, bytes]:
    """The encoded images of `ids` from `catalog`, reading only the files and row groups that
    may hold them; a note for what is missing (pictures show a placeholder)."""
    wanted = sorted(set(ids))
    if catalog is None or not wanted:
        return {}
    try:
        rows = read_table(catalog, ["image_id", "image"], pc.field("image_id").isin(pa.array(wanted)), ("image_id", wanted))
    except TABLE_ERRORS as error:
        notes.append(f"Catalog unavailable ({error}): no picture of its images.")
        return {}
    images = dict(zip(rows["image_id"].to_pylist(), rows["image"].to_pylist(), strict=True))
    if len(images) < len(wanted):
        notes.append(
            f"{len(wanted) - len(images)} of the {len(wanted)} picture images are not in the catalog "
            f"{catalog.uri} (version {catalog.version}): shown as grey placeholders."
        )
    return images


def table_dataset(table: Snapshot, columns: list[str], *where: tuple[str, Iterable[str]]) -> ray.data.Dataset:
    """A streaming Ray dataset of one table version's rows, `where` each `column in values`.

    One Ray Data task per data file reads it a row group at a time: the version's file list
    is the Delta log's, so nothing is listed and no footer is read up front (Ray Data's
    `read_parquet` starts a pool of footer-reading actors for every read, 32 processes by
    default, which on a laptop cost more than the read). With `where`, only the files whose
    statistics may hold the values (Snapshot.paths), and in them only such row groups (read
    from the footers on the driver), are read: Ray Data's own pushdown would read every row
    group of a file against a long `is_in`.
    """
    if where:
        pieces = [{"path": path, "row_groups": groups} for path, groups in table.pieces(*where)]
        condition = functools.reduce(operator.and_, [pc.field(name).isin(sorted(set(values))) for name, values in where])
    else:
        pieces, condition = [{"path": path, "row_groups": None} for path in table.paths()], None
    import ray.data

    if not pieces:
        return ray.data.from_arrow(read_table(table, list(columns), None, *where).slice(0, 0))
    return ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        _read_pieces, fn_kwargs={"location": table.location, "columns": list(columns), "condition": condition}, batch_size=1, batch_format="pyarrow"
    )


def _read_pieces(pieces: pa.Table, location: Location, columns: list[str], condition: pc.Expression | None) -> Iterator[pa.Table]:
    """Ray Data task: the rows of the given row groups (all of a file's for None) that satisfy `condition`, a row group at a time."""
    parquet = pads.ParquetFileFormat()
    for path, groups in zip(pieces.column("path").to_pylist(), pieces.column("row_groups").to_pylist()):
        fragment = parquet.make_fragment(path, filesystem=location.fs)
        for group in fragment.split_by_row_group() if groups is None else (fragment.subset(row_group_ids=[group]) for group in groups):
            yield group.to_table(columns=columns, filter=condition)


def rewrite_without(writer: TableWriter, stale: dict[str, list[str]], schema: pa.Schema, **parquet_options: Any) -> tuple[dict[str, str], int, int]:
    """Rewrite each stored file of `writer`'s table without its `stale` image ids, one Ray task
    per file, into the writer's run directory; (each new file -> the file it copies, rows kept,
    rows dropped). The caller commits the new files and removes the old ones in its one commit."""
    import ray

    targets = {path: writer.file(f"rewritten/part-{number:05d}.parquet") for number, path in enumerate(sorted(stale))}
    copy = ray.remote(num_cpus=0.5)(copy_without)
    results = ray.get([copy.remote(writer.location, path, ids, targets[path], schema, **parquet_options) for path, ids in stale.items()])
    copies = {target.path: source for source, target in targets.items()}
    return copies, sum(kept for kept, _ in results), sum(dropped for _, dropped in results)
