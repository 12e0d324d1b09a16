"""Published tables as Ray datasets, and the catalog's train classes."""

from __future__ import annotations

from typing import Iterable

import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col

from pipelines.storage import Location, read_manifest, read_table, resolve, table_files


def open_catalog(uri: str) -> tuple[Location, dict]:
    """The catalog's location and manifest; refuses a prefix without `_manifest.json`."""
    location = resolve(uri)
    return location, read_manifest(location)


def table_dataset(table: Location, columns: list[str], where: tuple[str, Iterable[str]] | None = None) -> ray.data.Dataset:
    """A streaming Ray dataset of a published table's rows, optionally `where column in values`.

    The predicate is an Arrow expression, which Ray Data evaluates natively per block.
    """
    read_columns = list(columns) + ([where[0]] if where and where[0] not in columns else [])
    dataset = ray.data.read_parquet(table_files(table), filesystem=table.fs, columns=read_columns)
    if where:
        dataset = dataset.filter(expr=col(where[0]).is_in(sorted(set(where[1]))))
        if read_columns != list(columns):
            dataset = dataset.select_columns(list(columns))
    return dataset


def catalog_dataset(uri: str, columns: list[str], splits: tuple[str, ...] | None = None) -> ray.data.Dataset:
    location, _ = open_catalog(uri)
    return table_dataset(location, columns, ("split", splits) if splits else None)


def train_item_ids(uri: str) -> list[str]:
    """Sorted item ids of the train split: the identity classifier's classes (ids only, no images)."""
    location, _ = open_catalog(uri)
    table = read_table(location, columns=["item_id"], filter=pc.field("split") == "train")
    return sorted(set(table.column("item_id").to_pylist()))
