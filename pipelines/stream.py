"""The training stream: catalog rows -> item groups (Ray Data tasks) -> P x K batches (on the worker).

Kept free of torch and Ray Train imports: Ray unpickles a UDF by importing its module in
every fresh task worker, and workers are recycled between epochs, so a heavy module here
costs seconds per epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import ray.data

from mga.sampling import pk_batches
from mga.transforms import ImageDecodeError, preprocess
from pipelines.catalog import catalog_dataset

# Logical CPUs per decode task: fractional, so decoding fits beside the trainer on a laptop.
DECODE_TASK_CPUS = 0.5


def item_groups(batch: pa.Table, images_per_item: int, image_size: int, augment: bool, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task: a block of catalog rows -> one row per item with K prepared images.

    A plain function, not an actor class: an actor pool would be started again, imports
    and all, for every epoch.
    """
    rng = np.random.default_rng()
    rows_by_item: dict[str, list[int]] = {}
    for row, item_id in enumerate(batch.column("item_id").to_pylist()):
        rows_by_item.setdefault(item_id, []).append(row)
    images, bboxes = batch.column("image"), batch.column("bbox").to_pylist()
    item_ids, groups = [], []
    for item_id, rows in rows_by_item.items():
        picks = rng.choice(rows, size=images_per_item, replace=len(rows) < images_per_item)
        prepared = []
        for row in picks:
            try:
                prepared.append(preprocess(images[int(row)].as_py(), bboxes[int(row)], image_size, rng if augment else None, max_pixels))
            except ImageDecodeError:
                continue  # prepare already rejected undecodable images; a later corruption only thins the group
        if prepared:
            while len(prepared) < images_per_item:
                prepared.append(prepared[int(rng.integers(len(prepared)))])
            item_ids.append(item_id)
            groups.append(np.stack(prepared))
    return {
        "item_id": np.array(item_ids, dtype=object),
        "images": np.stack(groups) if groups else np.zeros((0, images_per_item, 3, image_size, image_size), np.uint8),
    }


def train_stream(catalog: str, images_per_item: int, image_size: int, augment: bool, max_pixels: int) -> ray.data.Dataset:
    """The train split as a stream of item groups: one row per item with K prepared images."""
    dataset = catalog_dataset(catalog, ["item_id", "image", "bbox"], splits=("train",))
    return dataset.map_batches(
        item_groups,
        fn_kwargs=dict(images_per_item=images_per_item, image_size=image_size, augment=augment, max_pixels=max_pixels),
        batch_size=64,  # rows per decode task: small enough that several run at once and the first batch comes early
        batch_format="pyarrow",
        num_cpus=DECODE_TASK_CPUS,
    )


def pk_stream(source, items_per_batch: int, images_per_item: int, shuffle_buffer_items: int, rng: np.random.Generator) -> Iterator[tuple[list[str], np.ndarray]]:
    """P x K batches from a Ray dataset or a Ray Train dataset shard of item groups.

    The order is randomised by a local shuffle buffer of item groups, never a global shuffle.
    """

    def groups():
        batches = source.iter_batches(batch_size=items_per_batch, batch_format="numpy", local_shuffle_buffer_size=shuffle_buffer_items)
        for batch in batches:
            yield from zip(batch["item_id"], batch["images"])

    return pk_batches(groups(), items_per_batch, images_per_item, rng)
