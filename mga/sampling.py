"""P x K batches (P whole items, K images each), planned per epoch from an id-only index.

The index holds, for every train row, its class (item), its look-alike group (e.g. the
category) and where it is stored: a *piece* (one row group of one file) and its offset
there. No image bytes are needed to plan. An epoch's plan:

1. the pieces in a seeded random order, cut into *windows* of about `window_rows` rows:
   a reader reads a window's pieces once and decodes only the rows the plan names;
2. every item belongs to the window holding the first of its rows in that order; its
   other rows are read from wherever they are, so an item whose rows span row groups or
   files (a catalog after an incremental prepare) is still one item of one batch;
3. in each window the items are shuffled and taken P at a time (with `groups_per_batch`
   G > 0: P/G items from each of G groups, so that negatives look alike); items that do
   not fill a batch wait for the next window, and at most P - 1 are left out at the end;
4. K rows of each item without replacement (each row, then random repeats, for items
   with fewer).

The plan depends on (index, seed, epoch) alone, so a resumed run replays it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrainIndex:
    """Train rows by class, group and storage place; each array [N] int64, classes 0..C-1."""

    item: np.ndarray
    group: np.ndarray
    piece: np.ndarray
    offset: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.item) == len(self.group) == len(self.piece) == len(self.offset):
            raise ValueError("TrainIndex arrays must have one entry per row")

    @property
    def pieces(self) -> int:
        return int(self.piece.max()) + 1 if len(self.piece) else 0


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: `batches` [B, P*K] index rows (item-major), `window` [B] the window each
    batch is read in, and `left_out_items`: items of the epoch that no batch holds."""

    batches: np.ndarray
    window: np.ndarray
    left_out_items: int

    def for_rank(self, rank: int, world: int) -> tuple["EpochPlan", int]:
        """The rank's equal, contiguous share of the batches, and how many batches no rank gets."""
        share = len(self.batches) // world
        part = slice(rank * share, (rank + 1) * share)
        return EpochPlan(self.batches[part], self.window[part], self.left_out_items), len(self.batches) - share * world


def plan_epoch(
    index: TrainIndex,
    items_per_batch: int,
    images_per_item: int,
    window_rows: int,
    seed: int,
    epoch: int,
    groups_per_batch: int = 0,
) -> EpochPlan:
    """The epoch's P x K batches (see the module docstring)."""
    P, K = items_per_batch, images_per_item
    if groups_per_batch and P % groups_per_batch:
        raise ValueError(f"items_per_batch ({P}) must be a multiple of groups_per_batch ({groups_per_batch})")
    rng = np.random.default_rng([seed, epoch])
    by_item = np.lexsort((rng.random(len(index.item)), index.item))  # rows grouped by item, random within
    items, starts, counts = np.unique(index.item[by_item], return_index=True, return_counts=True)

    # Windows: consecutive pieces of a shuffled order; an item lives where its first row is.
    order = rng.permutation(index.pieces)
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    piece_rows = np.bincount(index.piece, minlength=index.pieces)[order]
    window_of_position = (np.cumsum(piece_rows) - piece_rows) // window_rows
    first_position = np.minimum.reduceat(position[index.piece[by_item]], starts)
    item_window = window_of_position[first_position]
    item_group = index.group[by_item][starts]

    # K rows per item: the first K of its (randomly ordered) rows; an item with fewer gives
    # each of its rows once and random ones of them for the rest.
    slots = np.arange(K)
    draws = np.where(slots < counts[:, None], slots, (rng.random((len(items), K)) * counts[:, None]).astype(np.int64))
    rows_of_item = by_item[starts[:, None] + draws]  # [items, K]

    batches: list[np.ndarray] = []
    windows: list[int] = []
    waiting = np.zeros(0, dtype=np.int64)  # positions in `items` carried to the next window
    shuffled = rng.permutation(len(items))
    for window in np.unique(item_window):
        members = np.concatenate([waiting, shuffled[item_window[shuffled] == window]])
        chosen, waiting = _fill_batches(members, item_group, P, groups_per_batch, rng)
        batches += chosen
        windows += [int(window)] * len(chosen)
    if groups_per_batch and len(waiting) >= P:  # the end: whatever groups are left, P at a time
        chosen, waiting = _fill_batches(waiting, item_group, P, 0, rng)
        batches += chosen
        windows += [windows[-1] if windows else 0] * len(chosen)
    planned = np.stack([rows_of_item[batch].reshape(-1) for batch in batches]) if batches else np.zeros((0, P * K), np.int64)
    return EpochPlan(planned, np.asarray(windows, dtype=np.int64), len(waiting))


def _fill_batches(
    members: np.ndarray, item_group: np.ndarray, P: int, groups_per_batch: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """Batches of P of `members` (positions of items, in shuffled order) and those left over."""
    if not groups_per_batch:
        full = len(members) // P * P
        return list(members[:full].reshape(-1, P)), members[full:]
    per_group = P // groups_per_batch
    pools: dict[int, list[int]] = {}
    for member in members.tolist():
        pools.setdefault(int(item_group[member]), []).append(member)
    batches = []
    while True:
        ready = [group for group, pool in pools.items() if len(pool) >= per_group]
        if len(ready) < groups_per_batch:
            break
        picked = rng.choice(len(ready), size=groups_per_batch, replace=False)
        batch = []
        for choice in picked:
            pool = pools[ready[choice]]
            batch += pool[:per_group]
            del pool[:per_group]
        batches.append(np.asarray(batch, dtype=np.int64))
    left = [member for pool in pools.values() for member in pool]
    return batches, np.asarray(left, dtype=np.int64)
