"""P x K batches (P items, K images each) from a stream of item groups."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def pk_batches(groups: Iterable[tuple[str, np.ndarray]], items_per_batch: int, images_per_item: int, rng: np.random.Generator) -> Iterator[tuple[list[str], np.ndarray]]:
    """Group stream -> batches of P distinct items with K images each.

    `groups` yields (item_id, images [n, ...]) with n >= 1. A stream read in blocks can
    split one item into several groups; a group whose item is already in the batch being
    filled is merged into it instead of taking a second slot. Items with fewer than K
    images are drawn with replacement. Yields (item_ids [P], images [P*K, ...], item-major);
    a last incomplete batch is dropped.
    """
    pending: dict[str, list[np.ndarray]] = {}
    for item_id, images in groups:
        pending.setdefault(item_id, []).append(images)
        if len(pending) == items_per_batch:
            yield _draw(pending, images_per_item, rng)
            pending = {}


def _draw(pending: dict[str, list[np.ndarray]], count: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    chosen = []
    for parts in pending.values():
        images = np.concatenate(parts) if len(parts) > 1 else parts[0]
        picks = rng.choice(len(images), size=count, replace=len(images) < count)
        chosen.append(images[picks])
    return list(pending), np.concatenate(chosen)
