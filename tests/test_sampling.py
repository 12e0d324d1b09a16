"""The epoch's batch plan (mga.sampling): whole items, P x K, seeded, from ids alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mga.sampling import TrainIndex, plan_epoch


def catalog_index(items: int = 40, pieces: int = 10, seed: int = 0) -> TrainIndex:
    """Items of 1-7 rows laid out item-sorted over `pieces` row groups, as a catalog is:
    items at a piece boundary have rows in two pieces. Groups of 4 items (look-alikes)."""
    rng = np.random.default_rng(seed)
    item = np.repeat(np.arange(items), rng.integers(1, 8, size=items))
    piece = np.arange(len(item)) * pieces // len(item)
    offset = np.arange(len(item)) - np.searchsorted(piece, piece)
    return TrainIndex(item=item, group=item // 4, piece=piece, offset=offset)


def batches_of(plan, P: int, K: int) -> np.ndarray:
    return plan.batches.reshape(len(plan.batches), P, K)


@pytest.mark.parametrize("window_rows", [1, 16, 10_000])
def test_every_batch_holds_p_whole_items_of_k_of_their_own_rows(window_rows):
    index, P, K = catalog_index(), 4, 3
    split = {int(i) for i in np.unique(index.item) if len(np.unique(index.piece[index.item == i])) > 1}
    assert split, "the catalog must have items whose rows span pieces"
    plan = plan_epoch(index, P, K, window_rows, seed=1, epoch=0)
    seen = Counter()
    for batch in batches_of(plan, P, K):
        labels = index.item[batch]  # [P, K]
        assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == P
        seen.update(labels[:, 0].tolist())
        for rows in batch:  # K rows of one item: distinct when the item has K or more
            available = int((index.item == index.item[rows[0]]).sum())
            assert len(set(rows.tolist())) == min(K, available)
    # One epoch: every item once, but fewer than P left out at the end.
    assert max(seen.values()) == 1 and len(seen) + plan.left_out_items == 40 and plan.left_out_items < P
    assert split & set(seen), "items spanning pieces are batched whole"


def test_the_plan_is_a_function_of_seed_and_epoch():
    index = catalog_index()
    first = plan_epoch(index, 4, 2, 16, seed=3, epoch=5)
    assert np.array_equal(first.batches, plan_epoch(index, 4, 2, 16, seed=3, epoch=5).batches)  # a resumed run replays it
    assert not np.array_equal(first.batches, plan_epoch(index, 4, 2, 16, seed=3, epoch=6).batches)
    assert not np.array_equal(first.batches, plan_epoch(index, 4, 2, 16, seed=4, epoch=5).batches)
    # Windows follow a shuffled piece order: the first batch does not always come from piece 0.
    first_pieces = {int(index.piece[plan_epoch(index, 4, 2, 16, seed=3, epoch=e).batches[0, 0]]) for e in range(8)}
    assert len(first_pieces) > 1


def test_look_alike_batches_take_p_over_g_items_from_each_of_g_groups():
    index, P, K = catalog_index(items=64), 4, 2
    plan = plan_epoch(index, P, K, 10_000, seed=0, epoch=0, groups_per_batch=2)
    for batch in batches_of(plan, P, K):
        counts = Counter(index.group[batch[:, 0]].tolist())
        assert sorted(counts.values()) == [2, 2]
    assert len(np.unique(index.item[plan.batches])) + plan.left_out_items == 64 and plan.left_out_items < P
    with pytest.raises(ValueError, match="multiple of groups_per_batch"):
        plan_epoch(index, 5, K, 16, seed=0, epoch=0, groups_per_batch=2)


def test_ranks_get_equal_contiguous_shares_and_the_rest_is_counted():
    plan = plan_epoch(catalog_index(), 4, 2, 16, seed=0, epoch=0)
    shares = [plan.for_rank(rank, 3) for rank in range(3)]
    assert len({len(share.batches) for share, _ in shares}) == 1
    assert shares[0][1] == len(plan.batches) % 3
    assert np.array_equal(np.concatenate([share.batches for share, _ in shares]), plan.batches[: len(plan.batches) - shares[0][1]])
