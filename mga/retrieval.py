"""Rank, then rerank: the one retrieval step that training validation and `mga search` share.

A query's ranking over a gallery (DESIGN.md, "Metrics") is built in three steps:

1. **Global order.** Gallery images by S_global (eq. 3: the inner product of L2-normalised
   global features) descending; ties by the image's tie key ascending (mga.tie_keys: a 63-bit
   hash of its id, so the order does not depend on how the gallery is laid out, split into
   blocks or spread over workers).
2. **Rerank of the head.** The first `rerank_top` of that order are reordered by the fused
   S = alpha * S_global + (1 - alpha) * S_token (Sec. 2.3); ties keep their global order.
3. **The tail** follows the head in global order. Its fused score is written with S_token at
   its minimum (-2): a lower bound of what a rerank could give it.

A positive's full-gallery rank is 1 + the number of gallery images before it in the global
order; below the head its reranked rank equals the global one, inside the head it is its
place after the rerank.

The shortlist is exact and blocked (mga.shortlist: a gallery of any size, block by block, nothing
larger than one queries x block score matrix at a time) and every decision in it is the same
whatever the block shape, the device or the BLAS library (mga.global_scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mga.shortlist import TopK, exact_top_k
from mga.similarity import TOKEN_SIMILARITY_MIN, fuse_similarity


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
