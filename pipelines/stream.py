"""The training stream: an id-only index of the train rows, a seeded plan per epoch
(mga.sampling: whole items, P x K), and Ray Data tasks that read each planned window's row
groups once and decode only the rows the plan names.

Every worker streams its own share of every epoch from one Ray dataset that spans the
run's remaining epochs, so a new epoch does not start a new stream. Kept free of torch and
Ray Train imports: Ray unpickles a UDF by importing its module in every task worker.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from mga.errors import InputError
from mga.sampling import EpochPlan, TrainIndex, plan_epoch
from mga.transforms import ImageDecodeError, preprocess
from pipelines.catalog import open_catalog
from pipelines.storage import Location
from pipelines.tables import row_groups

# Logical CPUs per decode task: fractional, so decoding fits beside the trainer on a laptop.
DECODE_TASK_CPUS = 0.5
# What every batch row carries of its epoch's plan (the same in all its rows).
EPOCH_COUNTS = ("left_out_items", "unassigned_batches", "rank_batches")
# Files whose id columns are read at once when the index is built (I/O bound).
INDEX_READERS = 16


@dataclass(frozen=True)
class Catalog:
    """What training needs to know of the catalog's train split, without its image bytes:
    the classes (sorted item ids), the index, and where each piece (row group) is."""

    uri: str
    version: int
    location: Location
    items: list[str]
    index: TrainIndex
    pieces: list[tuple[str, int]]


@dataclass(frozen=True)
class StreamSettings:
    items_per_batch: int
    images_per_item: int
    image_size: int
    augment: bool
    max_pixels: int
    window_rows: int
    groups_per_batch: int
    seed: int


def index_catalog(uri: str, group_column: str = "category") -> Catalog:
    """Read the train rows' ids (item, group) and places: file, row group, offset."""
    snapshot = open_catalog(uri)
    where = [("split", ["train"])]
    paths = snapshot.paths(*where)
    read = functools.partial(_index_file, snapshot.location, where=where, group_column=group_column)
    with ThreadPoolExecutor(INDEX_READERS) as pool:
        parts = list(pool.map(read, paths))
    pieces = [(path, group) for path, part in zip(paths, parts) for group in part[1]]
    tables, piece_base = [], 0
    for table, groups in parts:
        tables.append(table.set_column(table.schema.get_field_index("piece"), "piece", pc.add(table.column("piece"), piece_base)))
        piece_base += len(groups)
    rows = pa.concat_tables(tables) if tables else pa.table({"item_id": pa.array([], pa.string())})
    if rows.num_rows == 0:
        raise InputError(f"{uri}: the catalog has no train rows")
    items = pc.unique(rows.column("item_id")).sort()
    groups = pc.unique(rows.column("group")).sort()
    index = TrainIndex(
        item=pc.index_in(rows.column("item_id"), value_set=items).to_numpy().astype(np.int64),
        group=pc.index_in(rows.column("group"), value_set=groups).to_numpy().astype(np.int64),
        piece=rows.column("piece").to_numpy().astype(np.int64),
        offset=rows.column("offset").to_numpy().astype(np.int64),
    )
    return Catalog(uri, snapshot.version, snapshot.location, items.to_pylist(), index, pieces)


def _index_file(location: Location, path: str, where: list, group_column: str) -> tuple[pa.Table, list[int]]:
    """One file's train rows: item_id, group, piece (row group number among `groups`), offset."""
    groups = row_groups(location, path, where)
    parquet = pq.ParquetFile(path, filesystem=location.fs)
    tables = []
    for number, group in enumerate(groups):
        ids = parquet.read_row_group(group, columns=["item_id", "split", group_column])
        offsets = np.flatnonzero(pc.equal(ids.column("split"), "train").to_numpy(zero_copy_only=False))
        tables.append(pa.table({
            "item_id": ids.column("item_id").take(offsets),
            "group": pc.cast(ids.column(group_column).take(offsets), pa.string()),
            "piece": pa.array(np.full(len(offsets), number, np.int64)),
            "offset": pa.array(offsets.astype(np.int64)),
        }))
    empty = pa.schema([("item_id", pa.string()), ("group", pa.string()), ("piece", pa.int64()), ("offset", pa.int64())])
    return (pa.concat_tables(tables) if tables else empty.empty_table()), groups


def batch_stream(catalog_ref: Any, settings: StreamSettings, epochs: range, rank: int, world: int) -> ray.data.Dataset:
    """Rank `rank`'s P x K batches of `epochs`, in order: one row per batch with `epoch`,
    `labels` [P*K], `images` [P*K, 3, S, S] uint8, `undecodable` (images replaced by another
    of the item's) and the epoch's EPOCH_COUNTS: items no batch holds, batches beyond an
    equal share per rank, and the rank's share. `catalog_ref`: ray.put(Catalog)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # epochs, and batches within them, in plan order
    context.enable_progress_bars = False  # the epoch line says how the stream keeps up
    planned = ray.data.from_items([{"epoch": epoch} for epoch in epochs], override_num_blocks=max(1, len(epochs))).flat_map(
        _plan_windows, fn_kwargs={"catalog": [catalog_ref], "settings": settings, "rank": rank, "world": world}
    )
    return planned.map_batches(
        _decode_window, fn_kwargs={"catalog": [catalog_ref], "settings": settings}, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_TASK_CPUS
    )


def rank_plan(catalog: Catalog, settings: StreamSettings, epoch: int, rank: int, world: int) -> tuple[EpochPlan, int]:
    plan = plan_epoch(catalog.index, settings.items_per_batch, settings.images_per_item, settings.window_rows, settings.seed, epoch, settings.groups_per_batch)
    return plan.for_rank(rank, world)


def _plan_windows(row: dict[str, Any], catalog: list, settings: StreamSettings, rank: int, world: int) -> list[dict[str, Any]]:
    """Ray Data task: an epoch -> the rank's windows, each a row with its batches' index rows."""
    epoch = int(row["epoch"])
    plan, unassigned = rank_plan(ray.get(catalog[0]), settings, epoch, rank, world)
    counts = {"epoch": epoch, "left_out_items": plan.left_out_items, "unassigned_batches": unassigned, "rank_batches": len(plan.batches)}
    windows, starts = np.unique(plan.window, return_index=True)
    bounds = list(starts) + [len(plan.window)]
    return [
        counts | {"batches": plan.batches[bounds[n]:bounds[n + 1]].astype("<i8").tobytes()}
        for n in range(len(windows))
    ]


def _decode_window(spec: pa.Table, catalog: list, settings: StreamSettings) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: one window's batches, its pieces read once, the planned rows decoded."""
    source: Catalog = ray.get(catalog[0])
    P, K, size = settings.items_per_batch, settings.images_per_item, settings.image_size
    epoch = spec.column("epoch")[0].as_py()
    batches = np.frombuffer(spec.column("batches")[0].as_py(), "<i8").reshape(-1, P * K)
    rows = np.unique(batches)
    pieces = source.index.piece[rows]
    images: dict[int, tuple[bytes, Any]] = {}
    for piece in np.unique(pieces):
        path, group = source.pieces[piece]
        wanted = rows[pieces == piece]
        table = pq.ParquetFile(path, filesystem=source.location.fs).read_row_group(int(group), columns=["image", "bbox"])
        picked = table.take(pa.array(source.index.offset[wanted]))
        for row, image, bbox in zip(wanted.tolist(), picked.column("image").to_pylist(), picked.column("bbox").to_pylist()):
            images[row] = (image, bbox)
    rng = np.random.default_rng([settings.seed, epoch, int(batches[0, 0])])  # reproducible augmentation
    for batch in batches:
        prepared, undecodable = _prepare_batch(batch, images, K, size, settings, rng)
        if prepared is None:
            continue  # an item without one decodable image: the batch is dropped (the worker counts the shortfall)
        yield {
            "epoch": np.array([epoch]),
            "labels": source.index.item[batch][None, :],
            "images": prepared[None],
            "undecodable": np.array([undecodable]),
            **{name: np.array([spec.column(name)[0].as_py()]) for name in EPOCH_COUNTS},
        }


def _prepare_batch(batch: np.ndarray, images: dict, K: int, size: int, settings: StreamSettings, rng: np.random.Generator) -> tuple[np.ndarray | None, int]:
    """[P*K, 3, S, S] uint8 of a batch's rows; an undecodable image is replaced by another of its item's."""
    prepared: list[np.ndarray | None] = []
    for row in batch.tolist():
        data, bbox = images[row]
        try:
            prepared.append(preprocess(data, bbox, size, rng if settings.augment else None, settings.max_pixels))
        except ImageDecodeError:
            prepared.append(None)
    undecodable = sum(image is None for image in prepared)
    for start in range(0, len(prepared), K):
        item = prepared[start:start + K]
        good = [image for image in item if image is not None]
        if not good:
            return None, undecodable
        prepared[start:start + K] = [image if image is not None else good[int(rng.integers(len(good)))] for image in item]
    return np.stack(prepared), undecodable


class EpochBatches:
    """A worker's batch stream, one epoch at a time: `epoch(n)` yields the rows of epoch n."""

    def __init__(self, dataset: ray.data.Dataset | Any) -> None:
        self._rows = iter(dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2))
        self._next: dict[str, np.ndarray] | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        while True:
            if self._next is None:
                self._next = next(self._rows, None)
            if self._next is None or int(self._next["epoch"][0]) != epoch:
                return
            row, self._next = self._next, None
            yield row
