"""`mga search --incremental`: bring a rankings table up to the current versions of its gallery
and queries tables, with the rows a full search from scratch would write.

Every search keeps, beside the rankings, each query's **shortlist**: its list in global order
`reserve(depth)` rows deeper than the rankings, with S_token for the reranked head
(`<out>_shortlists`), and each positive's exact S_global (in `<out>_positives`). From the
Delta log and the rows' identity (search.changes) an incremental run knows which gallery rows
were removed (deleted, changed, filtered out) and added, and which queries; then:

- **New or changed queries** are searched against the whole gallery, as a full search would.
- **Standing queries** are updated. A stored list holds every gallery row at or before its
  last entry in the global order (or the whole gallery, when it is as long as the gallery
  was). Dropping the removed rows leaves every remaining row at or before that boundary; the
  added rows are scanned (their files only) for each query's top, and those at or before the
  boundary merged in (mga.shortlist.merge_known_top_k). The merged list is exactly the new
  gallery's top as deep as it reaches; a query whose list no longer reaches `--depth` is
  searched again in full. The head is reranked with the stored S_token and, for rows that
  lack one (added rows, rows moved up into the head), S_token computed from those rows' tokens.
- **Positives' full-gallery ranks** move by the rows that came and went ahead of them: the
  rank of a positive that stays is its old rank, minus the removed rows before it (their old
  features are read from the old version's files), plus the added rows before it (counted by
  the scan of the added rows, exactly as a full scan counts). A new positive of a standing
  query (an added image of its item) found in its merged list has its place there as its
  rank; one below it sends the query to a full search, which counts the whole gallery.

Hence the result equals a full search's: the same ranked rows, the same positives' ranks. The
run reads the files that changed (their identity columns; the added and removed rows' global
features), the stored shortlists and positives, the standing queries' features and the
tokens of the rows whose S_token is new, and commits the three tables once each, the
rankings last, naming the others' versions: a killed run leaves the rankings where they were,
and another search that commits first makes this one fail in one line. Nothing changed in
the selections: nothing is committed.

Any change of what the rankings were made with (tables, filters, model, depth, rerank,
alpha, an approximate index) or an old version that can no longer be read (vacuumed) makes
the run a full search, and the summary says why.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mga.shortlist import TopK, merge_known_top_k, order_by_score
from pipelines.schemas import POSITIVES, RANKINGS, SHORTLISTS, arrow_tie_keys
from pipelines.search.changes import RowChanges, VersionGone, row_changes
from pipelines.search.shortlist_merge import Shortlisted
from pipelines.search.queries import Gallery, Positives, QueryChunk, QuerySource
from pipelines.search.ranking import ChunkSearch, RankedChunk, rank_chunk
from pipelines.tables import Snapshot, TableNotFound, companion, open_table, read_table
from pipelines.storage import Location


def reserve(depth: int) -> int:
    """Shortlist rows kept below the rankings: a query loses rows to deletions before it needs a
    full search again (at 1% churn a night, a list of 150 loses ~1 a night and gains ~1)."""
    return max(8, depth // 2)


@dataclass(frozen=True)
class Previous:
    """The rankings at `--out` and the shortlists and positives they name."""

    rankings: Snapshot
    shortlists: Snapshot
    positives: Snapshot

    @property
    def info(self) -> dict[str, Any]:
        return self.rankings.info


def previous_search(out: Location, wanted: dict[str, Any]) -> Previous | str:
    """The search at `out` to update, or why a full search is needed instead: `wanted` are the
    settings of this run that must equal the previous run's (tables, filters, model, depth...)."""
    try:
        rankings = open_table(out)
    except TableNotFound:
        return f"no rankings at {out.uri} yet"
    info = rankings.info
    if info.get("table") != "rankings":
        return f"{out.uri} holds no rankings written by `mga search`"
    if not isinstance(info.get("shortlists"), dict) or not isinstance(info.get("positives"), dict):
        return f"{out.uri} version {rankings.version} was written before searches kept their shortlists"
    made_with = info.get("search") or {}
    for name, value in wanted.items():
        if made_with.get(name) != value:
            return f"{name} was {made_with.get(name)!r} for {out.uri} version {rankings.version}, now {value!r}"
    try:
        shortlists = open_table(companion(out, "shortlists"), info["shortlists"]["version"])
        positives = open_table(companion(out, "positives"), info["positives"]["version"])
    except Exception as error:  # noqa: BLE001 - a vacuumed or missing companion: search in full
        return f"the shortlists or positives of {out.uri} version {rankings.version} cannot be read ({error})"
    return Previous(rankings, shortlists, positives)


@dataclass
class Changes:
    """What an incremental run has to do: the gallery's and the queries' changes since the
    previous search, and the previous gallery's size."""

    gallery: RowChanges
    queries: RowChanges
    old_gallery_rows: int

    @property
    def gallery_rows(self) -> int:
        return self.old_gallery_rows - self.gallery.removed.num_rows + self.gallery.added.num_rows

    def __bool__(self) -> bool:
        return bool(self.gallery or self.queries)


def find_changes(previous: Previous, gallery: Gallery, queries: QuerySource) -> Changes | str:
    """The changes of both selections since the versions `previous` was made from, or why they
    cannot be known (an old version vacuumed): then the search is a full one."""
    info = previous.info
    try:
        gallery_changes = row_changes(gallery.table.location, info["features_version"], gallery.table, gallery.where)
        queries_changes = row_changes(queries.table.location, info["queries_version"], queries.table, queries.where)
    except VersionGone as error:
        return str(error)
    changes = Changes(gallery_changes, queries_changes, int(info["gallery"]))
    # A re-embedding of most of the gallery (a full `mga embed`) changes every row: scanning
    # it as "added" rows would cost a full search and more.
    if gallery_changes.added.num_rows > changes.old_gallery_rows // 2:
        return f"{gallery_changes.added.num_rows} of the gallery's rows are new or changed since version {info['features_version']}"
    return changes


class IncrementalSearch:
    """The chunks of an incremental run: the standing queries updated, then the new, changed
    and no-longer-complete queries searched in full (`search`, the run's ChunkSearch)."""

    def __init__(self, previous: Previous, changes: Changes, search: ChunkSearch, queries: QuerySource, chunk_size: int) -> None:
        self.previous, self.changes, self.search, self.queries, self.chunk_size = previous, changes, search, queries, chunk_size
        gallery = search.gallery
        self.added = gallery.restricted(changes.gallery.added.column("image_id").combine_chunks(), changes.gallery.new)
        self.removed = gallery.restricted(changes.gallery.removed.column("image_id").combine_chunks(), changes.gallery.old)
        self.removed_ids = changes.gallery.removed.column("image_id").combine_chunks()
        self.gone_queries = changes.queries.removed.column("image_id").combine_chunks()
        self.researched: list[pa.Array] = []  # standing queries whose lists no longer reach the depth
        self.counts = {"updated": 0, "searched in full": 0, "no longer complete": 0, "new positive below the list": 0, "token scores computed": 0}

    def __iter__(self) -> Iterator[tuple[QueryChunk, RankedChunk]]:
        for state, positives in self._stored_chunks():
            ids = pc.unique(state.column("query_id"))
            ids = ids.filter(pc.invert(pc.is_in(ids, value_set=self.gone_queries)))
            if not len(ids):
                continue
            chunk = next(self.queries.restricted(ids).chunks(len(ids), None))
            state, positives = (table.filter(pc.is_in(table.column("query_id"), value_set=ids)) for table in (state, positives))
            ranked, incomplete = self._update(chunk, state, positives)
            self.counts["updated"] += len(chunk) - len(incomplete)
            if len(incomplete):
                self.researched.append(incomplete)
            yield chunk, ranked
        full = pa.concat_arrays([self.changes.queries.added.column("image_id").combine_chunks(), *self.researched])
        if len(full):
            for chunk in self.queries.restricted(full).chunks(self.chunk_size, self.search.gallery):
                self.counts["searched in full"] += len(chunk)
                yield chunk, self.search(chunk)

    def _stored_chunks(self) -> Iterator[tuple[pa.Table, pa.Table]]:
        """The previous shortlists a file (a previous chunk) at a time, grouped up to the chunk
        size, with the positives of the same queries (the file of the same part)."""
        shortlists, positives = self.previous.shortlists, self.previous.positives
        positive_paths = {_part(path): path for path in positives.files.column("path").to_pylist()}
        paths = shortlists.files.column("path").to_pylist()
        pending: list[str] = []
        tables: list[pa.Table] = []
        queries = 0
        for index, path in enumerate(paths):
            pending.append(path)
            tables.append(read_table(shortlists.only([path])))
            queries += pc.count_distinct(tables[-1].column("query_id")).as_py()  # a query's rows are in one file
            if queries >= self.chunk_size or index == len(paths) - 1:
                rows = pa.concat_tables(tables)
                ids = pc.unique(rows.column("query_id"))
                parts = [positive_paths[_part(p)] for p in pending if _part(p) in positive_paths]
                # Positives of these queries: the same parts' files when the tables were written together, else all.
                source = positives.only(parts) if len(parts) == len(pending) else positives
                yield rows, read_table(source, None, pc.field("query_id").isin(ids))
                pending, tables, queries = [], [], 0

    def _update(self, chunk: QueryChunk, state: pa.Table, stored: pa.Table) -> tuple[RankedChunk, pa.Array]:
        """A standing chunk updated from its stored shortlists and positives; and the ids of its
        queries whose lists no longer reach the depth (left out of the rows, searched in full)."""
        search, count = self.search, len(chunk)
        known, boundary, state = _known_lists(chunk, state, self.changes.old_gallery_rows, self.removed_ids)
        state_ids, state_items = (state.column(name).combine_chunks() for name in ("gallery_id", "gallery_item_id"))
        positives, old_rank = _standing_positives(chunk, stored, self.removed_ids)
        chunk.positives = positives
        shared = search.pool.share(chunk.scan_arrays())
        width = search.depth + search.reserve
        added = search.shortlist(chunk, shared, width, within=self.added)
        removed_before = search.shortlist(chunk, shared, 1, within=self.removed).rank_global - 1 if len(positives.query) else 0
        offset = len(state_ids)
        added_top = TopK(added.top.scores, added.top.keys, added.top.rows + offset)
        merged = merge_known_top_k(known, *boundary, added_top, width)
        ids, items = pa.concat_arrays([state_ids, added.ids]), pa.concat_arrays([state_items, added.items])
        valid = torch.isfinite(merged.scores).sum(1)
        depth = min(search.depth, self.changes.gallery_rows)
        complete = (valid >= depth).numpy()
        rank_global = old_rank - removed_before + (added.rank_global - 1)
        positives, rank_global, beyond = _with_new_positives(chunk, positives, rank_global, merged, ids, items, self.changes.gallery.added)
        self.counts["no longer complete"] += int((~complete).sum())
        self.counts["new positive below the list"] += int((beyond & complete).sum())
        complete &= ~beyond
        incomplete = chunk.ids.filter(pa.array(~complete))
        if not complete.any():
            return RankedChunk(RANKINGS.empty_table(), POSITIVES.empty_table(), SHORTLISTS.empty_table(), depth, 0, self.changes.gallery_rows), incomplete
        chunk.positives = positives
        token_scores, head = self._token_scores(chunk, shared, merged, ids, state, offset, complete)
        shortlisted = Shortlisted(merged, ids, items, self.changes.gallery_rows, rank_global)
        tables = rank_chunk(chunk, shortlisted, token_scores, head, search.alpha, depth, written=complete)
        return RankedChunk(*tables, depth, head, self.changes.gallery_rows), incomplete

    def _token_scores(self, chunk: QueryChunk, shared: Any, merged: TopK, ids: pa.Array, state: pa.Table, offset: int,
                      complete: np.ndarray) -> tuple[torch.Tensor, int]:
        """S_token of each query's head: stored where the state has it, computed for the rest
        of the complete queries' ([Q, head]), and the head's size."""
        search = self.search
        width = merged.rows.shape[1]
        head = min(search.rerank_top, width) if search.alpha < 1.0 else 0
        rows = merged.rows[:, :head]
        stored = torch.from_numpy(pc.fill_null(state.column("score_token"), float("nan")).to_numpy(zero_copy_only=False).astype(np.float32))
        scores = torch.where(rows < offset, stored[rows.clamp(max=max(offset - 1, 0))] if offset else float("nan"), float("nan"))
        needed = torch.isnan(scores) & torch.isfinite(merged.scores[:, :head]) & torch.from_numpy(complete)[:, None]
        query, position = needed.nonzero(as_tuple=True)
        computed = search.score_pairs(shared, query.numpy(), ids.take(pa.array(rows[query, position].numpy())))
        self.counts["token scores computed"] += len(computed)
        scores[query, position] = torch.from_numpy(computed)
        return torch.nan_to_num(scores, nan=0.0), head  # NaN left: padding, or a query searched again


def _part(path: str) -> str:
    """The part of a chunk file name (`shortlists-00003.parquet` -> `00003.parquet`)."""
    return posixpath.basename(path).split("-", 1)[-1]


def _known_lists(chunk: QueryChunk, state: pa.Table, gallery_rows: int, removed_ids: pa.Array) -> tuple[TopK, tuple[torch.Tensor, torch.Tensor], pa.Table]:
    """The chunk's stored lists as a [Q, n] TopK in global order (rows index the returned state
    rows; the removed rows and the padding scored -inf), each query's boundary (its last stored
    entry, -inf for a list of the whole gallery), and the state rows by query."""
    query = pc.index_in(state.column("query_id"), value_set=chunk.ids).to_numpy(zero_copy_only=False)
    order = np.argsort(query, kind="stable")
    query = query[order].astype(np.int64)
    if (order != np.arange(len(order))).any():  # stored in the chunk's order already, as a rule
        state = state.take(pa.array(order))
    lengths = np.bincount(query, minlength=len(chunk))
    width = int(lengths.max()) if len(lengths) else 0
    position = np.arange(len(query)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padding = torch.iinfo(torch.int64).max
    scores = torch.full((len(chunk), width), float("-inf"))
    keys = torch.full((len(chunk), width), padding, dtype=torch.int64)
    rows = torch.zeros((len(chunk), width), dtype=torch.int64)
    ids = state.column("gallery_id").combine_chunks()
    scores[query, position] = torch.from_numpy(state.column("score_global").to_numpy().astype(np.float32))
    keys[query, position] = torch.from_numpy(arrow_tie_keys(ids))
    rows[query, position] = torch.arange(len(query))
    known = TopK(scores, keys, rows).take(order_by_score(scores, keys))
    last = torch.from_numpy(lengths - 1).clamp(min=0)[:, None]
    whole = torch.from_numpy(lengths >= gallery_rows)
    boundary = (torch.where(whole, float("-inf"), known.scores.gather(1, last)[:, 0]), torch.where(whole, padding, known.keys.gather(1, last)[:, 0]))
    gone = torch.from_numpy(pc.is_in(ids, value_set=removed_ids).to_numpy(zero_copy_only=False))[known.rows] & torch.isfinite(known.scores)
    known = TopK(known.scores.masked_fill(gone, float("-inf")), known.keys.masked_fill(gone, padding), known.rows)
    return known, boundary, state


def _standing_positives(chunk: QueryChunk, stored: pa.Table, removed_ids: pa.Array) -> tuple[Positives, np.ndarray]:
    """The chunk's stored positives that are still in the gallery, as the scans need them,
    with their stored full-gallery global ranks."""
    stored = stored.filter(pc.invert(pc.is_in(stored.column("gallery_id"), value_set=removed_ids)))
    query = pc.index_in(stored.column("query_id"), value_set=chunk.ids).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = stored.column("gallery_id").combine_chunks()
    order = np.lexsort((ids.to_numpy(zero_copy_only=False), query))
    ids = ids.take(pa.array(order))
    positives = Positives(query[order], stored.column("score_global").to_numpy()[order].astype(np.float32),
                          arrow_tie_keys(ids), ids)
    return positives, stored.column("rank_global").to_numpy()[order].astype(np.int64)


def _with_new_positives(chunk: QueryChunk, positives: Positives, rank_global: np.ndarray, merged: TopK, ids: pa.Array,
                        items: pa.Array, added: pa.Table) -> tuple[Positives, np.ndarray, np.ndarray]:
    """The positives with the added images of each labelled query's item (`added`: image_id,
    item_id), ranked by their place in the query's merged list; and [Q] which queries have an
    added image of their item below their list (its rank needs a count over the whole gallery)."""
    count = merged.rows.shape[0]
    wanted = pa.table({"query": pa.array(np.arange(count)), "item_id": chunk.items}).join(
        added.rename_columns(["gallery_id", "item_id"]), "item_id", join_type="inner").select(["query", "gallery_id"])
    # The lists of the queries with an added image of their item only (a few of the chunk).
    of_wanted = np.isin(np.arange(count), wanted.column("query").to_numpy())[:, None] & torch.isfinite(merged.scores).numpy()
    row, position = np.nonzero(of_wanted)
    listed = pa.table({
        "query": pa.array(row),
        "rank": pa.array(position + 1),
        "score": pa.array(merged.scores.numpy()[row, position]),
        "gallery_id": ids.take(pa.array(merged.rows.numpy()[row, position])),
    })
    found = wanted.join(listed, ["query", "gallery_id"], join_type="inner")
    beyond = np.zeros(count, bool)
    missing = wanted.join(listed, ["query", "gallery_id"], join_type="left anti").column("query").to_numpy()
    beyond[missing] = True
    found_ids = found.column("gallery_id").combine_chunks()
    query = np.concatenate([positives.query, found.column("query").to_numpy().astype(np.int64)])
    gallery_id = pa.concat_arrays([positives.gallery_id, found_ids])
    score = np.concatenate([positives.score, found.column("score").to_numpy().astype(np.float32)])
    keys = np.concatenate([positives.key, arrow_tie_keys(found_ids)])  # the stored positives' keys are known
    ranks = np.concatenate([rank_global, found.column("rank").to_numpy().astype(np.int64)])
    order = np.lexsort((gallery_id.to_numpy(zero_copy_only=False), query))
    merged_positives = Positives(query[order], score[order], keys[order], gallery_id.take(pa.array(order)))
    return merged_positives, ranks[order], beyond
