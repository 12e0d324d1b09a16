"""One query chunk searched against the gallery: the two scans (gallery_scan) or a faiss
shortlist (approximate), the rerank (mga.retrieval), and the chunk's rankings and positives
rows. `mga search` calls it for every chunk of its queries, `mga query` for its photos."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mga.retrieval import rerank, reranked_ranks
from pipelines.schemas import POSITIVES, RANKINGS, token_columns
from pipelines.search.gallery_scan import LocalScanner, ScannerPool, Shared, ShortlistMerge, Shortlisted
from pipelines.search.queries import Gallery, QueryChunk


@dataclass
class RankedChunk:
    """A searched chunk: its rankings rows (RANKINGS), positives rows (POSITIVES), the depth
    ranked, the reranked depth and the gallery's size."""

    rankings: pa.Table
    positives: pa.Table
    depth: int
    head: int
    gallery_rows: int


@dataclass(frozen=True)
class ChunkSearch:
    """How every query chunk of a search is searched: against `gallery`, on `pool`'s scanners,
    the exact top-`depth` (or `index`'s approximate one: (faiss index, ids, items)), the first
    `rerank_top` reranked by S with `alpha`, `rerank_batch` pairs an ATA call."""

    gallery: Gallery
    pool: ScannerPool | LocalScanner
    depth: int
    rerank_top: int
    alpha: float
    block_rows: int
    rerank_batch: int
    index: tuple[Any, pa.Array, pa.Array] | None = None

    def __call__(self, chunk: QueryChunk) -> RankedChunk:
        shared = self.pool.share(chunk.scan_arrays())  # once for both scans
        shortlisted = self.shortlist(chunk, shared, self.depth)
        depth = shortlisted.top.rows.shape[1]
        head = min(self.rerank_top, depth) if self.alpha < 1.0 else 0
        token_scores = self.token_scan(shared, len(chunk), shortlisted, head) if head else torch.zeros(len(chunk), 0)
        return RankedChunk(*rank_chunk(chunk, shortlisted, token_scores, self.alpha), depth, head, shortlisted.gallery_rows)

    def shortlist(self, chunk: QueryChunk, shared: Shared | None, depth: int, exact: bool = False) -> Shortlisted:
        """Pass 1: the chunk's top-`depth` in global order and each positive's full-gallery global rank."""
        if self.index is not None and not exact:
            from pipelines.search.approximate import approximate_shortlist

            return approximate_shortlist(*self.index, chunk, depth)
        shared = shared or self.pool.share(chunk.scan_arrays())
        merge = ShortlistMerge(len(chunk), depth, len(chunk.positives.query))
        for blocks in self.pool.map("shortlist", self.gallery.pieces(), shared, depth, self.block_rows):
            for block in blocks:
                merge.add(block)
        return merge.result(self.gallery.table.uri)

    def token_scan(self, shared: Shared, count: int, shortlisted: Shortlisted, head: int) -> torch.Tensor:
        """Pass 2: S_token of each query with the first `head` rows of its shortlist, [Q, head]."""
        scores = torch.full((count, head), float("nan"))
        rows = shortlisted.top.rows[:, :head].reshape(-1).numpy()
        pairs = pa.table(
            {
                "gallery_id": shortlisted.ids.take(pa.array(rows)),
                "query": pa.array(np.repeat(np.arange(count), head), pa.int32()),
                "head": pa.array(np.tile(np.arange(head), count), pa.int32()),
            }
        )
        pieces = self.gallery.pieces(("image_id", pc.unique(pairs.column("gallery_id")).to_pylist()))
        names = token_columns(self.gallery.table.info)
        for scored in self.pool.map("score_tokens", pieces, shared, self.pool.share(pairs), names, self.rerank_batch):
            query, position = (torch.from_numpy(scored[name].astype(np.int64)) for name in ("query", "head"))
            scores[query, position] = torch.from_numpy(scored["score_token"].copy())  # a copy: object store arrays are read-only
        missing = int(torch.isnan(scores).sum())
        if missing:
            raise RuntimeError(f"search: {missing} shortlisted pairs got no token score (gallery rows vanished from {self.gallery.table.uri}?)")
        return scores


def rank_chunk(chunk: QueryChunk, shortlisted: Shortlisted, token_scores: torch.Tensor, alpha: float) -> tuple[pa.Table, pa.Table]:
    """Rerank the chunk's shortlists (mga.retrieval) into its rankings and positives rows.

    An unlabelled query (null item) has null `is_match` and `query_positives`; a labelled
    one's `is_match` says whether the result is of its item."""
    ranking = rerank(shortlisted.top, token_scores, alpha)
    count, depth = ranking.rows.shape
    rows = pa.array(ranking.rows.reshape(-1).numpy())
    query_rows = pa.array(np.repeat(np.arange(count), depth))
    positive_query = chunk.positives.query
    rank_global = torch.from_numpy(shortlisted.rank_global)
    rank_reranked = reranked_ranks(rank_global, torch.from_numpy(positive_query), ranking.head_order)
    query_items, gallery_items = chunk.items.take(query_rows), shortlisted.items.take(rows)
    labelled = pc.is_valid(query_items)
    unlabelled_queries = ~np.asarray(pc.is_valid(chunk.items))
    rankings = pa.table(
        {
            "query_id": chunk.ids.take(query_rows),
            "query_item_id": query_items,
            "rank": pa.array(np.tile(np.arange(1, depth + 1), count), pa.int32()),
            "gallery_id": shortlisted.ids.take(rows),
            "gallery_item_id": gallery_items,
            "score_global": pa.array(ranking.score_global.reshape(-1).numpy(), pa.float32()),
            "score_token": pa.array(ranking.score_token.reshape(-1).numpy(), pa.float32(), from_pandas=True),  # NaN -> null
            "score": pa.array(ranking.score.reshape(-1).numpy(), pa.float32()),
            "is_match": pc.if_else(labelled, pc.fill_null(pc.equal(gallery_items, query_items), False), pa.scalar(None, pa.bool_())),
            "query_positives": pa.array(
                np.repeat(np.bincount(positive_query, minlength=count), depth), pa.int32(), mask=np.repeat(unlabelled_queries, depth)
            ),
        },
        schema=RANKINGS,
    )
    positives = pa.table(
        {
            "query_id": chunk.ids.take(pa.array(positive_query)),
            "gallery_id": chunk.positives.gallery_id,
            # 0 = below an approximate shortlist: not retrieved (null).
            "rank_global": pa.array(rank_global.numpy(), pa.int64(), mask=rank_global.numpy() == 0),
            "rank_reranked": pa.array(rank_reranked.numpy(), pa.int64(), mask=rank_reranked.numpy() == 0),
        },
        schema=POSITIVES,
    )
    return rankings, positives
