"""Retrieval metrics exactly as DESIGN.md ("Metrics") pins them: R@K and mAP.

A ranking is given per query as a boolean row `is_match[q, k]` (is the gallery image at
0-based position k of the item of query q?) cut at the evaluation depth, plus
`positives[q]` = |P|, the number of gallery images of the query's item. Definitions:

- **R@K**: share of queries with at least one match among the first K positions.
- **AP** = (1/|P|) * sum over match positions k (1-based) of precision@k; a positive
  below the evaluation depth is simply absent from the row, so it counts as not
  retrieved. **mAP** is the mean of AP over queries.
- A query with |P| = 0 (its item has no gallery image) is excluded from both metrics
  and counted as `excluded_queries`.

`RetrievalMetrics` accumulates block by block, so a queries x gallery matrix is never
needed in one piece; `dense_matches` builds one padded block from ranked rows, and
`rank_metrics` computes the same pieces from nothing but the full-gallery rank of every
positive (the positives table `mga search` writes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mga.errors import InputError

DEFAULT_KS: tuple[int, ...] = (1, 10, 20, 30, 40, 50)


def dense_matches(
    query_index: np.ndarray, position: np.ndarray, is_match: np.ndarray, num_queries: int, depth: int
) -> np.ndarray:
    """Scatter ranked rows into a `[num_queries, depth]` boolean block.

    Row i says the gallery image at 0-based `position[i]` of query `query_index[i]` is a
    match or not. Queries with fewer than `depth` rows are padded with False (not
    retrieved); rows at or below the depth are dropped (DESIGN.md: a positive below
    the evaluation depth counts as not retrieved).
    """
    block = np.zeros((num_queries, depth), dtype=bool)
    keep = (position < depth) & is_match
    block[query_index[keep], position[keep]] = True
    return block


def first_match_rank(is_match: np.ndarray) -> np.ndarray:
    """1-based rank of each query's first match, 0 when there is none within the depth.

    R@K counts a query as a hit exactly when 1 <= first_match_rank <= K.
    """
    is_match = np.asarray(is_match, dtype=bool)
    found = is_match.any(axis=1)
    return np.where(found, is_match.argmax(axis=1) + 1, 0).astype(np.int64)


def average_precision(is_match: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AP per query = (1/|P|) * sum over match ranks k of precision@k; NaN where |P| = 0.

    Raises ValueError when a row holds more matches than |P|: the rankings and the
    positive counts then disagree and every AP would be wrong.
    """
    is_match = np.asarray(is_match, dtype=bool)
    positives = np.asarray(positives, dtype=np.int64)
    matches = is_match.sum(axis=1)
    if np.any(matches > positives):
        worst = int(np.argmax(matches - positives))
        raise ValueError(
            f"query row {worst} has {int(matches[worst])} matches but only {int(positives[worst])} positives"
        )
    hits = np.cumsum(is_match, axis=1)
    precision_at_k = hits / np.arange(1, is_match.shape[1] + 1)
    summed = np.where(is_match, precision_at_k, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(positives > 0, summed / np.maximum(positives, 1), np.nan)


def rank_metrics(
    query_index: np.ndarray, rank: np.ndarray, num_queries: int, depth: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-match rank, AP and |P| per query from the 1-based ranks of its positives.

    Row i says a positive of query `query_index[i]` sits at `rank[i]` (ranks of one query
    are distinct; 0 means not ranked at all, e.g. missed by an approximate shortlist).
    Every positive of a query is given, so |P| is its row count; a rank beyond `depth`,
    or 0, counts as not retrieved. With the positives sorted by rank, the j-th
    contributes precision j / rank_j: AP = (1/|P|) * sum over retrieved positives of that.
    Returns (first_rank [Q] with 0 for none within the depth, AP [Q] with NaN where |P| = 0,
    |P| [Q]).
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    rank = np.asarray(rank, dtype=np.int64)
    if np.any(rank < 0):
        raise ValueError(f"ranks are 1-based (0: not ranked), got {int(rank.min())}")
    rank = np.where(rank == 0, np.iinfo(np.int64).max, rank)  # not ranked: below everything
    order = np.lexsort((rank, query_index))
    query_index, rank = query_index[order], rank[order]
    ranked = rank < np.iinfo(np.int64).max
    if np.any((query_index[1:] == query_index[:-1]) & (rank[1:] == rank[:-1]) & ranked[1:]):
        raise ValueError("two positives of one query share a rank")
    positives = np.bincount(query_index, minlength=num_queries)
    offsets = np.concatenate([[0], np.cumsum(positives)])
    retrieved = ranked & (rank <= (depth if depth is not None else np.iinfo(np.int64).max))
    hits_so_far = np.arange(len(rank)) - offsets[query_index] + 1
    summed = np.bincount(query_index, weights=np.where(retrieved, hits_so_far / rank, 0.0), minlength=num_queries)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(positives > 0, summed / np.maximum(positives, 1), np.nan)
    first_rank = np.zeros(num_queries, dtype=np.int64)
    has_rows = positives > 0
    first = rank[offsets[:-1][has_rows]]
    first_rank[has_rows] = np.where(retrieved[offsets[:-1][has_rows]], first, 0)
    return first_rank, ap, positives


class RetrievalMetrics:
    """Streaming R@K and mAP over blocks of queries (DESIGN.md, "Metrics").

    Feed either whole match blocks (`update`) or per-query pieces computed elsewhere,
    e.g. in Ray tasks (`add`); the result does not depend on how queries are blocked.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        if not ks or any(k < 1 for k in ks):
            raise InputError(f"ks must be positive integers, got {list(ks)}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.queries = 0
        self.excluded_queries = 0
        self._hits = dict.fromkeys(self.ks, 0)
        self._ap_sums: list[float] = []

    def update(self, is_match: np.ndarray, positives: np.ndarray) -> None:
        """Add a block: `is_match` [Q, depth] booleans, `positives` [Q] = |P| per query."""
        is_match = np.asarray(is_match, dtype=bool)
        positives = np.asarray(positives, dtype=np.int64)
        if is_match.ndim != 2 or positives.shape != (is_match.shape[0],):
            raise ValueError(
                f"expected is_match [Q, depth] and positives [Q], got {is_match.shape} and {positives.shape}"
            )
        self.add(first_match_rank(is_match), average_precision(is_match, positives), positives)

    def add(self, first_rank: np.ndarray, ap: np.ndarray, positives: np.ndarray) -> None:
        """Add per-query pieces: `first_match_rank`, `average_precision` and |P|."""
        first_rank = np.asarray(first_rank, dtype=np.int64)
        ap = np.asarray(ap, dtype=np.float64)
        included = np.asarray(positives) > 0
        self.excluded_queries += int((~included).sum())
        self.queries += int(included.sum())
        ranks = first_rank[included]
        for k in self.ks:
            self._hits[k] += int(((ranks >= 1) & (ranks <= k)).sum())
        self._ap_sums.append(float(ap[included].sum()))

    def result(self) -> dict[str, float | int]:
        """`R@K` for every K and `mAP` as fractions in [0, 1] (0.0 with no query), plus counts."""
        denominator = max(self.queries, 1)
        result: dict[str, float | int] = {f"R@{k}": self._hits[k] / denominator for k in self.ks}
        result["mAP"] = math.fsum(self._ap_sums) / denominator
        result["queries"] = self.queries
        result["excluded_queries"] = self.excluded_queries
        return result
