"""Published tables as Ray datasets, and the catalog's train classes."""

from __future__ import annotations

import functools
import operator
from typing import Iterable

import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col

from pipelines.storage import resolve
from pipelines.tables import Snapshot, open_table, read_table


def open_catalog(uri: str, version: int | None = None) -> Snapshot:
    """The catalog table's current version (or `version`); refuses a URI that holds no Delta table."""
    return open_table(resolve(uri), version)


def table_dataset(table: Snapshot, columns: list[str], *where: tuple[str, Iterable[str]]) -> ray.data.Dataset:
    """A streaming Ray dataset of one table version's rows, `where` each `column in values`.

    Files whose statistics exclude the values are not read at all (Snapshot.paths); in the
    files that are, the predicate is an Arrow expression Ray Data pushes into the Parquet
    read, so row groups outside it are skipped too.
    """
    read_columns = list(columns) + [name for name in dict.fromkeys(name for name, _ in where) if name not in columns]
    paths = table.paths(*where)
    if not paths:
        return ray.data.from_arrow(read_table(table, list(columns), None, *where).slice(0, 0))
    dataset = ray.data.read_parquet(paths, filesystem=table.location.fs, columns=read_columns)
    if where:
        conditions = [col(name).is_in(sorted(set(values))) for name, values in where]
        dataset = dataset.filter(expr=functools.reduce(operator.and_, conditions))
        if read_columns != list(columns):
            dataset = dataset.select_columns(list(columns))
    return dataset


def catalog_dataset(uri: str, columns: list[str], splits: tuple[str, ...] | None = None) -> ray.data.Dataset:
    return table_dataset(open_catalog(uri), columns, *([("split", splits)] if splits else []))


def train_item_ids(uri: str) -> list[str]:
    """Sorted item ids of the train split: the identity classifier's classes (ids only, no images)."""
    table = read_table(open_catalog(uri), ["item_id"], pc.field("split") == "train", ("split", ["train"]))
    return sorted(set(table.column("item_id").to_pylist()))
