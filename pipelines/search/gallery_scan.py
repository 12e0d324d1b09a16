"""The two gallery scans behind `mga search`, streamed by Ray Data through autoscaling actor pools.

Nothing of the gallery is held whole anywhere. A search handles its queries in chunks;
for each chunk the gallery's files are read twice, as streams of blocks:

1. **Shortlist scan** (`ShortlistScan`): blocks of `image_id, item_id, global` go through
   actors that hold only the chunk's query features and its positives (O(queries)). For
   each block an actor returns the block's exact top-`depth` per query and, per positive,
   how many of the block's rows come before it in the global order (mga.retrieval). The
   driver folds the blocks in as they arrive (`ShortlistMerge`): O(queries x depth).
2. **Token scan** (`TokenScorer`): only the rows some query shortlisted into its reranked
   head are kept from blocks of `image_id, tokens_*` (the id filter is pushed into the
   Parquet read); actors that hold the model and the chunk's query tokens score every
   (query, candidate) pair whose candidate is in the block with ATA, in fixed-size padded
   batches, and return one S_token per pair.

Why scans grouped by gallery block rather than an index in memory or a join: the exact
top-k and the full-gallery rank of every positive need every gallery score once per query
anyway, so a scan costs what a flat index costs in compute, without holding the gallery
(global features 2 KB per image at D = 512, tokens 6 KB more in float16) on any node or in
any actor. A Ray Data join of pairs with tokens would shuffle all pairs and all tokens
across the cluster; here only the candidates' tokens leave the reading tasks, and each
block is scored where it arrives. bench/search_scale.py measures it: at 1M gallery images
the peak memory of the whole process tree is within the goal of 1.2x the 250k run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from mga.retrieval import TopK, block_scores, block_top_k, count_ranked_above, merge_top_k, tie_keys
from pipelines.resources import actor_device
from pipelines.schemas import column_matrix


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor of its own: arrays from the object store are read-only views."""
    return torch.from_numpy(np.array(array)).to(device)


SHORTLIST_SCHEMA = pa.schema(
    [
        ("rows", pa.int64()),
        ("width", pa.int32()),
        ("scores", pa.list_(pa.float32())),
        ("keys", pa.list_(pa.int64())),
        ("ids", pa.list_(pa.string())),
        ("items", pa.list_(pa.string())),
        ("counts", pa.list_(pa.int64())),
    ]
)


# Queries scored against a block at once: bounds the [queries, block rows] score matrix.
QUERY_TILE = 1024


class ShortlistScan:
    """Actor: one gallery block -> its top-`depth` per query and the positives' counts (one row)."""

    def __init__(self, queries: list, depth: int, use_gpu: bool) -> None:
        chunk = ray.get(queries[0])
        self.device = actor_device(use_gpu)
        self.query_global = _tensor(chunk["global"], self.device)
        self.positive_query, self.positive_score, self.positive_key = (_tensor(chunk[name], self.device) for name in ("positive_query", "positive_score", "positive_key"))
        self.depth = depth

    def __call__(self, block: pa.Table) -> pa.Table:
        ids = block.column("image_id").combine_chunks()
        counts = torch.zeros(len(self.positive_query), dtype=torch.int64, device=self.device)
        if block.num_rows == 0:
            return self._row(0, None, ids, block, counts)
        keys = torch.from_numpy(tie_keys(ids.to_numpy(zero_copy_only=False))).to(self.device)
        gallery = torch.from_numpy(column_matrix(block, "global")).to(self.device)
        tiles = []
        with torch.inference_mode():
            for start in range(0, len(self.query_global), QUERY_TILE):
                queries = self.query_global[start:start + QUERY_TILE]
                scores = block_scores(queries, gallery)
                tiles.append(block_top_k(queries, gallery, keys, self.depth, scores=scores))
                # This tile's positives (sorted by query), renumbered within the tile.
                first, last = (int(torch.searchsorted(self.positive_query, bound)) for bound in (start, start + len(queries)))
                if last > first:
                    counts[first:last] = count_ranked_above(
                        scores, queries, gallery, keys, self.positive_query[first:last] - start, self.positive_score[first:last], self.positive_key[first:last]
                    )
        found = TopK(*(torch.cat(parts) for parts in zip(*((t.scores, t.keys, t.rows) for t in tiles))))
        return self._row(block.num_rows, found, ids, block, counts)

    @staticmethod
    def _row(rows: int, found: TopK | None, ids: pa.Array, block: pa.Table, counts: torch.Tensor) -> pa.Table:
        take = pa.array(found.rows.reshape(-1).cpu().numpy() if found is not None else np.zeros(0, np.int64))
        empty = np.zeros(0)
        return pa.Table.from_pydict(
            {
                "rows": [rows],
                "width": [found.rows.shape[1] if found is not None else 0],
                "scores": [found.scores.reshape(-1).cpu().numpy() if found is not None else empty.astype(np.float32)],
                "keys": [found.keys.reshape(-1).cpu().numpy() if found is not None else empty.astype(np.int64)],
                "ids": [ids.take(take)],
                "items": [block.column("item_id").combine_chunks().take(take)],
                "counts": [counts.cpu().numpy()],
            },
            schema=SHORTLIST_SCHEMA,
        )


@dataclass
class Shortlisted:
    """A query chunk's shortlist in global order: `top` (exact S_global, tie keys, rows as flat
    indices into `ids`/`items`), the gallery's size, and each positive's global rank over the
    whole gallery (0 where the shortlist cannot tell: below an approximate index's list)."""

    top: TopK
    ids: pa.Array
    items: pa.Array
    gallery_rows: int
    rank_global: np.ndarray


class ShortlistMerge:
    """Driver side of the shortlist scan: folds block results into the chunk's exact top-`depth`."""

    def __init__(self, num_queries: int, depth: int, num_positives: int) -> None:
        self.num_queries, self.depth = num_queries, depth
        self.shortlist: TopK | None = None
        self.ids = pa.array([], pa.string())
        self.items = pa.array([], pa.string())
        self.counts = np.zeros(num_positives, dtype=np.int64)
        self.gallery_rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.gallery_rows += int(row["rows"])
        self.counts += np.asarray(row["counts"], dtype=np.int64)
        width = int(row["width"])
        if width == 0:
            return
        shape = (self.num_queries, width)
        offset = len(self.ids)
        cpu = torch.device("cpu")
        found = TopK(
            _tensor(np.asarray(row["scores"], dtype=np.float32).reshape(shape), cpu),
            _tensor(np.asarray(row["keys"], dtype=np.int64).reshape(shape), cpu),
            torch.arange(offset, offset + self.num_queries * width).reshape(shape),
        )
        ids = pa.concat_arrays([self.ids, _string_array(row["ids"])])
        items = pa.concat_arrays([self.items, _string_array(row["items"])])
        merged = found if self.shortlist is None else merge_top_k(self.shortlist, found, self.depth)
        # Keep only the ids and items of what survived: memory stays O(queries x depth).
        take = pa.array(merged.rows.reshape(-1).numpy())
        self.ids, self.items = ids.take(take), items.take(take)
        merged.rows = torch.arange(len(self.ids)).reshape(merged.rows.shape)
        self.shortlist = merged

    def result(self) -> Shortlisted:
        if self.shortlist is None:
            raise ValueError("no rows with split=gallery to search")
        return Shortlisted(self.shortlist, self.ids, self.items, self.gallery_rows, self.counts + 1)


def _string_array(values: Any) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


class TokenScorer:
    """Actor: the (query, candidate) pairs whose candidate is in a block, scored by ATA."""

    def __init__(self, artifact: list, queries: list, pairs: list, token_names: list[str], rerank_batch: int, use_gpu: bool) -> None:
        # Here, not at the top: the model (timm, torchvision) costs an actor ~3 s to import,
        # and the shortlist actors, started once per query chunk, never need it.
        from mga.artifact import unpack_artifact

        model, _, _ = unpack_artifact(ray.get(artifact[0]))
        self.device = actor_device(use_gpu)
        self.model = model.to(self.device).eval()
        self.token_shape = (model.config.num_tokens, model.config.token_dim)
        chunk = ray.get(queries[0])
        self.query_tokens = [_tensor(layer, self.device) for layer in chunk["tokens"]]
        pair_table: pa.Table = ray.get(pairs[0])
        ids = pair_table.column("gallery_id").to_numpy(zero_copy_only=False).astype(str)
        order = np.argsort(ids, kind="stable")
        self.pair_ids = ids[order]
        self.pair_query = pair_table.column("query").to_numpy()[order]
        self.pair_head = pair_table.column("head").to_numpy()[order]
        self.token_names, self.rerank_batch = token_names, rerank_batch

    def __call__(self, block: pa.Table) -> pa.Table:
        block_ids = block.column("image_id").to_numpy(zero_copy_only=False).astype(str)
        first = np.searchsorted(self.pair_ids, block_ids, "left")
        last = np.searchsorted(self.pair_ids, block_ids, "right")
        per_row = last - first
        block_row = np.repeat(np.arange(len(block_ids)), per_row)
        pair = np.repeat(first - np.concatenate([[0], np.cumsum(per_row)[:-1]]), per_row) + np.arange(per_row.sum())
        tokens = [torch.from_numpy(column_matrix(block, name, self.token_shape)) for name in self.token_names]
        scores = np.empty(len(pair), dtype=np.float32)
        for start in range(0, len(pair), self.rerank_batch):
            # Every ATA call has the same shape (the last batch is padded): a pair's score does
            # not depend on which pairs share its batch.
            rows = np.arange(start, start + self.rerank_batch).clip(max=len(pair) - 1)
            query = torch.from_numpy(self.pair_query[pair[rows]]).to(self.device)
            gallery_rows = torch.from_numpy(block_row[rows])
            # bf16 on a GPU, as embed does: 1.5x the pairs/s at 4096 pairs a call on an H100,
            # S_token within 0.005 of fp32 (bench/RESULTS.md).
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                result = self.model.align_tokens(
                    [layer[query] for layer in self.query_tokens], [layer[gallery_rows].to(self.device) for layer in tokens]
                )
            valid = min(self.rerank_batch, len(pair) - start)
            scores[start:start + valid] = result.float().cpu().numpy()[:valid]
        return pa.table(
            {
                "query": pa.array(self.pair_query[pair], pa.int32()),
                "head": pa.array(self.pair_head[pair], pa.int32()),
                "score_token": pa.array(scores, pa.float32()),
            }
        )
