"""One query chunk searched against the gallery: the two scans (gallery_scan) or a faiss
shortlist (approximate), the rerank (mga.retrieval), and the chunk's rankings and positives
rows. `mga search` calls it for every chunk of its queries, `mga query` for its photos."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mga.retrieval import rerank, reranked_ranks
from pipelines.schemas import POSITIVES, RANKINGS, SHORTLISTS, token_columns
from pipelines.search.gallery_scan import LocalScanner, ScannerPool, Shared
from pipelines.search.shortlist_merge import ShortlistMerge, Shortlisted
from pipelines.search.queries import MIN_PIECE_ROWS, PIECE_ROWS, Gallery, QueryChunk, Selection


@dataclass
class RankedChunk:
    """A searched chunk: its rankings rows (RANKINGS), positives rows (POSITIVES), shortlists
    rows (SHORTLISTS: the global-order list kept for `--incremental`), the depth ranked, the
    reranked depth and the gallery's size."""

    rankings: pa.Table
    positives: pa.Table
    shortlists: pa.Table
    depth: int
    head: int
    gallery_rows: int


@dataclass
class ScanStats:
    """What a search's scans have cost so far: seconds of the shortlist and token scans (on the
    driver's clock, actors working in parallel), the token columns' bytes read (pipelines.token_ranges),
    and the gallery pieces the shortlist scans scored and of them those read from the table (not kept by the scanner)."""

    shortlist_s: float = 0.0
    token_s: float = 0.0
    token_bytes: int = 0
    pieces_scanned: int = 0
    pieces_read: int = 0


# The token scan's pieces are a quarter of the shortlist's: on a CPU, ATA on a piece's pairs costs
# ~2.5x its shortlist scan, and the last piece to finish holds up the chunk (250k x 10^4 in ten
# pieces: 57k or 43k pairs each, one actor idle for the last 3 s) ...
TOKEN_PIECE_SPLIT = 4
# ... unless that leaves a piece fewer pairs than this many ATA calls: every call is padded to
# the batch (4,096 pairs on a GPU), and sparse pairs (a large gallery, few queries) are cheap to scan.
TOKEN_PIECE_CALLS = 4


def busy_actors(gallery_rows: int) -> int:
    """The most scan actors a gallery keeps busy: one per smallest piece (more would have none to scan)."""
    return max(1, -(-gallery_rows // MIN_PIECE_ROWS))


def token_piece_rows(piece_rows: int, pairs: int, gallery_rows: int, rerank_batch: int) -> int:
    """Rows a token-scan piece holds: a TOKEN_PIECE_SPLIT-th of a shortlist piece, or where the
    pairs are sparse enough rows for TOKEN_PIECE_CALLS full ATA calls; between MIN_PIECE_ROWS and `piece_rows`."""
    for_calls = -(-TOKEN_PIECE_CALLS * rerank_batch * gallery_rows // max(pairs, 1))
    return min(max(piece_rows, MIN_PIECE_ROWS), max(MIN_PIECE_ROWS, piece_rows // TOKEN_PIECE_SPLIT, for_calls))


def piece_rows_for(gallery_rows: int, workers: int) -> int:
    """Rows a scan piece holds: about four pieces an actor (the last ones then even out the
    actors' loads), between MIN_PIECE_ROWS and PIECE_ROWS."""
    return max(MIN_PIECE_ROWS, min(PIECE_ROWS, gallery_rows // (4 * max(workers, 1))))


@dataclass(frozen=True)
class ChunkSearch:
    """How every query chunk of a search is searched: against `gallery`, on `pool`'s scanners,
    the exact top-`depth` (or `index`'s approximate one: (faiss index, ids, items)), the first
    `rerank_top` reranked by S with `alpha`, `rerank_batch` pairs an ATA call in `rerank_precision`
    ("float32" or "bfloat16"). The shortlist
    goes `reserve` rows deeper than the rankings: what an incremental search draws on when the
    gallery loses rows. With `keep_gallery` (more than one chunk to search) the scanners keep
    the gallery rows they read for the next chunks, as far as their memory budget goes; with
    `keep_changes` they keep the rows of `within` scans (an incremental run's added and removed
    rows, scanned again for every chunk of standing queries). The gallery is scanned in pieces
    of at most `piece_rows` rows (`piece_rows_for`: fine enough that every actor gets several), the
    token scan in smaller ones (`token_piece_rows`)."""

    gallery: Gallery
    pool: ScannerPool | LocalScanner
    depth: int
    rerank_top: int
    alpha: float
    block_rows: int
    rerank_batch: int
    index: tuple[Any, pa.Array, pa.Array] | None = None
    reserve: int = 0
    keep_gallery: bool = False
    keep_changes: bool = False
    piece_rows: int = PIECE_ROWS
    rerank_precision: str = "float32"
    stats: ScanStats = field(default_factory=lambda: ScanStats())

    def __call__(self, chunk: QueryChunk) -> RankedChunk:
        shared = self.pool.share(chunk.scan_arrays())  # once for both scans
        shortlisted = self.shortlist(chunk, shared, self.depth + self.reserve)
        width = shortlisted.top.rows.shape[1]
        head = min(self.rerank_top, width) if self.alpha < 1.0 else 0
        query_rows = np.repeat(np.arange(len(chunk)), head)
        candidates = shortlisted.ids.take(pa.array(shortlisted.top.rows[:, :head].reshape(-1).numpy()))
        token_scores = torch.from_numpy(self.score_pairs(shared, query_rows, candidates).reshape(len(chunk), head))
        rankings, positives, shortlists = rank_chunk(chunk, shortlisted, token_scores, head, self.alpha, min(self.depth, width))
        return RankedChunk(rankings, positives, shortlists, min(self.depth, width), head, shortlisted.gallery_rows)

    def shortlist(self, chunk: QueryChunk, shared: Shared | None, depth: int, exact: bool = False, within: Selection | None = None) -> Shortlisted:
        """Pass 1: the chunk's top-`depth` in global order and each positive's global rank over
        the gallery (or over the rows of `within`, another selection of the same table's files)."""
        if self.index is not None and not exact:
            from pipelines.search.approximate import approximate_shortlist

            return approximate_shortlist(*self.index, chunk, depth)
        started = time.perf_counter()
        shared = shared or self.pool.share(chunk.scan_arrays())
        rows = within or self.gallery
        merge = ShortlistMerge(len(chunk), depth, len(chunk.positives.query))
        pieces = rows.pieces(max_rows=self.piece_rows)
        named_filter = None if within is None else (within.key, within.where.expression)
        for blocks in self.pool.map("shortlist", pieces, shared, depth, self.block_rows, named_filter, self.keep_changes if within is not None else self.keep_gallery,
                                    affinity=True, latest=merge.floor):
            self.stats.pieces_scanned += 1
            self.stats.pieces_read += int(blocks[0]["read"])
            for block in blocks:
                merge.add(block)
        self.stats.shortlist_s += time.perf_counter() - started
        return merge.result(rows.table.uri, allow_empty=within is not None)

    def score_pairs(self, shared: Shared, query_rows: np.ndarray, gallery_ids: pa.Array) -> np.ndarray:
        """Pass 2: S_token of each (chunk row `query_rows[i]`, gallery image `gallery_ids[i]`) pair,
        read from the gallery pieces that hold the images ([P] float32)."""
        scores = np.full(len(query_rows), np.nan, np.float32)
        if not len(query_rows):
            return scores
        started = time.perf_counter()
        pairs = pa.table({"gallery_id": gallery_ids, "query": pa.array(query_rows, pa.int32())})
        rows = token_piece_rows(self.piece_rows, len(query_rows), self.gallery.table.rows, self.rerank_batch)
        pieces = self.gallery.pieces(("image_id", pc.unique(gallery_ids).to_pylist()), max_rows=rows)
        names = token_columns(self.gallery.table.info)
        for scored in self.pool.map("score_tokens", pieces, shared, self.pool.share(pairs), names, self.rerank_batch, self.rerank_precision):
            scores[scored["pair"]] = scored["score_token"]
            self.stats.token_bytes += scored["bytes_read"]
        self.stats.token_s += time.perf_counter() - started
        missing = int(np.isnan(scores).sum())
        if missing:
            raise RuntimeError(f"search: {missing} shortlisted pairs got no token score (gallery rows vanished from {self.gallery.table.uri}?)")
        return scores


def rank_chunk(chunk: QueryChunk, shortlisted: Shortlisted, token_scores: torch.Tensor, head: int, alpha: float, depth: int,
               written: np.ndarray | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Rerank the chunk's shortlists (mga.retrieval) into its rankings (the first `depth`),
    positives and shortlists rows.

    `token_scores` [Q, N >= head] holds S_token of each query's first N shortlisted rows; the
    first `head` are reranked. An unlabelled query (null item) has null `is_match` and
    `query_positives`; a labelled one's `is_match` says whether the result is of its item.
    Shortlist entries scored -inf are padding (a list shorter than the others) and not written.
    With `written` [Q] (bool), only those queries' rows are."""
    ranking = rerank(shortlisted.top, token_scores[:, :head], alpha)
    count = len(chunk)
    rows = pa.array(ranking.rows[:, :depth].reshape(-1).numpy())
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
            "score_global": pa.array(ranking.score_global[:, :depth].reshape(-1).numpy(), pa.float32()),
            "score_token": pa.array(ranking.score_token[:, :depth].reshape(-1).numpy(), pa.float32(), from_pandas=True),  # NaN -> null
            "score": pa.array(ranking.score[:, :depth].reshape(-1).numpy(), pa.float32()),
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
            "score_global": pa.array(chunk.positives.score, pa.float32()),
        },
        schema=POSITIVES,
    )
    if written is not None:
        rankings, positives = rankings.filter(pa.array(np.repeat(written, depth))), positives.filter(pa.array(written[positive_query]))
    return rankings, positives, shortlist_rows(chunk.ids, shortlisted, token_scores, written)


def shortlist_rows(query_ids: pa.Array, shortlisted: Shortlisted, token_scores: torch.Tensor, written: np.ndarray | None = None) -> pa.Table:
    """The shortlists rows (SHORTLISTS) of queries `query_ids` (those `written` [Q] marks, if
    given): every entry of each global-order list that is not padding, with S_token where
    `token_scores` [Q, N] has it (its first N)."""
    top = shortlisted.top
    count, width = top.scores.shape
    score_token = torch.full((count, width), float("nan"))
    score_token[:, :token_scores.shape[1]] = token_scores
    kept = torch.isfinite(top.scores).reshape(-1).numpy()
    if written is not None:
        kept &= np.repeat(written, width)
    rows = pa.array(top.rows.reshape(-1).numpy()[kept])
    return pa.table(
        {
            "query_id": query_ids.take(pa.array(np.repeat(np.arange(count), width)[kept])),
            "gallery_id": shortlisted.ids.take(rows),
            "gallery_item_id": shortlisted.items.take(rows),
            "score_global": pa.array(top.scores.reshape(-1).numpy()[kept], pa.float32()),
            "score_token": pa.array(score_token.reshape(-1).numpy()[kept], pa.float32(), from_pandas=True),
        },
        schema=SHORTLISTS,
    )
