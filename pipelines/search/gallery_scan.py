"""The two gallery scans behind `mga search`, on one pool of long-lived actors per job.

Nothing of the gallery is held whole anywhere. A search handles its queries in chunks;
for each chunk the gallery is read twice, a Parquet row group ("piece") at a time, by the
job's `GalleryScanner` actors (`ScannerPool` hands each free actor the next piece):

1. **Shortlist scan** (`GalleryScanner.shortlist`): the piece's `image_id, item_id, global`
   rows that pass the gallery's filter, in blocks of `block_rows`, against the chunk's query features and its positives
   (O(queries)). For each block the actor returns the entries of the block's exact
   top-`depth` per query that beat the floor (the k-th of what the actor has scanned, or of
   the driver's merged list when the piece was sent) and, per positive, how many of the
   block's rows come before it in the global order (mga.shortlist). The driver folds the
   blocks in as they arrive (pipelines.search.shortlist_merge): O(queries x depth).
2. **Token scan** (`GalleryScanner.score_tokens`): only the pieces whose statistics may hold
   a candidate some query shortlisted into its reranked head are read, and in them only
   those rows' `tokens_*`; the actor scores every (query, candidate) pair whose candidate is
   in the piece with ATA, in fixed-size padded batches, and returns one S_token per pair.

Why scans grouped by gallery piece rather than an index in memory or a join: the exact
top-k and the full-gallery rank of every positive need every gallery score once per query
anyway, so a scan costs what a flat index costs in compute, without holding the gallery
(global features 2 KB per image at D = 512, tokens 6 KB more in float16) on any node or in
any actor. A join of pairs with tokens would shuffle all pairs and all tokens across the
cluster; here only the candidates' tokens are read, and each piece is scored where it is read.

Why actors of the job's own rather than a Ray Data actor pool per scan: a Ray Data
execution starts its actors afresh, so a search of many chunks would start 2 pools a chunk,
each actor importing torch and the model again (seconds each, on every node, every chunk).
The job's actors live for the whole search: the model loads once per actor, from storage
(pipelines.model_store.ModelSource, so that Ray can restart the actor on another node), at
its first token scan, and the chunk's arrays travel by reference with each call, cached by
the actor (a restarted actor, `max_restarts=-1`, fetches them again and Ray retries the call).
`LocalScanner` runs the same scanner in the calling process, one piece after another, for
`mga query`: a few photos need no Ray cluster.
Ray is imported where the pool uses it: `mga query` runs without it.
bench/search_scale.py measures the scan: at 1M gallery images the peak memory of the whole
process tree is within the goal of 1.2x the 250k run's.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mga.ata import PreparedTokens
from mga.global_scores import block_scores
from mga.model import MGAModel
from mga.shortlist import TopK, block_top_k, count_ranked_above, kth_of, merge_top_k, stricter_floor
from pipelines.memory import release_freed_memory
from pipelines.model_store import ModelSource
from pipelines.resources import actor_device
from pipelines.schemas import arrow_tie_keys
from pipelines.search.queries import Piece, piece_fragment, selected_rows
from pipelines.search.shortlist_merge import block_entries, owned_tensor
from pipelines.storage import Location
from pipelines.token_ranges import fragment_rows, ranged_file

# Queries scored against a block at once: bounds the [queries, block rows] score matrix.
QUERY_TILE = 1024


@dataclass(frozen=True)
class Shared:
    """A value every call of a scan needs (a chunk's arrays): a reference into
    Ray's object store, fetched once per actor, or the value itself in the calling process."""

    key: str
    value: Any
    in_object_store: bool = False

    def get(self) -> Any:
        if not self.in_object_store:
            return self.value
        import ray

        return ray.get(self.value)


@dataclass(frozen=True)
class GalleryRows:
    """A piece's gallery rows as the shortlist scores them: ids, items, tie keys [G] and global
    features [G, D] (float32), in the calling process's memory."""

    ids: pa.Array
    items: pa.Array
    keys: torch.Tensor
    features: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, count: int) -> "GalleryRows":
        return GalleryRows(self.ids.slice(start, count), self.items.slice(start, count), self.keys[start:start + count], self.features[start:start + count])


class KeptGallery:
    """Gallery rows a scanner keeps between query chunks (the gallery's pieces, or the rows of
    them an incremental run added or removed, by the filter's name), up to `budget` bytes of global
    features: ids, items and tie keys in memory, the features appended to an unlinked file on
    the node's local disk (tempfile.TemporaryFile: its space goes with the process, however it
    ends) and read back a piece at a time. The kernel's page cache serves them at memory speed
    while memory allows and drops them under pressure, where an actor holding them would pin
    them (250k images at D = 512: 0.5 GB) and a re-read would decode Parquet again."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.file: Any = None
        # By (piece, the name of the filter its rows passed): (rows without features, offset).
        self.pieces: dict[tuple[Piece, str], tuple[GalleryRows, int]] = {}

    def add(self, key: tuple[Piece, str], rows: GalleryRows) -> None:
        """Keep `rows` under `key` (piece, filter name) if the budget allows (a full disk only stops the keeping)."""
        features = rows.features.numpy()
        if key in self.pieces or self.used + features.nbytes > self.budget:
            return
        try:
            self.file = self.file or tempfile.TemporaryFile(prefix="mga-gallery-")
            self.file.seek(self.used)
            self.file.write(memoryview(np.ascontiguousarray(features)).cast("B"))
            self.file.flush()
        except OSError:
            self.budget = self.used
            return
        # An empty tensor of the width, not a slice: a slice would hold the features' storage.
        self.pieces[key] = (GalleryRows(rows.ids, rows.items, rows.keys, torch.empty((0, features.shape[1]))), self.used)
        self.used += features.nbytes

    def get(self, key: tuple[Piece, str]) -> GalleryRows | None:
        """The rows kept under `key` (piece, filter name), or None (not kept, or not read back whole)."""
        if key not in self.pieces:
            return None
        rows, offset = self.pieces[key]
        features = np.empty((len(rows), rows.features.shape[1]), np.float32)
        if features.nbytes and os.preadv(self.file.fileno(), [features], offset) != features.nbytes:
            return None
        return GalleryRows(rows.ids, rows.items, rows.keys, torch.from_numpy(features))


class GalleryScanner:
    """Reads gallery pieces and scores them against the current query chunk, for the whole job:
    a Ray actor (ScannerPool), or an object in the calling process given its model (LocalScanner)."""

    def __init__(self, location: Location, model: ModelSource | MGAModel, gallery_filter: pc.Expression, use_gpu: bool, keep_bytes: int = 0) -> None:
        self.location, self.gallery_filter = location, gallery_filter
        # A source's ATA head is loaded at the first token scan (ScannerPool's actors); a model's is used as it is (LocalScanner).
        self.source, self.alignment = (model, None) if isinstance(model, ModelSource) else (None, model.alignment)
        self.device = actor_device(use_gpu) if self.alignment is None else next(model.parameters()).device
        self.cached: dict[str, tuple[str, Any]] = {}
        self.running: tuple[tuple[str, int, str], set[Piece], TopK | None] | None = None
        # Gallery pieces kept for the next query chunks, up to `keep_bytes`: a search of many
        # chunks then reads the gallery's global features once (ScannerPool hands each actor its pieces).
        self.kept = KeptGallery(keep_bytes)

    def _cached(self, name: str, shared: Shared, build: Any) -> Any:
        """`build(value)` of the `shared` value, kept until another comes under `name`."""
        if self.cached.get(name, ("",))[0] != shared.key:
            if self.cached.pop(name, None) is not None:  # free the previous chunk's arrays first
                release_freed_memory()
            self.cached[name] = (shared.key, build(shared.get()))
        return self.cached[name][1]

    def _queries(self, chunk: dict[str, Any]) -> dict[str, Any]:
        arrays = {name: owned_tensor(chunk[name], self.device) for name in ("global", "positive_query", "positive_score", "positive_key")}
        # As stored (float16 or float32), made float32 a batch at a time: a chunk's tokens at float32 cost 2x.
        arrays["tokens"] = [owned_tensor(layer, self.device) for layer in chunk["tokens"]]
        return arrays

    def shortlist(self, piece: Piece, chunk: Shared, depth: int, block_rows: int, named_filter: tuple[str, pc.Expression] | None = None, keep: bool = False,
                  merged_floor: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
        """The piece's gallery rows (those passing `named_filter`'s filter, default the gallery's) in
        blocks of `block_rows`: each block's top-`depth` per query and the positives' counts (the
        first block also says whether the piece was `read` from the table). With `keep` (more chunks follow), the rows are kept (KeptGallery) while the budget lasts, under the piece and the filter's name.

        A block returns only the rows that rank before the k-th of every row this actor has scored
        for the same chunk, depth and filter (its running top list, `block_top_k`'s floor), or
        before `merged_floor` (the k-th of the driver's merged list when the call was sent) where
        that comes first: the others cannot be in the gallery's top-`depth`. After the first
        pieces an actor sends the driver a few rows a query instead of `depth`, and recomputes
        that few exactly; with the driver's floor, a few however many actors scan."""
        queries = self._cached("chunk", chunk, self._queries)
        filter_name, row_filter = named_filter or ("gallery", self.gallery_filter)
        kept_as = (piece, filter_name)
        rows = self.kept.get(kept_as)
        read = rows is None
        if read:
            rows = self._gallery_rows(piece, row_filter)
            if keep:
                self.kept.add(kept_as, rows)
        scan = (chunk.key, depth, filter_name)
        if self.running is None or self.running[0] != scan:
            self.running = (scan, set(), None)
        # A piece scanned twice (a retried call) must not count its rows twice in the floor.
        seen, running = self.running[1], self.running[2] if piece not in self.running[1] else None
        merged = None if merged_floor is None else tuple(owned_tensor(part, self.device) for part in merged_floor)
        blocks = []
        for start in range(0, max(len(rows), 1), block_rows):
            block, found = self._shortlist_block(rows.slice(start, block_rows), queries, depth, running, merged)
            blocks.append(block)
            if found is not None and piece not in seen:
                running = found if running is None else merge_top_k(running, found, depth)
        if piece not in seen:
            seen.add(piece)
            self.running = (scan, seen, running)
        blocks[0]["read"] = read
        return blocks

    def _gallery_rows(self, piece: Piece, row_filter: pc.Expression) -> GalleryRows:
        """The piece's rows that pass `row_filter`, read."""
        ids, items, features = selected_rows(self.location.fs, piece, row_filter)
        return GalleryRows(ids, items, torch.from_numpy(arrow_tie_keys(ids)), torch.from_numpy(features))

    def _shortlist_block(self, block: GalleryRows, queries: dict[str, Any], depth: int, running: TopK | None,
                         merged_floor: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[dict[str, Any], TopK | None]:
        """One block's result for the driver, and its top list (positions in the block) for the running one."""
        positive_query = queries["positive_query"]
        counts = torch.zeros(len(positive_query), dtype=torch.int64, device=self.device)
        if len(block) == 0:
            return {"rows": 0, "counts": counts.cpu().numpy()}, None
        keys, gallery = block.keys.to(self.device), block.features.to(self.device)
        floor = stricter_floor(None if running is None else kth_of(running, depth), merged_floor)
        # The block in float64 once for all query tiles: their exact scores (mga.global_scores.block_pair_scores).
        gallery_double = gallery.double() if gallery.device.type == "cpu" else None
        tiles = []
        with torch.inference_mode():
            for start in range(0, len(queries["global"]), QUERY_TILE):
                tile = queries["global"][start:start + QUERY_TILE]
                scores = block_scores(tile, gallery)
                tile_floor = None if floor is None else (floor[0][start:start + QUERY_TILE], floor[1][start:start + QUERY_TILE])
                tiles.append(block_top_k(tile, gallery, keys, depth, scores=scores, floor=tile_floor, block_double=gallery_double))
                # This tile's positives (sorted by query), renumbered within the tile.
                first, last = (int(torch.searchsorted(positive_query, bound)) for bound in (start, start + len(tile)))
                if last > first:
                    counts[first:last] = count_ranked_above(
                        scores, tile, gallery, keys, positive_query[first:last] - start,
                        queries["positive_score"][first:last], queries["positive_key"][first:last], gallery_double, listed=tiles[-1], floor=tile_floor,
                    )
        found = TopK(*(torch.cat(parts) for parts in zip(*((t.scores, t.keys, t.rows) for t in tiles))))
        # Padding (rows after the floor) is ordered last: the running list merges only the columns some query fills.
        found = found.first(int(torch.isfinite(found.scores).sum(1).max()))
        return {"rows": len(block), "counts": counts.cpu().numpy(), **block_entries(found, block.ids, block.items)}, found

    def score_tokens(self, piece: Piece, chunk: Shared, pairs: Shared, token_names: list[str], rerank_batch: int, precision: str) -> dict[str, np.ndarray]:
        """S_token of the (query, candidate) pairs whose candidate is in the piece, by ATA in `precision` ("float32", "bfloat16"):
        {"pair": the pairs' positions in `pairs`, "score_token", "bytes_read": of the token columns}."""
        if self.alignment is None:  # here, not at __init__: a search that reranks nothing never needs it
            self.alignment = self.source.load_alignment().to(self.device)
        queries = self._cached("chunk", chunk, self._queries)
        pair_ids, pair_query, pair_index = self._cached("pairs", pairs, _sorted_pairs)
        fragment = piece_fragment(self.location.fs, piece)
        block_ids = fragment.to_table(columns=["image_id"]).column("image_id").to_numpy(zero_copy_only=False).astype(str)
        first = np.searchsorted(pair_ids, block_ids, "left")
        last = np.searchsorted(pair_ids, block_ids, "right")
        wanted = last > first
        if not wanted.any():
            return {"pair": np.zeros(0, np.int64), "score_token": np.zeros(0, np.float32), "bytes_read": 0}
        # Tokens only of the candidates, from the row groups that hold one (a piece spans several),
        # each image's [M, d] as the chunk's queries have them (the tables share the model).
        token_shape = queries["tokens"][0].shape[1:]
        with ranged_file(self.location.fs, piece[0]) as file:
            stored, bytes_read = fragment_rows(file, fragment, wanted, token_names, token_shape.numel())
        tokens = [torch.from_numpy(layer.reshape(-1, *token_shape)) for layer in stored]
        first, per_row = first[wanted], (last - first)[wanted]
        block_row = np.repeat(np.arange(len(per_row)), per_row)
        pair = np.repeat(first - np.concatenate([[0], np.cumsum(per_row)[:-1]]), per_row) + np.arange(per_row.sum())
        # A query is in `rerank` pairs (~8% of ATA's time at 50 is its own part, done once); a candidate
        # in few (1-3 at 10^3-10^4 queries): its part is computed in each of its pairs' batches.
        prepared = self._prepared_queries(queries, np.unique(pair_query[pair]), rerank_batch, precision)
        scores = np.empty(len(pair), dtype=np.float32)
        for start in range(0, len(pair), rerank_batch):
            # Every ATA call has the same shape (the last batch is padded): a pair's score does
            # not depend on which pairs share its batch.
            rows = np.arange(start, start + rerank_batch).clip(max=len(pair) - 1)
            query = torch.from_numpy(pair_query[pair[rows]]).to(self.device)
            gallery_rows = torch.from_numpy(block_row[rows])
            with torch.inference_mode(), self._precision(precision):
                result = self.alignment.score(prepared[query], self.alignment.prepare([layer[gallery_rows].to(self.device).float() for layer in tokens]))
            valid = min(rerank_batch, len(pair) - start)
            scores[start:start + valid] = result.float().cpu().numpy()[:valid]
        del tokens, stored  # (the tensors share the arrays' memory)
        release_freed_memory()  # the piece's tokens and ATA's activations: not carried into the next scans
        return {"pair": pair_index[pair], "score_token": scores, "bytes_read": bytes_read}

    def _prepared_queries(self, queries: dict[str, Any], needed: np.ndarray, batch: int, precision: str) -> PreparedTokens:
        """ATA's part of the chunk's queries that no pair changes (mga.ata.PreparedTokens): computed for
        the rows of `needed` not done yet (an incremental run's pairs need few), in calls of `batch`
        queries (the last padded: the shapes a pair's batch has), kept with the chunk's arrays."""
        tokens = queries["tokens"]
        done = queries.setdefault("prepared rows", torch.zeros(len(tokens[0]), dtype=torch.bool))
        rows_needed = torch.from_numpy(needed)
        missing = rows_needed[~done[rows_needed]]
        for start in range(0, len(missing), batch):
            rows = missing[start:start + batch]
            padded = rows[torch.arange(batch).clamp(max=len(rows) - 1)].to(self.device)
            with torch.inference_mode(), self._precision(precision):
                part = self.alignment.prepare([layer[padded].float() for layer in tokens])
                if "prepared" not in queries:
                    queries["prepared"] = part.empty(len(done))
                queries["prepared"][padded[:len(rows)]] = part[:len(rows)]
            done[rows] = True
        return queries["prepared"]

    def _precision(self, precision: str) -> torch.autocast:
        # bfloat16: on an H100 1.5x the pairs/s at 4096 pairs a call, S_token within 0.005 of
        # float32; on a CPU with AVX512-BF16 ~1.3x at 128 (bench/RESULTS.md).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _sorted_pairs(pairs: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, candidate) pairs sorted by candidate id: (ids, query rows, positions in `pairs`)."""
    ids = pairs.column("gallery_id").to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(ids, kind="stable")
    return ids[order], pairs.column("query").to_numpy()[order], order.astype(np.int64)


class ScannerPool:
    """The job's `GalleryScanner` actors: created once, each fed the next piece when free.

    An actor that cannot start yet (a GPU an autoscaler has still to add) gets no work until
    it can: the others go on without it. A dead actor is restarted by Ray and its call retried.
    Each actor may keep up to `keep_bytes` of gallery features between query chunks (KeptGallery); a map with
    `affinity` hands a free actor first a piece it scanned before (it may hold it), then one no
    actor scanned, then any other.
    """

    def __init__(self, size: int, options: dict[str, Any], location: Location, model: ModelSource, gallery_filter: pc.Expression, use_gpu: bool,
                 keep_bytes: int = 0) -> None:
        import ray

        actor = ray.remote(GalleryScanner).options(max_restarts=-1, max_task_retries=-1, **options)
        self.starting = {}
        for _ in range(size):
            handle = actor.remote(location, model, gallery_filter, use_gpu, keep_bytes)
            self.starting[handle.__ray_ready__.remote()] = handle
        self.free: list[Any] = []
        self.scanned_by: dict[Piece, Any] = {}

    @staticmethod
    def share(value: Any) -> Shared:
        """`value` in the object store, put once for every call that passes it."""
        import ray

        reference = ray.put(value)
        return Shared(reference.hex(), reference, in_object_store=True)

    def map(self, method: str, pieces: Iterable[Piece], *args: Any, affinity: bool = False, latest: Callable[[], Any] | None = None) -> Iterator[Any]:
        """`method(piece, *args)` on the actors for every piece (with `latest()`, read as each call
        is sent, as a last argument); the results in the order they finish."""
        import ray

        queue = list(pieces)[::-1]
        running: dict[Any, Any] = {}
        while queue or running:
            while self.free and queue:
                handle, index = self._assignment(queue) if affinity else (self.free[-1], len(queue) - 1)
                self.free = [free for free in self.free if free is not handle]
                piece = queue.pop(index)
                if affinity:
                    self.scanned_by[piece] = handle
                running[getattr(handle, method).remote(piece, *args, *(() if latest is None else (latest(),)))] = handle
            done = ray.wait([*running, *self.starting], num_returns=1)[0][0]
            if done in self.starting:
                ray.get(done)  # an actor that failed to start raises here
                self.free.append(self.starting.pop(done))
                continue
            self.free.append(running.pop(done))
            yield ray.get(done)

    def _assignment(self, queue: list[Piece]) -> tuple[Any, int]:
        """(free actor, position in `queue`): a piece whose last scanner is free goes to it; else a
        piece no actor scanned, else the next piece (its scanner is busy: it is read again)."""
        unscanned = None
        for index in range(len(queue) - 1, -1, -1):
            scanner = self.scanned_by.get(queue[index])
            if scanner is None:
                unscanned = index if unscanned is None else unscanned
            elif any(free is scanner for free in self.free):
                return scanner, index
        return self.free[-1], (len(queue) - 1 if unscanned is None else unscanned)


class LocalScanner:
    """One GalleryScanner in the calling process (no Ray): the pool of `mga query`."""

    def __init__(self, location: Location, model: torch.nn.Module, gallery_filter: pc.Expression) -> None:
        self.scanner = GalleryScanner(location, model, gallery_filter, False)

    @staticmethod
    def share(value: Any) -> Shared:
        return Shared(uuid.uuid4().hex, value)

    def map(self, method: str, pieces: Iterable[Piece], *args: Any, affinity: bool = False, latest: Callable[[], Any] | None = None) -> Iterator[Any]:
        """`method(piece, *args[, latest()])` for every piece, one after another."""
        for piece in pieces:
            yield getattr(self.scanner, method)(piece, *args, *(() if latest is None else (latest(),)))
