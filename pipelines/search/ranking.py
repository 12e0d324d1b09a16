"""The driver's side of `mga search`: the queries and their positives, the gallery's pieces,
the two scans of a chunk on the job's actors (gallery_scan), and the chunk's ranked rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from mga.errors import InputError
from mga.retrieval import pair_scores, rerank, reranked_ranks, tie_keys
from pipelines.resources import actor_cpus
from pipelines.schemas import POSITIVES, RANKINGS, column_matrix
from pipelines.search.gallery_scan import Piece, ScannerPool, ShortlistMerge, Shortlisted
from pipelines.tables import Snapshot, read_table


def token_columns(info: dict[str, Any]) -> list[str]:
    return [f"tokens_{layer}" for layer in range(len(info["layers"]))]


def read_queries(features: Snapshot) -> pa.Table:
    names = token_columns(features.info)
    queries = read_table(features, ["image_id", "item_id", "global", *names], pc.field("split") == "query", ("split", ["query"]))
    if queries.num_rows == 0:
        raise InputError(f"{features.uri}: no rows with split=query to search for")
    return queries.sort_by("image_id")


def find_positives(features: Snapshot, queries: pa.Table) -> dict[str, np.ndarray]:
    """Every (query, gallery image of its item) pair, with the pair's exact S_global and the image's tie key.

    Reads only the gallery rows of the queries' items (a filtered scan), sorted by query then gallery id.
    """
    items = pc.unique(queries.column("item_id"))
    gallery = read_table(
        features, ["image_id", "item_id", "global"], (pc.field("split") == "gallery") & pc.field("item_id").isin(items),
        ("split", ["gallery"]), ("item_id", items.to_pylist()),
    )
    left = pa.table({"query": pa.array(np.arange(queries.num_rows)), "item_id": queries.column("item_id")})
    right = pa.table({"row": pa.array(np.arange(gallery.num_rows)), "item_id": gallery.column("item_id"), "gallery_id": gallery.column("image_id")})
    pairs = left.join(right, "item_id", join_type="inner").sort_by([("query", "ascending"), ("gallery_id", "ascending")])
    query, row = (pairs.column(name).to_numpy().astype(np.int64) for name in ("query", "row"))  # copies torch may index with
    query_global = torch.from_numpy(column_matrix(queries, "global"))
    gallery_global = torch.from_numpy(column_matrix(gallery, "global"))
    ids = pairs.column("gallery_id").combine_chunks()
    return {
        "positive_query": query,
        "positive_score": pair_scores(query_global[query], gallery_global[row]).numpy(),
        "positive_key": tie_keys(ids.to_numpy(zero_copy_only=False)),
        "gallery_id": ids,
    }


GALLERY = ("split", ["gallery"])


def gallery_pieces(features: Snapshot, *where: tuple[str, list[str]]) -> list[Piece]:
    """The row groups of the features table that may hold gallery rows (and `where`), by their statistics."""
    return [(path, group) for path, groups in features.pieces(GALLERY, *where) for group in groups]


def scanner_pool(features: Snapshot, files: dict[str, bytes], workers: int, gpus: float, cpus_per_actor: float) -> ScannerPool:
    """The job's scan actors: `workers` of them, each with `gpus` GPUs or `cpus_per_actor` CPUs."""
    options = {"num_gpus": gpus, "num_cpus": actor_cpus(gpus, cpus_per_actor)}
    return ScannerPool(workers, options, features.location, [ray.put(files)], gpus > 0)


def shortlist_scan(features: Snapshot, pieces: list[Piece], chunk: dict[str, Any], depth: int, block_rows: int, pool: ScannerPool) -> Shortlisted:
    """Pass 1: the chunk's exact top-`depth` and each positive's count of gallery images before it.

    `chunk` (chunk_arrays) travels to the actors by its `reference`, put once for both scans."""
    merge = ShortlistMerge(len(chunk["global"]), depth, len(chunk["positive_query"]))
    for blocks in pool.map("shortlist", pieces, chunk["reference"], depth, block_rows):
        for block in blocks:
            merge.add(block)
    try:
        return merge.result()
    except ValueError as error:
        raise InputError(f"{features.uri}: {error}") from None


def token_scan(features: Snapshot, chunk: dict[str, Any], shortlisted: Shortlisted, head: int, rerank_batch: int, pool: ScannerPool) -> torch.Tensor:
    """Pass 2: S_token of each query with the first `head` rows of its shortlist, [Q, head]."""
    count = len(chunk["global"])
    scores = torch.full((count, head), float("nan"))
    rows = shortlisted.top.rows[:, :head].reshape(-1).numpy()
    pairs = pa.table(
        {
            "gallery_id": shortlisted.ids.take(pa.array(rows)),
            "query": pa.array(np.repeat(np.arange(count), head), pa.int32()),
            "head": pa.array(np.tile(np.arange(head), count), pa.int32()),
        }
    )
    pieces = gallery_pieces(features, ("image_id", pc.unique(pairs.column("gallery_id")).to_pylist()))
    for scored in pool.map("score_tokens", pieces, chunk["reference"], [ray.put(pairs)], token_columns(features.info), rerank_batch):
        query, position = (torch.from_numpy(scored[name].astype(np.int64)) for name in ("query", "head"))
        scores[query, position] = torch.from_numpy(scored["score_token"].copy())  # a copy: object store arrays are read-only
    missing = int(torch.isnan(scores).sum())
    if missing:
        raise RuntimeError(f"search: {missing} shortlisted pairs got no token score (gallery rows vanished from {features.uri}?)")
    return scores


def chunk_arrays(queries: pa.Table, positives: dict[str, np.ndarray], start: int, stop: int, info: dict[str, Any]) -> dict[str, Any]:
    """The arrays the actors need for queries [start, stop), positives renumbered within the chunk,
    and a `reference` to them in the object store (in a list: Ray passes it on unresolved)."""
    rows = queries.slice(start, stop - start)
    keep = (positives["positive_query"] >= start) & (positives["positive_query"] < stop)
    shape = (info["num_tokens"], info["token_dim"])
    arrays = {
        "global": np.ascontiguousarray(column_matrix(rows, "global")),
        "tokens": [np.ascontiguousarray(column_matrix(rows, name, shape)) for name in token_columns(info)],
        "positive_query": positives["positive_query"][keep] - start,
        "positive_score": positives["positive_score"][keep],
        "positive_key": positives["positive_key"][keep],
        "positive_id": positives["gallery_id"].filter(pa.array(keep)),
        "ids": rows.column("image_id").combine_chunks(),
        "items": rows.column("item_id").combine_chunks(),
    }
    return {**arrays, "reference": [ray.put(arrays)]}


def rank_chunk(chunk: dict[str, Any], shortlisted: Shortlisted, token_scores: torch.Tensor, alpha: float) -> tuple[pa.Table, pa.Table]:
    """Rerank the chunk's shortlists (mga.retrieval) into its rankings and positives rows."""
    ranking = rerank(shortlisted.top, token_scores, alpha)
    count, depth = ranking.rows.shape
    rows = pa.array(ranking.rows.reshape(-1).numpy())
    query_rows = pa.array(np.repeat(np.arange(count), depth))
    rank_global = torch.from_numpy(shortlisted.rank_global)
    rank_reranked = reranked_ranks(rank_global, torch.from_numpy(chunk["positive_query"]), ranking.head_order)
    positives_per_query = np.bincount(chunk["positive_query"], minlength=count)
    rankings = pa.table(
        {
            "query_id": chunk["ids"].take(query_rows),
            "rank": pa.array(np.tile(np.arange(1, depth + 1), count), pa.int32()),
            "gallery_id": shortlisted.ids.take(rows),
            "score_global": pa.array(ranking.score_global.reshape(-1).numpy(), pa.float32()),
            "score_token": pa.array(ranking.score_token.reshape(-1).numpy(), pa.float32(), from_pandas=True),  # NaN -> null
            "score": pa.array(ranking.score.reshape(-1).numpy(), pa.float32()),
            "is_match": pc.equal(shortlisted.items.take(rows), chunk["items"].take(query_rows)),
            "query_positives": pa.array(np.repeat(positives_per_query, depth), pa.int32()),
        },
        schema=RANKINGS,
    )
    positives = pa.table(
        {
            "query_id": chunk["ids"].take(pa.array(chunk["positive_query"])),
            "gallery_id": chunk["positive_id"],
            # 0 = below an approximate shortlist: not retrieved (null).
            "rank_global": pa.array(rank_global.numpy(), pa.int64(), mask=rank_global.numpy() == 0),
            "rank_reranked": pa.array(rank_reranked.numpy(), pa.int64(), mask=rank_reranked.numpy() == 0),
        },
        schema=POSITIVES,
    )
    return rankings, positives
