"""`mga search`: exact shortlist on global features, ATA rerank of the head, bounded rankings.

For every query (`split=query` rows of the features table) against the gallery
(`split=gallery` rows), the ranking is mga.retrieval's: global order, the first
`--rerank-top` reranked by the fused score S, the rest below in global order. The job writes

- the **rankings** table: the first `--depth` (default 100) results per query;
- the **positives** table beside it (`<out>_positives`, named with its version in the
  rankings' commit metadata): for every
  gallery image of the query's item, its full-gallery `rank_global` and `rank_reranked`,
  so R@K and mAP over the whole gallery need no queries x gallery rows (mga.metrics).

The gallery is never held: queries are handled in chunks of `--query-chunk`, and for each
chunk the gallery's files stream twice through autoscaling actor pools
(pipelines.gallery_scan explains the choice). Per-node memory grows with the queries and
the depth, not with the gallery. Shortlisting is torch matmul + top-k on each actor's
device, so a GPU has no cap on the depth. `--index ivf|hnsw|ivfpq` shortlists with a faiss
index instead (pipelines.approximate), and records its recall@100 against the exact scan.

The positives and then the rankings are each one Delta commit (pipelines.tables), the
rankings' naming the positives' version: a search that fails or is killed leaves the
previous rankings as readers saw them; re-running it gives the same rows, however
many actors ran and however the gallery was split into blocks.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from mga.retrieval import pair_scores, rerank, reranked_ranks, tie_keys
from mga.errors import InputError
from pipelines.approximate import APPROXIMATE, approximate_shortlist, build_index, shortlist_recall
from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.gallery_scan import ShortlistMerge, ShortlistScan, Shortlisted, TokenScorer
from pipelines.catalog import table_dataset
from pipelines.model_store import load_artifact, read_artifact_files
from pipelines.resources import actor_cpus, actor_gpus, actor_pool, add_gpu_arguments, default_actors, execute
from pipelines.runtime import init_ray
from pipelines.schemas import POSITIVES, RANKINGS
from pipelines.schemas import column_matrix
from pipelines.storage import resolve, write_parquet
from pipelines.tables import Snapshot, TableWriter, companion, open_table, read_table

DEFAULT_DEPTH = 100
INDEX_KINDS = ("exact", *APPROXIMATE)
RECALL_QUERIES = 1000  # queries the approximate shortlist's recall is measured on


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


def _gallery_dataset(features: Snapshot, columns: list[str], ids: pa.Array | None = None) -> ray.data.Dataset:
    """The gallery rows' `columns` (only those of `ids`, if given) as a stream."""
    return table_dataset(features, columns, ("split", ["gallery"]), *([] if ids is None else [("image_id", ids.to_pylist())]))


def _pool_args(gpus: float, cpus_per_actor: float, workers: int) -> dict[str, Any]:
    return {"compute": actor_pool(workers), "num_gpus": gpus, "num_cpus": actor_cpus(gpus, cpus_per_actor), "batch_format": "pyarrow"}


def shortlist_scan(features: Snapshot, chunk: dict[str, Any], depth: int, block_rows: int, pool: dict[str, Any]) -> Shortlisted:
    """Pass 1: the chunk's exact top-`depth` and each positive's count of gallery images before it."""
    merge = ShortlistMerge(len(chunk["global"]), depth, len(chunk["positive_query"]))
    dataset = _gallery_dataset(features, ["image_id", "item_id", "global"]).map_batches(
        ShortlistScan, fn_constructor_kwargs={"queries": [ray.put(chunk)], "depth": depth, "use_gpu": pool["num_gpus"] > 0}, batch_size=block_rows, **pool
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for index in range(batch.num_rows):
            merge.add({name: _scalar_value(batch.column(name)[index]) for name in batch.column_names})
    try:
        return merge.result()
    except ValueError as error:
        raise InputError(f"{features.uri}: {error}") from None


def _scalar_value(scalar: pa.Scalar) -> Any:
    return scalar.values if isinstance(scalar, pa.ListScalar) else scalar.as_py()


def token_scan(features: Snapshot, chunk: dict[str, Any], shortlisted: Shortlisted, head: int, files: dict[str, bytes], rerank_batch: int, pool: dict[str, Any]) -> torch.Tensor:
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
    names = token_columns(features.info)
    dataset = _gallery_dataset(features, ["image_id", *names], pc.unique(pairs.column("gallery_id"))).map_batches(
        TokenScorer,
        fn_constructor_kwargs={
            "artifact": [ray.put(files)], "queries": [ray.put({"tokens": chunk["tokens"]})], "pairs": [ray.put(pairs)],
            "token_names": names, "rerank_batch": rerank_batch, "use_gpu": pool["num_gpus"] > 0,
        },
        batch_size=4 * rerank_batch,  # candidate rows: >= 4 ATA calls a block, so padding the last wastes <= 1/4
        **pool,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        query, position = (torch.from_numpy(batch.column(name).to_numpy().astype(np.int64)) for name in ("query", "head"))
        scores[query, position] = torch.from_numpy(batch.column("score_token").to_numpy())
    missing = int(torch.isnan(scores).sum())
    if missing:
        raise RuntimeError(f"search: {missing} shortlisted pairs got no token score (gallery rows vanished from {features.uri}?)")
    return scores


def _chunk(queries: pa.Table, positives: dict[str, np.ndarray], start: int, stop: int, info: dict[str, Any]) -> dict[str, Any]:
    """The arrays the actors need for queries [start, stop), positives renumbered within the chunk."""
    rows = queries.slice(start, stop - start)
    keep = (positives["positive_query"] >= start) & (positives["positive_query"] < stop)
    shape = (info["num_tokens"], info["token_dim"])
    return {
        "global": np.ascontiguousarray(column_matrix(rows, "global")),
        "tokens": [np.ascontiguousarray(column_matrix(rows, name, shape)) for name in token_columns(info)],
        "positive_query": positives["positive_query"][keep] - start,
        "positive_score": positives["positive_score"][keep],
        "positive_key": positives["positive_key"][keep],
        "positive_id": positives["gallery_id"].filter(pa.array(keep)),
        "ids": rows.column("image_id").combine_chunks(),
        "items": rows.column("item_id").combine_chunks(),
    }


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


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{name} must be positive, got {value}")


def run(
    features: str,
    out: str,
    depth: int = DEFAULT_DEPTH,
    rerank_top: int = 50,
    index: str = "exact",
    workers: int | None = None,
    query_chunk: int = 20000,
    block_rows: int = 32768,
    rerank_batch: int | None = None,
    model: str | None = None,
    use_gpu: str = "auto",
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float = 2.0,
) -> dict[str, Any]:
    for name, value in (("--depth", depth), ("--query-chunk", query_chunk), ("--block-rows", block_rows), ("--workers", workers or 1), ("--rerank-batch", rerank_batch or 1)):
        _check_positive(name, value)
    if rerank_top < 0:
        raise InputError(f"--rerank-top must be non-negative, got {rerank_top}")
    if index not in INDEX_KINDS:
        raise InputError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    actor_gpus(use_gpu, 0, gpus_per_actor), actor_cpus(0, cpus_per_actor)  # validate before anything runs
    started = time.time()
    features_table = open_table(resolve(features))
    info = features_table.info
    if info.get("table") != "features":
        raise InputError(f"{features_table.uri} (version {features_table.version}) was not written by `mga embed`: its commits carry no features metadata")
    model_uri = model or info["model"]
    files = read_artifact_files(model_uri)
    _, model_id, model_config = load_artifact(files, resolve(model_uri).uri)
    if model_id != info["model_id"]:
        raise InputError(f"{features_table.uri} was embedded with model_id {info['model_id']}, but {model_uri} is {model_id}: re-embed or pass the matching --model")
    alpha = float(model_config["model"]["alpha"])
    queries = read_queries(features_table)
    positives = find_positives(features_table, queries)

    init_ray()
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    workers = workers or default_actors(gpus, gpus_up)
    pool = _pool_args(gpus, cpus_per_actor, workers)
    # Pairs per ATA call: an H100 saturates at about 4096 (bench/retrieval_device.py); a CPU at ~128.
    rerank_batch = rerank_batch or (4096 if gpus else 128)
    approximate = build_index(features_table, index) if index != "exact" else None
    recall = None
    if approximate is not None:  # against the exact scan, on the first queries
        sample = _chunk(queries, positives, 0, min(RECALL_QUERIES, queries.num_rows), info)
        exact = execute(lambda: shortlist_scan(features_table, sample, 100, block_rows, pool), features_table.uri, out)
        recall = shortlist_recall(approximate_shortlist(*approximate, sample, 100), exact)
    table = resolve(out)
    totals = {"rows": 0, "positives": 0, "head": 0}
    with TableWriter(table) as writer, TableWriter(companion(table, "positives")) as positives_writer:
        for part, start in enumerate(range(0, queries.num_rows, query_chunk)):
            chunk = _chunk(queries, positives, start, min(start + query_chunk, queries.num_rows), info)
            shortlisted = (
                execute(lambda: shortlist_scan(features_table, chunk, depth, block_rows, pool), features_table.uri, table.uri)
                if approximate is None else approximate_shortlist(*approximate, chunk, depth)
            )
            head = min(rerank_top, shortlisted.top.rows.shape[1]) if alpha < 1.0 else 0
            token_scores = (
                execute(lambda: token_scan(features_table, chunk, shortlisted, head, files, rerank_batch, pool), features_table.uri, table.uri)
                if head else torch.zeros(len(chunk["global"]), 0)
            )
            rankings, positive_rows = rank_chunk(chunk, shortlisted, token_scores, alpha)
            write_parquet(writer.file(f"rankings-{part:05d}.parquet"), rankings)
            write_parquet(positives_writer.file(f"positives-{part:05d}.parquet"), positive_rows)
            totals = {"rows": totals["rows"] + rankings.num_rows, "positives": totals["positives"] + positive_rows.num_rows, "head": max(head, totals["head"])}
        # Every chunk scans the same gallery: its size and the depth are the last chunk's.
        totals.update(gallery=shortlisted.gallery_rows, depth=shortlisted.top.rows.shape[1])
        positives_table = positives_writer.commit(POSITIVES, {"table": "positives", "of": table.uri, "rows": totals["positives"]})
        result = writer.commit(
            RANKINGS,
            {
                "table": "rankings",
                "features": features_table.uri,
                "features_version": features_table.version,
                "catalog": info.get("catalog"),
                "model_id": model_id,
                "alpha": alpha,
                "depth": totals["depth"],
                "rerank_top": totals["head"],
                "index": index,
                "shortlist_recall_at_100": recall,
                "queries": queries.num_rows,
                "gallery": totals["gallery"],
                "rows": totals["rows"],
                "positives_rows": totals["positives"],
                "positives": {"table": positives_table.uri, "version": positives_table.version},
            },
        )
    print_summary(
        "mga search",
        {
            "read": f"{features_table.uri} version {features_table.version} ({queries.num_rows} queries, {totals['gallery']} gallery images, model_id {model_id})",
            "shortlist": (f"exact (blocked matmul + top-k, {block_rows} gallery rows a block)" if recall is None
                          else f"faiss {index}, recall@100 vs exact {recall:.3f}") + f", depth {totals['depth']}",
            "rerank": f"top {totals['head']} per query by ATA (alpha {alpha}, {rerank_batch} pairs a call)",
            "wrote": f"{table.uri} (version {result.version}, {totals['rows']} rankings rows); positives with full-gallery ranks: "
                     f"{positives_table.uri} (version {positives_table.version}, {totals['positives']} rows)",
            "workers": f"up to {workers} x " + (f"{gpus:g} GPU" if gpus else f"{cpus_per_actor:g} CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return {**result.info, "version": result.version}


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features table URI written by `mga embed`")
    parser.add_argument("--out", required=True, help="rankings table URI to publish")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="ranked gallery images written per query (metrics still cover the whole gallery)")
    parser.add_argument("--rerank-top", type=int, default=50, help="candidates per query reranked by ATA")
    parser.add_argument("--index", default="exact", choices=INDEX_KINDS, help="exact: a blocked scan on the actors' devices; ivf|hnsw|ivfpq: a faiss index on the driver (ivfpq: 64-byte codes for 10^7+ images)")
    parser.add_argument("--workers", type=int, default=None, help="most actors per pool; pools start with one and grow while blocks queue (default: one per GPU up, else 1)")
    parser.add_argument("--query-chunk", type=int, default=20000, help="queries searched per pass over the gallery (bounds memory by queries x depth)")
    parser.add_argument("--block-rows", type=int, default=32768, help="gallery rows scored per shortlist block")
    parser.add_argument("--rerank-batch", type=int, default=None, help="query-candidate pairs per ATA call (default: 4096 on GPU, 128 on CPU)")
    parser.add_argument("--model", default=None, help="model artifact (default: the one the features were embedded with)")
    add_gpu_arguments(parser, "search")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.features, args.out, args.depth, args.rerank_top, args.index, args.workers, args.query_chunk, args.block_rows, args.rerank_batch, args.model,
        use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
    )


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
