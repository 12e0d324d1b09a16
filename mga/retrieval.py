"""Rank, then rerank: the one retrieval step that training validation and `mga search` share.

A query's ranking over a gallery (DESIGN.md, "Metrics") is built in three steps:

1. **Global order.** Gallery images by S_global (eq. 3: the inner product of L2-normalised
   global features) descending; ties by the image's tie key ascending (`tie_keys`: a 63-bit
   hash of its id, so the order does not depend on how the gallery is laid out, split into
   blocks or spread over workers).
2. **Rerank of the head.** The first `rerank_top` of that order are reordered by the fused
   S = alpha * S_global + (1 - alpha) * S_token (Sec. 2.3); ties keep their global order.
3. **The tail** follows the head in global order. Its fused score is written with S_token at
   its minimum (-2): a lower bound of what a rerank could give it.

A positive's full-gallery rank is 1 + the number of gallery images before it in the global
order; below the head its reranked rank equals the global one, inside the head it is its
place after the rerank.

The shortlist is exact and blocked: a gallery of any size is scanned block by block
(`block_top_k`, `merge_top_k`, `count_ranked_above`), so nothing larger than one queries x
block score matrix exists at a time, on the CPU or a GPU, at any depth. Scores come from one
fp32 matmul per block; the few that fall within the matmul's error bound of a decision (the
k-th score, a positive's score) are recomputed exactly (`pair_scores`), so every decision is
the same whatever the block shape, the device or the BLAS library.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mga.similarity import TOKEN_SIMILARITY_MIN, fuse_similarity

# Extra candidates a block's fast top-k takes beyond k, so near-ties at the k-th score are
# usually settled without a second pass.
TOP_K_MARGIN = 16
# Rows of a positives x block comparison held at once, and float64 elements of an exact
# recomputation, on a CPU and on a GPU (bound memory, not results; a GPU pays per launch).
COUNT_CHUNK = 128
# Positives' rows a CPU compares at once: 16 of a 50k-row block (3.2 MB) stay in cache (0.21 -> 0.13 s
# for 3,800 positives against 50k rows; 128 at once spill it).
COUNT_GROUP = 16
EXACT_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# float64 elements of a CPU pair_scores batch: two such batches stay in a 2 MB cache.
PAIR_ELEMENTS = 1 << 17


def tie_keys(ids: Iterable[str]) -> np.ndarray:
    """A fixed 63-bit integer per gallery id (BLAKE2b), the tie rule's second key."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1 for i in ids),
        dtype=np.int64,
    )


def pair_scores(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Eq. (3) for aligned rows, [..., D] x [..., D] (broadcast) -> [...] float32, accumulated in float64.

    The canonical score: a float32 product is exact in float64, so the sum rounds to the
    same float32 whatever order a device sums in. On a CPU numpy's einsum, rows a cache-sized
    batch at a time (9x torch's multiply-and-sum there, same values).
    """
    if first.device.type != "cpu":
        return (first.double() * second.double()).sum(-1).float()
    first, second = torch.broadcast_tensors(first.detach().float(), second.detach().float())
    shape, width = first.shape[:-1], first.shape[-1]
    left, right = first.reshape(-1, width).numpy(), second.reshape(-1, width).numpy()
    scores = np.empty(len(left), dtype=np.float32)
    step = max(1, PAIR_ELEMENTS // max(width, 1))
    for start in range(0, len(left), step):
        part = slice(start, start + step)
        scores[part] = np.einsum("ij,ij->i", left[part].astype(np.float64), right[part].astype(np.float64))
    return torch.from_numpy(scores).reshape(shape)


def block_pair_scores(
    query_global: torch.Tensor, block_global: torch.Tensor, query: torch.Tensor, row: torch.Tensor, block_double: torch.Tensor | None = None
) -> torch.Tensor:
    """`pair_scores` of the pairs (query_global[query[p]], block_global[row[p]]) of one
    queries x block product ([P] float32).

    On a CPU, given the block in float64 (`block_double`, converted once for all its query
    tiles), one sampled float64 matmul over the pairs' pattern (a CSR tensor): the same float64
    sums rounded to float32, without gathering a copy of each pair's rows (~7x faster at the
    ~150 pairs a query a block needs). Elsewhere the rows are gathered a bounded batch at a time.
    """
    if len(query) == 0:
        return torch.zeros(0, dtype=torch.float32, device=block_global.device)
    if block_double is None or block_global.device.type != "cpu":
        step = max(1, EXACT_ELEMENTS.get(block_global.device.type, EXACT_ELEMENTS["cpu"]) // block_global.shape[1])
        return torch.cat([pair_scores(query_global[query[start:start + step]], block_global[row[start:start + step]]) for start in range(0, len(query), step)])
    count, width = query_global.shape[0], block_double.shape[0]
    order = torch.argsort(query * width + row)  # CSR: by query, then row
    starts = torch.zeros(count + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(query, minlength=count), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested (tests/test_retrieval_step.py)
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(starts, row[order], torch.zeros(len(order), dtype=torch.float64), size=(count, width), check_invariants=False)
        sums = torch.sparse.sampled_addmm(pattern, query_global.double(), block_double.t(), beta=0.0).values()
    scores = torch.empty(len(order), dtype=torch.float32)
    scores[order] = sums.float()
    return scores


def score_tolerance(dim: int) -> float:
    """Bound on |fp32 matmul - pair_scores| for unit vectors of width `dim`, plus one ulp at 1."""
    return (dim + 4) * 2.0**-24


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """fp32 matmul without TF32 (a training process may have enabled it): the tolerance assumes fp32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def block_scores(query_global: torch.Tensor, block_global: torch.Tensor) -> torch.Tensor:
    """S_global of every query with every row of a block, [Q, G], by one fp32 matmul.

    On a CPU numpy's (OpenBLAS) sgemm: 15-20% faster than torch's at the scans' shapes (a
    1,024-query tile x 21-50k rows, one thread: 0.225 vs 0.28 s on an AMD EPYC, 0.525 vs 0.62 s
    on an Intel Xeon); any fp32 matmul is within `score_tolerance` of the exact scores."""
    if query_global.device.type == "cpu":
        return torch.from_numpy(query_global.detach().float().numpy() @ block_global.detach().float().numpy().T)
    with _full_precision_matmul():
        return query_global.float() @ block_global.float().t()


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
) -> torch.Tensor:
    """How many rows of a gallery block come before each positive in the global order.

    `scores` [Q, G] is `block_scores(query_global, block_global)`; positive p
    belongs to query `positive_query[p]`, has exact score `positive_score[p]` (pair_scores)
    and tie key `positive_key[p]`; `block_double` as `block_top_k` takes it. Summed over every
    block, plus one, this is the positive's full-gallery global rank. Returns [P] int64.
    """
    tolerance = score_tolerance(query_global.shape[1])
    width = scores.shape[1]
    counts = torch.zeros(len(positive_query), dtype=torch.int64, device=scores.device)
    for start in range(0, len(positive_query), COUNT_CHUNK):
        part = slice(start, start + COUNT_CHUNK)
        query, score, key = positive_query[part], positive_score[part], positive_key[part]
        counts[part], near = _above_and_near(scores, query, score[:, None], tolerance)
        # Rows within the tolerance of a positive's score (the positive itself among them when it
        # is in this block) are decided exactly: ~20 a positive scoring near the middle of a
        # 50k-row block of random vectors, where rows are densest; a few near the top.
        pair, row = (near // width).to(scores.device), (near % width).to(scores.device)
        other = block_keys[row] != key[pair]  # never the positive itself
        pair, row = pair[other], row[other]
        if len(pair):
            exact = block_pair_scores(query_global, block_global, query[pair], row, block_double)
            before = (exact > score[pair]) | ((exact == score[pair]) & (block_keys[row] < key[pair]))
            counts[part].index_add_(0, pair, before.long())  # a slice is a view: adds in place
    return counts


@dataclass
class Ranking:
    """Each query's ranked list, [Q, depth] each: `rows` (handles from the shortlist),
    `score_global`, `score_token` (NaN below the reranked head), fused `score`,
    `global_rows` (the same handles in global order, before the rerank) and `head_order`
    [Q, N]: the shortlist positions of the reranked head, in reranked order."""

    rows: torch.Tensor
    score_global: torch.Tensor
    score_token: torch.Tensor
    score: torch.Tensor
    global_rows: torch.Tensor
    head_order: torch.Tensor


def rerank(shortlist: TopK, token_scores: torch.Tensor, alpha: float) -> Ranking:
    """Steps 2-3: rerank the head of a global-order shortlist by the fused score S.

    `token_scores` [Q, N] is S_token of each query with its first N shortlisted rows
    (N = the rerank depth, possibly 0). Ties in S keep the global order.
    """
    count, depth = shortlist.scores.shape
    top = token_scores.shape[1]
    head_global = shortlist.scores[:, :top]
    fused_head = fuse_similarity(head_global, token_scores.to(head_global.dtype), alpha)
    head_order = torch.sort(fused_head, dim=1, descending=True, stable=True).indices
    tail = torch.arange(top, depth, device=head_order.device).expand(count, -1)
    order = torch.cat([head_order, tail], dim=1)
    score_token = torch.cat([token_scores.to(head_global.dtype), torch.full_like(shortlist.scores[:, top:], float("nan"))], dim=1)
    score_global = shortlist.scores.gather(1, order)
    score_token = score_token.gather(1, order)
    score = torch.where(torch.isnan(score_token), fuse_similarity(score_global, torch.full_like(score_global, TOKEN_SIMILARITY_MIN), alpha),
                        fuse_similarity(score_global, score_token, alpha))
    return Ranking(shortlist.rows.gather(1, order), score_global, score_token, score, shortlist.rows, head_order)


def reranked_ranks(global_rank: torch.Tensor, positive_query: torch.Tensor, head_order: torch.Tensor) -> torch.Tensor:
    """A positive's rank after the rerank: its place in its query's reranked head when its
    global rank is within the head, else its global rank (1-based, [P] int64; 0, "not
    ranked", stays 0)."""
    top = head_order.shape[1]
    place = torch.empty_like(head_order)
    place.scatter_(1, head_order, torch.arange(1, top + 1, device=head_order.device).expand_as(head_order))
    in_head = (global_rank >= 1) & (global_rank <= top)
    reranked = global_rank.clone()
    if bool(in_head.any()):
        reranked[in_head] = place[positive_query[in_head], global_rank[in_head] - 1]
    return reranked


def retrieve(
    query_global: torch.Tensor,
    gallery_global: torch.Tensor,
    gallery_keys: torch.Tensor,
    depth: int,
    rerank_top: int,
    alpha: float,
    token_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    gallery_block: int = 65536,
) -> Ranking:
    """Steps 1-3 for queries and a gallery held on one device (training validation).

    `token_scores(query_rows [B], gallery_rows [B, N])` gives S_token [B, N] of each query
    with its N candidates; `rows` in the result are gallery positions. The gallery is
    scanned in blocks of `gallery_block` rows.
    """
    shortlist = exact_top_k(query_global, gallery_global, gallery_keys, depth, gallery_block)
    top = min(rerank_top, shortlist.rows.shape[1])
    queries = torch.arange(query_global.shape[0], device=query_global.device)
    head = token_scores(queries, shortlist.rows[:, :top]) if top else shortlist.scores[:, :0]
    return rerank(shortlist, head, alpha)
