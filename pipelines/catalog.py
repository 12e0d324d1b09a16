"""Published tables as Ray datasets, and the catalog's train classes."""

from __future__ import annotations

import functools
import operator
from typing import Iterable

import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col

from pipelines.storage import Location, read_manifest, read_table, resolve, table_files


def open_catalog(uri: str) -> tuple[Location, dict]:
    """The catalog's location and manifest; refuses a prefix without `_manifest.json`."""
    location = resolve(uri)
    return location, read_manifest(location)


def table_dataset(table: Location, columns: list[str], *where: tuple[str, Iterable[str]]) -> ray.data.Dataset:
    """A streaming Ray dataset of a published table's rows, `where` each `column in values`.

    The predicate is an Arrow expression, which Ray Data pushes into the Parquet read.
    """
    read_columns = list(columns) + [name for name in dict.fromkeys(name for name, _ in where) if name not in columns]
    dataset = ray.data.read_parquet(table_files(table), filesystem=table.fs, columns=read_columns)
    if where:
        conditions = [col(name).is_in(sorted(set(values))) for name, values in where]
        dataset = dataset.filter(expr=functools.reduce(operator.and_, conditions))
        if read_columns != list(columns):
            dataset = dataset.select_columns(list(columns))
    return dataset


def catalog_dataset(uri: str, columns: list[str], splits: tuple[str, ...] | None = None) -> ray.data.Dataset:
    location, _ = open_catalog(uri)
    return table_dataset(location, columns, *([("split", splits)] if splits else []))


def train_item_ids(uri: str) -> list[str]:
    """Sorted item ids of the train split: the identity classifier's classes (ids only, no images)."""
    location, _ = open_catalog(uri)
    table = read_table(location, columns=["item_id"], filter=pc.field("split") == "train")
    return sorted(set(table.column("item_id").to_pylist()))
