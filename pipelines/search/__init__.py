"""`mga search`: exact shortlist on global features, ATA rerank of the head, bounded rankings.

The gallery is the rows of the features table `--features` that pass `--gallery-where`
(default `split = 'gallery'`); the queries are the rows of `--queries` (default the same
table) that pass `--queries-where` (default `split = 'query'`): a retailer's uploads, embedded
into a table of their own with the same model, are matched against the catalog's. Filters
are SQL on the identity columns (pipelines.filters), pushed into every read. A query
without an item (an unlabelled photo) is ranked like any other; it has no positives and a
null `is_match`. For every query the ranking is mga.retrieval's: global order, the first
`--rerank-top` reranked by the fused score S, the rest below in global order. The job writes

- the **rankings** table: the first `--depth` (default 100) results per query, with both
  ids and both items, so "the catalog items for each photo" needs no join;
- the **positives** table beside it (`<out>_positives`, named with its version in the
  rankings' commit metadata): for every gallery image of a labelled query's item, its
  full-gallery `rank_global` and `rank_reranked`, so R@K and mAP over the whole gallery
  need no queries x gallery rows (mga.metrics).
- the **shortlists** table (`<out>_shortlists`): each query's exact list in global order,
  deeper than the rankings, with S_token where computed: what `--incremental` updates
  (pipelines.search.incremental: the rankings brought to the tables' current versions with
  the rows a full search would write, reading only what changed).

Nothing is held whole: the queries are read from their table a chunk (`--query-chunk`) at a
time, with the chunk's positives (pipelines.search.queries); for each chunk the gallery's row
groups are read twice by the job's scan actors, started once for the whole search
(pipelines.search.gallery_scan explains the choice). Driver memory grows with the chunk and
the depth, not with the queries or the gallery. Shortlisting is torch matmul + top-k on each
actor's device, so a GPU has no cap on the depth. `--index ivf|hnsw|ivfpq` shortlists with a
faiss index instead (pipelines.search.approximate), and records its recall@100 against the
exact scan.

The positives, the shortlists and then the rankings are each one Delta commit (pipelines.tables), the
rankings' naming the others' versions and the gallery and queries tables with their
versions and filters: a search that fails or is killed leaves the previous rankings as
readers saw them; re-running it gives the same rows, however many actors ran, however the
queries were chunked and the gallery split into blocks.

The job is this module, light to import; where queries and gallery come from is `queries`,
one chunk's search and its ranked rows `ranking` (which `mga query` shares), the scans'
actors `gallery_scan`, the faiss shortlist `approximate`, the update `incremental` and what
changed in a table `changes`.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

from mga.errors import InputError
from mga.tie_keys import TIE_RULE
from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.resources import RERANK_PRECISIONS, actor_cpus, actor_gpus, add_gpu_arguments, cpu_multiplies_bf16, default_actors, execute
from pipelines.schemas import POSITIVES, RANKINGS, SHORTLISTS, token_columns
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, companion, open_table

DEFAULT_DEPTH = 100
# The default selections (pipelines.search.queries): kept here so that `--help` stays light.
DEFAULT_GALLERY_WHERE = "split = 'gallery'"
DEFAULT_QUERIES_WHERE = "split = 'query'"
INDEX_KINDS = ("exact", "ivf", "hnsw", "ivfpq")  # all but exact are faiss indexes (search.approximate)
RECALL_QUERIES = 1000  # queries the approximate shortlist's recall is measured on
# Of the cluster's memory, for the global features the scanners keep between query chunks (in
# files on their nodes' local disks, served by the page cache while memory allows: gallery_scan.KeptGallery).
GALLERY_MEMORY_SHARE = 0.3
# Queries a pass over the gallery: the driver holds ~100 KB a query of a chunk (its features, the
# shortlist merge's ids, the rankings rows; measured at 100k gallery images), ~1 GB here.
QUERY_CHUNK = 10000


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
    query_chunk: int = QUERY_CHUNK,
    block_rows: int = 32768,
    rerank_batch: int | None = None,
    model: str | None = None,
    use_gpu: str = "auto",
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float = 1.0,
    queries: str | None = None,
    gallery_where: str = DEFAULT_GALLERY_WHERE,
    queries_where: str = DEFAULT_QUERIES_WHERE,
    incremental: bool = False,
    rerank_precision: str = "auto",
) -> dict[str, Any]:
    # Here, not at the top: `mga search --help` and a usage error must not wait for torch and Ray.
    import pyarrow.compute as pc
    import ray

    from pipelines.memory import release_freed_memory
    from pipelines.model_store import ModelSource, model_info
    from pipelines.runtime import cores_up, init_ray
    from pipelines.search.approximate import build_index, shortlist_recall
    from pipelines.search.gallery_scan import ScannerPool
    from pipelines.search.incremental import IncrementalSearch, find_changes, previous_search, reserve
    from pipelines.search.queries import selections
    from pipelines.search.ranking import ChunkSearch, busy_actors, piece_rows_for
    from pipelines.token_ranges import stored_bytes

    for name, value in (("--depth", depth), ("--query-chunk", query_chunk), ("--block-rows", block_rows), ("--workers", workers or 1), ("--rerank-batch", rerank_batch or 1)):
        _check_positive(name, value)
    if rerank_top < 0:
        raise InputError(f"--rerank-top must be non-negative, got {rerank_top}")
    if rerank_precision not in RERANK_PRECISIONS:
        raise InputError(f"--rerank-precision must be one of {', '.join(RERANK_PRECISIONS)}, got {rerank_precision!r}")
    if index not in INDEX_KINDS:
        raise InputError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    if incremental and index != "exact":
        raise InputError(f"--incremental updates an exact search: --index {index} is approximate")
    actor_gpus(use_gpu, 0, gpus_per_actor), actor_cpus(0, cpus_per_actor)  # validate before anything runs
    started = time.time()
    gallery_table = open_table(resolve(features))
    queries_table = open_table(resolve(queries)) if queries else gallery_table
    gallery, source = selections(gallery_table, queries_table, gallery_where, queries_where)
    info = gallery_table.info
    model_uri = model or info["model"]
    model_id, model_config = model_info(model_uri)
    if model_id != info["model_id"]:
        raise InputError(f"{gallery_table.uri} was embedded with model_id {info['model_id']}, but {model_uri} is {model_id}: re-embed or pass the matching --model")
    alpha = float(model_config["model"]["alpha"])

    settings = {
        "features": gallery_table.uri, "gallery_where": gallery.where.text, "queries_table": queries_table.uri, "queries_where": source.where.text,
        "model_id": model_id, "alpha": alpha, "depth": depth, "rerank_top": rerank_top, "index": index, "tie_rule": TIE_RULE,
    }
    table = resolve(out)
    previous = previous_search(table, settings) if incremental else None
    why_full = previous if isinstance(previous, str) else None  # what rules an update out: a full search
    if why_full is not None:
        previous = None
    if previous is not None and (previous.info["features_version"], previous.info["queries_version"]) == (gallery_table.version, queries_table.version):
        return _nothing_to_do(previous, gallery_table, queries_table, table, started)

    init_ray(storage=[gallery_table.uri, queries_table.uri, table.uri, resolve(model_uri).uri])
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    # One precision for every S_token of the rankings, whatever node computes it: an update keeps
    # the one its rankings were made with, and a change of it makes the run a full search.
    made_with = None if previous is None else previous.info["search"].get("rerank_precision")
    settings["rerank_precision"] = rerank_precision if rerank_precision != "auto" else made_with or _native_precision(gpus)
    if previous is not None and made_with != settings["rerank_precision"]:
        why_full, previous = f"rerank_precision was {made_with!r} for {table.uri} version {previous.rankings.version}, now {settings['rerank_precision']!r}", None
    # On CPU, single-threaded actors filling the cluster: at 1M gallery images they searched in
    # 0.67x the time of one actor of 2 threads on 2 cores (numpy counts and the scans' Python
    # run on one thread; ATA's small matmuls scale poorly with threads). bench/RESULTS.md.
    # ... and never more actors than the smallest pieces would keep busy (a small gallery: one).
    workers = workers or min(default_actors(gpus, gpus_up, cores_up(), cpus_per_actor), busy_actors(gallery_table.rows))
    # More than one chunk of queries: the scanners keep the gallery rows they read (a share of the
    # cluster's memory, on local disk), so that every chunk after the first reads no table again.
    keep_bytes = int(GALLERY_MEMORY_SHARE * ray.cluster_resources().get("memory", 0) / workers) if source.count() > query_chunk else 0
    # The actors start (seconds: a process, torch) while an incremental run finds what changed.
    pool = ScannerPool(workers, {"num_gpus": gpus, "num_cpus": actor_cpus(gpus, cpus_per_actor)}, gallery_table.location, ModelSource(resolve(model_uri).uri, model_id),
                       gallery.where.expression, gpus > 0, keep_bytes)
    update = None
    if previous is not None:
        changes = find_changes(previous, gallery, source)
        if isinstance(changes, str):
            why_full = changes
        elif not changes:
            return _nothing_to_do(previous, gallery_table, queries_table, table, started)
        else:
            update = (previous, changes)
    # An incremental run searches in full only its new queries (and the few whose lists ran out).
    keep_gallery = bool(keep_bytes) and (update is None or update[1].queries.added.num_rows > query_chunk)
    # Pairs per ATA call: an H100 saturates at about 4096 (bench/retrieval_device.py); a CPU at ~128.
    rerank_batch = rerank_batch or (4096 if gpus else 128)
    reading = gallery_table.uri if queries_table is gallery_table else f"{gallery_table.uri} and {queries_table.uri}"
    approximate = execute(lambda: build_index(gallery, index), reading, table.uri) if index != "exact" else None
    # An exact search keeps deeper shortlists, for the next incremental run (search.incremental);
    # an incremental run's scanners keep its added and removed rows (O(changes)), which every
    # chunk of standing queries scans again.
    search = ChunkSearch(gallery, pool, depth, rerank_top, alpha, block_rows, rerank_batch, approximate, 0 if approximate is not None else reserve(depth),
                         keep_gallery=keep_gallery, keep_changes=bool(keep_bytes),
                         piece_rows=piece_rows_for(gallery_table.rows, workers), rerank_precision=settings["rerank_precision"])
    recall = None
    if approximate is not None:  # against the exact scan, on the first queries
        sample = next(source.chunks(RECALL_QUERIES, gallery))
        recall = execute(lambda: shortlist_recall(search.shortlist(sample, None, 100), search.shortlist(sample, None, 100, exact=True)), reading, table.uri)
    if update is not None:
        steps = IncrementalSearch(*update, search, source, query_chunk)
        chunks = iter(steps)
    else:
        chunks = ((chunk, search(chunk)) for chunk in source.chunks(query_chunk, gallery))
    totals = {"queries": 0, "unlabelled": 0, "rows": 0, "positives": 0, "shortlists": 0, "head": 0, "depth": 0, "gallery": 0}
    with TableWriter(table) as writer, TableWriter(companion(table, "positives")) as positives_writer, \
            TableWriter(companion(table, "shortlists")) as shortlists_writer:
        for part in itertools.count():
            step = execute(lambda: next(chunks, None), reading, table.uri)
            if step is None:
                break
            ranked = step[1]
            write_parquet(writer.file(f"rankings-{part:05d}.parquet"), ranked.rankings)
            write_parquet(positives_writer.file(f"positives-{part:05d}.parquet"), ranked.positives)
            write_parquet(shortlists_writer.file(f"shortlists-{part:05d}.parquet"), ranked.shortlists)
            firsts = ranked.rankings.filter(pc.field("rank") == 1)
            for name, value in (("queries", firsts.num_rows), ("unlabelled", firsts.column("query_positives").null_count), ("rows", ranked.rankings.num_rows),
                                ("positives", ranked.positives.num_rows), ("shortlists", ranked.shortlists.num_rows)):
                totals[name] += value
            # Every chunk scans the same gallery: its size and the depth are any chunk's.
            totals.update(head=max(totals["head"], ranked.head), depth=ranked.depth, gallery=ranked.gallery_rows)
            del step, ranked  # the next chunk is read while only the rows written are kept
            release_freed_memory()
        positives_table = positives_writer.commit(POSITIVES, {"table": "positives", "of": table.uri, "rows": totals["positives"]})
        shortlists_table = shortlists_writer.commit(SHORTLISTS, {"table": "shortlists", "of": table.uri, "rows": totals["shortlists"]})
        incremental_info = None
        if update is not None:
            previous, changes = update
            incremental_info = {
                "from_version": previous.rankings.version,
                "gallery_removed": changes.gallery.removed.num_rows, "gallery_added": changes.gallery.added.num_rows,
                "queries_removed": changes.queries.removed.num_rows, "queries_added": changes.queries.added.num_rows, **steps.counts,
            }
        # What the token scans read, against the token columns' stored size in the gallery's row groups.
        token_bytes = stored_bytes(gallery_table.location.fs, gallery.pieces(), token_columns(info)) if totals["head"] else 0
        result = writer.commit(
            RANKINGS,
            {
                "table": "rankings",
                "features": gallery_table.uri,
                "features_version": gallery_table.version,
                "gallery_where": gallery.where.text,
                "queries_table": queries_table.uri,
                "queries_version": queries_table.version,
                "queries_where": source.where.text,
                "catalog": info.get("catalog"),
                "model_id": model_id,
                "alpha": alpha,
                "depth": totals["depth"],
                "rerank_top": totals["head"],
                "index": index,
                "shortlist_recall_at_100": recall,
                "queries": totals["queries"],
                "unlabelled_queries": totals["unlabelled"],
                "gallery": totals["gallery"],
                "rows": totals["rows"],
                "positives_rows": totals["positives"],
                "positives": {"table": positives_table.uri, "version": positives_table.version},
                "shortlists": {"table": shortlists_table.uri, "version": shortlists_table.version},
                "search": settings,
                "incremental": incremental_info,
                "token_bytes_read": search.stats.token_bytes,
                "gallery_pieces_scanned": search.stats.pieces_scanned,
                "gallery_pieces_read": search.stats.pieces_read,
                "token_bytes": token_bytes,
            },
        )
    lines = {
        "gallery": f"{gallery_table.uri} version {gallery_table.version} where {gallery.where.text} ({totals['gallery']} images, model_id {model_id})",
        "queries": f"{queries_table.uri} version {queries_table.version} where {source.where.text} "
                   f"({totals['queries']} queries, {totals['unlabelled']} of them unlabelled)",
    }
    if incremental_info is not None:
        lines["incremental"] = (
            f"from {table.uri} version {incremental_info['from_version']}: gallery -{incremental_info['gallery_removed']} +{incremental_info['gallery_added']} rows, "
            f"queries -{incremental_info['queries_removed']} +{incremental_info['queries_added']}; {incremental_info['updated']} queries updated, "
            f"{incremental_info['searched in full']} searched in full (of them {incremental_info['no longer complete']} whose shortlist no longer reached the depth, "
            f"{incremental_info['new positive below the list']} with a new image of their item below it); {incremental_info['token scores computed']} S_token computed for rows new to a head"
        )
    elif why_full is not None:
        lines["incremental"] = f"a full search: {why_full}"
    print_summary(
        "mga search" + (" --incremental" if incremental else ""),
        {
            **lines,
            "shortlist": (f"exact (blocked matmul + top-k, {block_rows} gallery rows a block)" if recall is None
                          else f"faiss {index}, recall@100 vs exact {recall:.3f}") + f", depth {totals['depth']}",
            "rerank": f"top {totals['head']} per query by ATA (alpha {alpha}, {rerank_batch} pairs a call, {settings['rerank_precision']})",
            "wrote": f"{table.uri} (version {result.version}, {totals['rows']} rankings rows); positives with full-gallery ranks: "
                     f"{positives_table.uri} (version {positives_table.version}, {totals['positives']} rows); shortlists: "
                     f"{shortlists_table.uri} (version {shortlists_table.version}, {totals['shortlists']} rows)",
            "scans": f"shortlist {search.stats.shortlist_s:.1f} s, tokens {search.stats.token_s:.1f} s (ATA included) over all chunks; "
                     f"{search.stats.pieces_read} of {search.stats.pieces_scanned} gallery pieces scored were read from the table, the rest from the scanners' local copies",
            "token reads": f"{search.stats.token_bytes / 2**20:.1f} MiB of the gallery's {token_bytes / 2**20:.1f} MiB of tokens "
                           f"({100 * search.stats.token_bytes / max(token_bytes, 1):.1f}%; by byte ranges where the files' layout allows)",
            "workers": f"{workers} x " + (f"{gpus:g} GPU" if gpus else f"{cpus_per_actor:g} CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return {**result.info, "version": result.version, "committed": True}


def _native_precision(gpus: float) -> str:
    """`--rerank-precision auto`: bfloat16 where the scanners' devices multiply it natively (GPUs;
    CPUs with AVX512-BF16 or AMX on every node), else float32."""
    from pipelines.nodes import every_node_multiplies_bf16
    from pipelines.runtime import cluster_address

    native = gpus > 0 or (every_node_multiplies_bf16() if cluster_address() else cpu_multiplies_bf16())
    return "bfloat16" if native else "float32"


def _nothing_to_do(previous: Any, gallery_table: Any, queries_table: Any, table: Any, started: float) -> dict[str, Any]:
    """An incremental run whose selections did not change since `previous`: says so, commits nothing."""
    print_summary("mga search --incremental", {
        "nothing to do": f"no row of the gallery ({gallery_table.uri} version {gallery_table.version}) or the queries "
                         f"({queries_table.uri} version {queries_table.version}) changed since {table.uri} version {previous.rankings.version}: nothing committed",
        "wall time": f"{time.time() - started:.1f} s",
    })
    return {**previous.info, "version": previous.rankings.version, "committed": False}


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features table URI written by `mga embed`: the gallery (and, without --queries, the queries)")
    parser.add_argument("--queries", default=None, help="features table URI of the queries, embedded with the same model (default: --features)")
    parser.add_argument("--gallery-where", default=DEFAULT_GALLERY_WHERE, help="SQL filter on the identity columns choosing the gallery rows (default: %(default)s)")
    parser.add_argument("--queries-where", default=DEFAULT_QUERIES_WHERE, help="SQL filter on the identity columns choosing the query rows (default: %(default)s; TRUE: every row)")
    parser.add_argument("--out", required=True, help="rankings table URI to publish")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="ranked gallery images written per query (metrics still cover the whole gallery)")
    parser.add_argument("--rerank-top", type=int, default=50, help="candidates per query reranked by ATA")
    parser.add_argument("--index", default="exact", choices=INDEX_KINDS, help="exact: a blocked scan on the actors' devices; ivf|hnsw|ivfpq: a faiss index on the driver (ivfpq: 64-byte codes for 10^7+ images)")
    parser.add_argument("--workers", type=int, default=None, help="scan actors, started once for the whole search (default: one per GPU up, else one per --cpus-per-actor CPUs of the cluster; no more than the gallery has 4,096-row pieces)")
    parser.add_argument("--query-chunk", type=int, default=QUERY_CHUNK, help="queries searched per pass over the gallery (bounds the driver's memory: ~100 KB a query; default %(default)s)")
    parser.add_argument("--block-rows", type=int, default=32768, help="gallery rows scored per shortlist block")
    parser.add_argument("--rerank-batch", type=int, default=None, help="query-candidate pairs per ATA call (default: 4096 on GPU, 128 on CPU)")
    parser.add_argument("--rerank-precision", default="auto", choices=RERANK_PRECISIONS,
                        help="ATA's arithmetic: auto = bfloat16 on GPUs and on CPUs with bfloat16 dot products (AVX512-BF16, AMX; S_token within ~1e-3 of float32), else float32; "
                             "an --incremental run keeps the precision its rankings were made with")
    parser.add_argument("--model", default=None, help="model artifact (default: the one the features were embedded with)")
    parser.add_argument("--incremental", action="store_true", help="update the rankings at --out to the tables' current versions (exact; a full search when they cannot be updated)")
    add_gpu_arguments(parser, "search", cpus_per_actor=1.0)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.features, args.out, args.depth, args.rerank_top, args.index, args.workers, args.query_chunk, args.block_rows, args.rerank_batch, args.model,
        use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        queries=args.queries, gallery_where=args.gallery_where, queries_where=args.queries_where, incremental=args.incremental,
        rerank_precision=args.rerank_precision,
    )


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)
