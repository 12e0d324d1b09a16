"""The exact, blocked shortlist (mga.retrieval's step 1): each query's top k of a gallery in
global order, and every positive's rank over the whole gallery, a block of gallery rows at a
time, so nothing larger than one queries x block score matrix exists, on a CPU or a GPU, at any
depth. Scores come from one fp32 matmul per block (mga.global_scores); the few that fall within
the matmul's error bound of a decision (the k-th score, a floor, a positive's score) are
recomputed exactly, so every decision is the same whatever the block shape or the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mga.global_scores import block_pair_scores, block_scores, score_tolerance

# Extra candidates a block's fast top-k takes beyond k, so near-ties at the k-th score are
# usually settled without a second pass.
TOP_K_MARGIN = 16
# Rows of a positives x block comparison held at once, and float64 elements of an exact
# recomputation, on a CPU and on a GPU (bound memory, not results; a GPU pays per launch).
COUNT_CHUNK = 128
# Positives' rows a CPU compares at once: 16 of a 50k-row block (3.2 MB) stay in cache (0.21 -> 0.13 s
# for 3,800 positives against 50k rows; 128 at once spill it).
COUNT_GROUP = 16


@dataclass
class TopK:
    """Per query, the best k gallery rows in global order: `scores` (exact S_global),
    `keys` (tie keys) and `rows` (the caller's handle of each row), each [Q, k]."""

    scores: torch.Tensor
    keys: torch.Tensor
    rows: torch.Tensor

    def take(self, order: torch.Tensor) -> "TopK":
        return TopK(*(values.gather(1, order) for values in (self.scores, self.keys, self.rows)))

    def first(self, count: int) -> "TopK":
        return TopK(self.scores[:, :count], self.keys[:, :count], self.rows[:, :count])


def order_by_score(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation that sorts by score descending, then key ascending."""
    by_key = torch.sort(keys, dim=1, stable=True).indices
    by_score = torch.sort(scores.gather(1, by_key), dim=1, descending=True, stable=True).indices
    return by_key.gather(1, by_score)


def block_top_k(
    query_global: torch.Tensor,
    block_global: torch.Tensor,
    block_keys: torch.Tensor,
    k: int,
    rows: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    floor: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_double: torch.Tensor | None = None,
) -> TopK:
    """Exact top-k of each query over one gallery block, in global order.

    `query_global` [Q, D], `block_global` [G, D] and `block_keys` [G] on one device; `rows`
    [G] are the handles returned for the chosen rows (default: positions in the block);
    `scores` is `block_scores(query_global, block_global)` when the caller has it already.
    `floor` (exact score [Q], tie key [Q]; -inf where unknown) is, per query, the k-th of
    gallery rows seen before (`kth_of`): a row after it in the global order is not in the top
    k of any gallery holding those rows, so it is left out (scored -inf, tie key int64 max:
    padding, ordered last). `block_double` is the block in float64 for its exact scores
    (`block_pair_scores`; on a CPU converted here when not given). Returns min(k, G) columns.
    """
    count = block_global.shape[0]
    k = min(k, count)
    rows = torch.arange(count, device=block_global.device) if rows is None else rows
    fast = block_scores(query_global, block_global) if scores is None else scores
    tolerance = score_tolerance(query_global.shape[1])
    take = min(count, k + TOP_K_MARGIN)
    # A row whose fast score is below the floor's by more than the tolerance scores below it exactly.
    candidates = None if floor is None else rows_at_or_above(fast, floor[0] - tolerance, take, k)
    if candidates is not None:
        scored = candidates >= 0
        candidates = candidates.clamp(min=0)  # padding: a valid position, its score stays -inf
    else:
        values, candidates = torch.topk(fast, take, dim=1)
        threshold = values[:, k - 1] - 2 * tolerance  # anything below cannot reach the exact top k
        if floor is not None:
            threshold = torch.maximum(threshold, floor[0] - tolerance)  # nor anything whose exact score is below the floor's
        if take < count and bool((values[:, -1] >= threshold).any()):
            take = int((fast >= threshold[:, None]).sum(1).max())
            values, candidates = torch.topk(fast, take, dim=1)
        scored = values >= threshold[:, None]
    # Exact scores only where a row may be kept: with a floor, a few per query.
    query, column = scored.nonzero(as_tuple=True)
    exact = torch.full(candidates.shape, float("-inf"), dtype=torch.float32, device=fast.device)
    if block_double is None and block_global.device.type == "cpu":
        block_double = block_global.double()
    exact[query, column] = block_pair_scores(query_global, block_global, query, candidates[query, column], block_double)
    keys = block_keys[candidates]
    if floor is not None:
        exact = exact.masked_fill(~at_or_before(exact, keys, *floor), float("-inf"))
    keys = keys.masked_fill(torch.isneginf(exact), torch.iinfo(torch.int64).max)
    found = TopK(exact, keys, rows[candidates])
    return found.take(order_by_score(found.scores, found.keys)[:, :k])


def rows_at_or_above(scores: torch.Tensor, bound: torch.Tensor, limit: int, width: int) -> torch.Tensor | None:
    """Per query, the positions of a block's rows scoring at least `bound` [Q] in `scores` [Q, G],
    in block order, as [Q, max(width, most a query has)] padded with -1; None where some query
    has more than `limit`. Once a floor leaves out all but a few rows a query, this is one
    comparison a row where a top-k costs ~9x (a 1,024-query tile x 28k rows on one CPU thread:
    0.009 s against torch.topk's 0.082 s at k = 116)."""
    if scores.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(scores.numpy() >= bound.numpy()[:, None]))
    else:
        flat = (scores >= bound[:, None]).reshape(-1).nonzero().squeeze(1)
    query, row = flat // scores.shape[1], flat % scores.shape[1]
    per_query = torch.bincount(query, minlength=scores.shape[0])
    most = int(per_query.max()) if len(query) else 0
    if most > limit:
        return None
    positions = torch.full((scores.shape[0], max(width, most)), -1, dtype=torch.int64, device=scores.device)
    positions[query, torch.arange(len(query), device=scores.device) - (torch.cumsum(per_query, 0) - per_query)[query]] = row
    return positions


def at_or_before(scores: torch.Tensor, keys: torch.Tensor, boundary_score: torch.Tensor, boundary_key: torch.Tensor) -> torch.Tensor:
    """Whether each entry of [Q, n] (exact score, tie key) comes at or before its query's boundary [Q] in the global order."""
    return (scores > boundary_score[:, None]) | ((scores == boundary_score[:, None]) & (keys <= boundary_key[:, None]))


def kth_of(top: TopK, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The floor `block_top_k` takes: each query's k-th entry (score, tie key) of an exact
    top list, or None while the list holds fewer than k columns."""
    if top.scores.shape[1] < k:
        return None
    return top.scores[:, k - 1], top.keys[:, k - 1]


def stricter_floor(
    first: tuple[torch.Tensor, torch.Tensor] | None, second: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per query, whichever of two floors (`kth_of`s of lists of the same queries and depth, or
    None) comes first in the global order: both are valid, the earlier one leaves out more."""
    if first is None or second is None:
        return second if first is None else first
    second_first = at_or_before(second[0][:, None], second[1][:, None], *first)[:, 0]
    return torch.where(second_first, second[0], first[0]), torch.where(second_first, second[1], first[1])


def merge_top_k(first: TopK, second: TopK, k: int) -> TopK:
    """The exact top-k of two exact top-k lists of the same queries (e.g. two gallery blocks)."""
    joined = TopK(*(torch.cat(pair, dim=1) for pair in zip(
        (first.scores, first.keys, first.rows), (second.scores, second.keys, second.rows))))
    return joined.take(order_by_score(joined.scores, joined.keys)[:, :k])


def merge_known_top_k(known: TopK, boundary_score: torch.Tensor, boundary_key: torch.Tensor, added: TopK, k: int) -> TopK:
    """The exact top of a gallery that gained rows, from what was known of its top before.

    `known` [Q, n] holds, per query, every row of the old gallery at or before a boundary in
    the global order (`boundary_score`, `boundary_key` [Q]: its exact S_global and tie key;
    -inf for a query that knew the whole gallery), minus the rows since removed (scored -inf:
    padding). `added` [Q, m] is the exact top of the rows added since. Every row neither known
    nor added ranks after the boundary, so the rows at or before it are exactly the known ones
    and the added ones at or before it: their merge, cut to `k`, is exact (the top-k of a union
    is the top-k of the union of top-ks). Added rows after the boundary are left out, since
    where they fall among the unknown rows is not known. Entries scored -inf are padding: the
    exact part of a query's list is its finite entries.
    """
    before = at_or_before(added.scores, added.keys, boundary_score, boundary_key)
    padding = torch.iinfo(torch.int64).max
    kept = TopK(torch.where(before, added.scores, float("-inf")), torch.where(before, added.keys, padding), added.rows)
    return merge_top_k(known, kept, k)


def exact_top_k(
    query_global: torch.Tensor, gallery_global: torch.Tensor, gallery_keys: torch.Tensor, k: int, gallery_block: int = 65536
) -> TopK:
    """Exact top-k over a gallery held on one device, scanned in blocks of `gallery_block`
    rows; `rows` in the result are gallery positions."""
    shortlist: TopK | None = None
    for start in range(0, gallery_global.shape[0], gallery_block):
        stop = min(start + gallery_block, gallery_global.shape[0])
        rows = torch.arange(start, stop, device=gallery_global.device)
        floor = None if shortlist is None else kth_of(shortlist, k)
        found = block_top_k(query_global, gallery_global[start:stop], gallery_keys[start:stop], k, rows, floor=floor)
        shortlist = found if shortlist is None else merge_top_k(shortlist, found, k)
    if shortlist is None:
        raise ValueError("an empty gallery has no ranking")
    return shortlist


def _above_and_near(scores: torch.Tensor, query: torch.Tensor, score: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For positives of queries `query` [R] with exact scores `score` [R, 1], over the block's
    `scores` [Q, G]: how many rows score above score + tolerance ([R] int64), and the flat
    indices into [R, G] of the rows within the tolerance. On a CPU in numpy (a row gather,
    comparisons and counts ~5x faster than torch's there), COUNT_GROUP rows at a time; on a GPU
    in torch."""
    if scores.device.type == "cpu":
        block, rows, bound = scores.numpy(), query.numpy(), score.numpy()
        above, near = np.empty(len(rows), dtype=np.int64), []
        for start in range(0, len(rows), COUNT_GROUP):
            values, limit = block[rows[start:start + COUNT_GROUP]], bound[start:start + COUNT_GROUP]
            over = values > limit + tolerance
            close = values >= limit - tolerance
            close ^= over  # over implies >= the lower bound
            above[start:start + COUNT_GROUP] = np.count_nonzero(over, axis=1)
            near.append(np.flatnonzero(close) + start * block.shape[1])
        return torch.from_numpy(above), torch.from_numpy(np.concatenate(near))
    values = scores[query]
    above = values > score + tolerance
    return above.sum(1), ((values >= score - tolerance) ^ above).reshape(-1).nonzero(as_tuple=True)[0]


def count_ranked_above(
    scores: torch.Tensor,
    query_global: torch.Tensor,
    block_global: torch.Tensor,
    block_keys: torch.Tensor,
    positive_query: torch.Tensor,
    positive_score: torch.Tensor,
    positive_key: torch.Tensor,
    block_double: torch.Tensor | None = None,
    listed: TopK | None = None,
    floor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """How many rows of a gallery block come before each positive in the global order.

    `scores` [Q, G] is `block_scores(query_global, block_global)`; positive p
    belongs to query `positive_query[p]`, has exact score `positive_score[p]` (pair_scores)
    and tie key `positive_key[p]`; `block_double` as `block_top_k` takes it. Summed over every
    block, plus one, this is the positive's full-gallery global rank. Returns [P] int64.

    `listed` is `block_top_k`'s list of the same queries over this block (cut at `floor`): a
    positive that every row missing from its query's list comes after is counted off the list
    (with a trained model, nearly every positive: they rank near the top); the others by
    comparing its query's scores over the whole block (all of them in random data).
    """
    counts = torch.zeros(len(positive_query), dtype=torch.int64, device=scores.device)
    todo = torch.arange(len(positive_query), device=scores.device)
    if listed is not None and len(positive_query):
        on_list, listed_before = _counted_on_list(listed, floor, scores.shape[1], positive_query, positive_score, positive_key)
        counts[on_list] = listed_before[on_list]
        todo = todo[~on_list]
    tolerance = score_tolerance(query_global.shape[1])
    width = scores.shape[1]
    for start in range(0, len(todo), COUNT_CHUNK):
        index = todo[start:start + COUNT_CHUNK]
        query, score, key = positive_query[index], positive_score[index], positive_key[index]
        above, near = _above_and_near(scores, query, score[:, None], tolerance)
        # Rows within the tolerance of a positive's score (the positive itself among them when it
        # is in this block) are decided exactly: ~20 a positive scoring near the middle of a
        # 50k-row block of random vectors, where rows are densest; a few near the top.
        pair, row = (near // width).to(scores.device), (near % width).to(scores.device)
        other = block_keys[row] != key[pair]  # never the positive itself
        pair, row = pair[other], row[other]
        if len(pair):
            exact = block_pair_scores(query_global, block_global, query[pair], row, block_double)
            before = (exact > score[pair]) | ((exact == score[pair]) & (block_keys[row] < key[pair]))
            above.index_add_(0, pair, before.long())
        counts[index] = above
    return counts


def _counted_on_list(
    listed: TopK, floor: tuple[torch.Tensor, torch.Tensor] | None, rows: int, query: torch.Tensor, score: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per positive: whether every block row before it is on its query's list, and how many
    listed rows come before it. A row missing from a list comes after its last entry (the list
    is the block's top k of the rows at or before the floor), so a positive with a listed row
    at or after it is decided; so is one at or before the floor when fewer than k rows made
    the list (all rows at or before the floor did), and any positive when every row did."""
    scores, keys = listed.scores[query], listed.keys[query]
    before = (scores > score[:, None]) | ((scores == score[:, None]) & (keys < key[:, None]))  # padding (-inf) never is
    count, length = before.sum(1), torch.isfinite(scores).sum(1)
    decided = (count < length) | (length == rows)
    if floor is not None:
        within = at_or_before(score[:, None], key[:, None], floor[0][query], floor[1][query])[:, 0]
        decided |= (length < scores.shape[1]) & within
    return decided, count
