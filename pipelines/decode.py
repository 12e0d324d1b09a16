"""Ray Data UDFs that decode catalog rows.

Kept apart from the jobs that use them and free of torch and Ray Train imports: Ray
unpickles a UDF by importing its module in every fresh task worker, and workers are
recycled between epochs, so a heavy module here costs seconds per epoch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mga.transforms import ImageDecodeError, preprocess


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
