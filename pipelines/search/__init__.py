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
chunk the gallery's row groups are read twice by the job's scan actors, started once for
the whole search (pipelines.search.gallery_scan explains the choice). Per-node memory grows
with the queries and the depth, not with the gallery. Shortlisting is torch matmul + top-k
on each actor's device, so a GPU has no cap on the depth. `--index ivf|hnsw|ivfpq`
shortlists with a faiss index instead (pipelines.search.approximate), and records its
recall@100 against the exact scan.

The positives and then the rankings are each one Delta commit (pipelines.tables), the
rankings' naming the positives' version: a search that fails or is killed leaves the
previous rankings as readers saw them; re-running it gives the same rows, however
many actors ran and however the gallery was split into blocks.

The job is this module, light to import; a query chunk's side on the driver (its positives,
the two scans, its ranked rows) is `ranking`, the scans' actors `gallery_scan`, the faiss
shortlist `approximate`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mga.errors import InputError
from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.resources import actor_cpus, actor_gpus, add_gpu_arguments, default_actors, execute
from pipelines.schemas import POSITIVES, RANKINGS
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, companion, open_table

DEFAULT_DEPTH = 100
INDEX_KINDS = ("exact", "ivf", "hnsw", "ivfpq")  # all but exact are faiss indexes (search.approximate)
RECALL_QUERIES = 1000  # queries the approximate shortlist's recall is measured on


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
    # Here, not at the top: `mga search --help` and a usage error must not wait for torch and Ray.
    import ray
    import torch

    from pipelines.model_store import load_artifact, read_artifact_files
    from pipelines.runtime import init_ray
    from pipelines.search.approximate import approximate_shortlist, build_index, shortlist_recall
    from pipelines.search.ranking import chunk_arrays, find_positives, gallery_pieces, rank_chunk, read_queries, scanner_pool, shortlist_scan, token_scan

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
    pieces = execute(lambda: gallery_pieces(features_table), features_table.uri, out)
    pool = scanner_pool(features_table, files, workers, gpus, cpus_per_actor)
    # Pairs per ATA call: an H100 saturates at about 4096 (bench/retrieval_device.py); a CPU at ~128.
    rerank_batch = rerank_batch or (4096 if gpus else 128)
    approximate = build_index(features_table, index) if index != "exact" else None
    recall = None
    if approximate is not None:  # against the exact scan, on the first queries
        sample = chunk_arrays(queries, positives, 0, min(RECALL_QUERIES, queries.num_rows), info)
        exact = execute(lambda: shortlist_scan(features_table, pieces, sample, 100, block_rows, pool), features_table.uri, out)
        recall = shortlist_recall(approximate_shortlist(*approximate, sample, 100), exact)
    table = resolve(out)
    totals = {"rows": 0, "positives": 0, "head": 0}
    with TableWriter(table) as writer, TableWriter(companion(table, "positives")) as positives_writer:
        for part, start in enumerate(range(0, queries.num_rows, query_chunk)):
            chunk = chunk_arrays(queries, positives, start, min(start + query_chunk, queries.num_rows), info)
            shortlisted = (
                execute(lambda: shortlist_scan(features_table, pieces, chunk, depth, block_rows, pool), features_table.uri, table.uri)
                if approximate is None else approximate_shortlist(*approximate, chunk, depth)
            )
            head = min(rerank_top, shortlisted.top.rows.shape[1]) if alpha < 1.0 else 0
            token_scores = (
                execute(lambda: token_scan(features_table, chunk, shortlisted, head, rerank_batch, pool), features_table.uri, table.uri)
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
            "workers": f"{workers} x " + (f"{gpus:g} GPU" if gpus else f"{cpus_per_actor:g} CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)",
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
    parser.add_argument("--workers", type=int, default=None, help="scan actors, started once for the whole search (default: one per GPU up, else 1)")
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
