"""The evaluate job: R@K and mAP of a rankings table, written as metrics.json plus a report.

    python -m pipelines.evaluate --rankings URI --out URI [--depth N]

Every query is scored under two orderings of its ranked rows (DESIGN.md, "Metrics"):
"global" sorts by `score_global` descending, ties by `gallery_id` ascending; "reranked"
follows `rank` (the ATA-reranked top followed by the rest in global order). The
evaluation depth is the rankings' depth unless a smaller one is asked for.

Search writes each query's rows into a single Parquet file, so one Ray task per file
turns its rows into small per-query arrays (|P|, first-match rank and AP per ordering),
scoring them in bounded blocks of queries x depth; the driver only aggregates those.
The features table (named by the rankings manifest) supplies each query's category and
the catalog (named by the features manifest) the pictures of a few examples; without
them the report is written anyway and says what is missing.

Outputs in `--out`: recall.png, per_category.png, gallery.png, report.md, report.html,
and metrics.json last, so a reader never finds a report without its metrics.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mga.metrics import DEFAULT_KS, RetrievalMetrics, average_precision, dense_matches, first_match_rank
from pipelines import storage
from pipelines.report import GalleryExample, gallery_picture, write_report
from pipelines.runtime import init_ray

RANKING_COLUMNS = ["query_id", "rank", "gallery_id", "score_global", "is_match", "query_positives"]
ORDERINGS = ("global", "reranked")
BLOCK_CELLS = 1 << 22  # queries x depth booleans scored at once (4 MiB)
GALLERY_TOP = 5  # results per query in the gallery picture
UNKNOWN_CATEGORY = "(unknown)"
# What reading the optional features/catalog tables may raise: no manifest, a snapshot
# gone from under the manifest, a missing column. The report is written without them.
TABLE_ERRORS = (storage.StorageError, OSError, pa.ArrowException)


def _score_ordering(
    codes: np.ndarray, offsets: np.ndarray, is_match: np.ndarray, positives: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """First-match rank and AP per query, from rows already in ranked order within each query.

    `codes` (query of each row) is sorted, `offsets` are the starts of each query's rows;
    queries are scored in blocks of at most BLOCK_CELLS booleans.
    """
    num_queries = len(positives)
    position = np.arange(len(codes)) - offsets[codes]
    first_rank = np.zeros(num_queries, dtype=np.int64)
    ap = np.zeros(num_queries, dtype=np.float64)
    step = max(1, BLOCK_CELLS // depth)
    for start in range(0, num_queries, step):
        stop = min(start + step, num_queries)
        rows = slice(offsets[start], offsets[stop])
        block = dense_matches(codes[rows] - start, position[rows], is_match[rows], stop - start, depth)
        first_rank[start:stop] = first_match_rank(block)
        ap[start:stop] = average_precision(block, positives[start:stop])
    return first_rank, ap


def _sorted_codes(values: pa.ChunkedArray) -> np.ndarray:
    """0-based dense rank of each value: equal values share a code, codes sort like values."""
    return pc.rank(values, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64) - 1


def score_rankings(table: pa.Table, depth: int, examples: int = 0, top: int = GALLERY_TOP) -> dict[str, Any]:
    """Per-query pieces of one rankings file, queries sorted by id.

    Returns `query_id`, `positives` (|P|), `first_rank_<ordering>` and `ap_<ordering>` for
    both orderings, `rows`, and `examples`: the top `top` reranked results of the first
    `examples` queries that have a positive, for the gallery picture.
    """
    # Dense integer codes that sort like the ids (Arrow's sort beats numpy's on strings):
    # lexsort then groups rows by query and breaks score ties on the gallery id.
    query_code = _sorted_codes(table["query_id"])
    gallery_code = _sorted_codes(table["gallery_id"])
    query_ids = np.empty(int(query_code.max(initial=-1)) + 1, dtype=object)
    query_ids[query_code] = table["query_id"].to_numpy(zero_copy_only=False)
    gallery_ids = table["gallery_id"].to_numpy(zero_copy_only=False)
    is_match = pc.fill_null(table["is_match"], False).to_numpy(zero_copy_only=False).astype(bool)
    row_positives = table["query_positives"].to_numpy(zero_copy_only=False).astype(np.int64)
    positives = np.zeros(len(query_ids), dtype=np.int64)
    positives[query_code] = row_positives
    if np.any(positives[query_code] != row_positives):
        raise ValueError("query_positives differs between rows of one query")

    score_global = table["score_global"].to_numpy(zero_copy_only=False).astype(np.float64)
    rank = table["rank"].to_numpy(zero_copy_only=False).astype(np.int64)
    # lexsort: the last key is the primary one; each ordering stays grouped by query.
    orders = {
        "global": np.lexsort((gallery_code, -score_global, query_code)),
        "reranked": np.lexsort((gallery_code, rank, query_code)),
    }
    offsets = np.concatenate([[0], np.cumsum(np.bincount(query_code, minlength=len(query_ids)))])
    result: dict[str, Any] = {"query_id": query_ids.astype(str), "positives": positives, "rows": table.num_rows}
    for ordering, order in orders.items():
        result[f"first_rank_{ordering}"], result[f"ap_{ordering}"] = _score_ordering(
            query_code[order], offsets, is_match[order], positives, depth
        )
    reranked = orders["reranked"]
    result["examples"] = _examples(
        query_ids, positives, offsets, gallery_ids[reranked], is_match[reranked], examples, top
    )
    return result


def _examples(
    query_ids: np.ndarray,
    positives: np.ndarray,
    offsets: np.ndarray,
    ranked_gallery_ids: np.ndarray,
    ranked_matches: np.ndarray,
    count: int,
    top: int,
) -> list[GalleryExample]:
    """The first `count` queries with a positive, each with its first `top` ranked rows."""
    examples = []
    for query in np.flatnonzero(positives > 0)[:count]:
        rows = slice(offsets[query], min(offsets[query] + top, offsets[query + 1]))
        examples.append(
            GalleryExample(
                str(query_ids[query]),
                tuple(str(gallery_id) for gallery_id in ranked_gallery_ids[rows]),
                tuple(bool(match) for match in ranked_matches[rows]),
            )
        )
    return examples


@ray.remote
def score_file(table_uri: str, path: str, depth: int, examples: int) -> dict[str, Any]:
    """Ray task: read one rankings file (only the needed columns) and score it."""
    table = pq.read_table(path, filesystem=storage.resolve(table_uri).fs, columns=RANKING_COLUMNS)
    return score_rankings(table, depth, examples)


def _score_files(table: storage.Location, files: list[str], depth: int, examples: int) -> list[dict[str, Any]]:
    """Fan out one task per file; print progress about every tenth of the files."""
    pending = [score_file.remote(table.uri, path, depth, examples) for path in files]
    done: list[dict[str, Any]] = []
    reported = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += ray.get(ready)
        if len(done) == len(files) or len(done) - reported >= max(1, len(files) // 10):
            reported = len(done)
            print(f"evaluate: scored {len(done)}/{len(files)} rankings files", flush=True)
    return done


def _gather(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate per-file arrays, sorted by query id; a query found twice is an error."""
    keys = ["query_id", "positives"] + [f"{piece}_{o}" for o in ORDERINGS for piece in ("first_rank", "ap")]
    merged = {key: np.concatenate([part[key] for part in parts]) for key in keys}
    order = np.argsort(merged["query_id"], kind="stable")
    merged = {key: values[order] for key, values in merged.items()}
    ids = merged["query_id"]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        duplicate = ids[1:][ids[1:] == ids[:-1]][0]
        raise ValueError(f"query {duplicate!r} appears in more than one rankings file")
    return merged


def _metric_values(result: dict[str, float | int]) -> dict[str, float]:
    return {name: value for name, value in result.items() if name.startswith("R@") or name == "mAP"}


def _orderings_metrics(per_query: dict[str, np.ndarray], mask: np.ndarray, ks: Sequence[int]) -> dict[str, dict]:
    """RetrievalMetrics results of both orderings over the queries in `mask`."""
    results = {}
    for ordering in ORDERINGS:
        accumulator = RetrievalMetrics(ks)
        accumulator.add(
            per_query[f"first_rank_{ordering}"][mask], per_query[f"ap_{ordering}"][mask], per_query["positives"][mask]
        )
        results[ordering] = accumulator.result()
    return results


def _rerank_effect(per_query: dict[str, np.ndarray], depth: int) -> dict[str, float | int]:
    """Shares of queries (with a positive) whose first match moved up, down or stayed."""
    included = per_query["positives"] > 0
    # No match within the depth ranks below every match.
    before, after = (
        np.where(r == 0, depth + 1, r)[included]
        for r in (per_query["first_rank_global"], per_query["first_rank_reranked"])
    )
    total = max(int(included.sum()), 1)
    return {
        "queries": int(included.sum()),
        "improved": int((after < before).sum()) / total,
        "worsened": int((after > before).sum()) / total,
        "unchanged": int((after == before).sum()) / total,
    }


def _per_category(per_query: dict[str, np.ndarray], categories: np.ndarray, ks: Sequence[int]) -> dict[str, dict]:
    table = {}
    for category in sorted(set(categories.tolist())):
        results = _orderings_metrics(per_query, categories == category, ks)
        row: dict[str, Any] = {
            "queries": results["global"]["queries"],
            "excluded_queries": results["global"]["excluded_queries"],
        }
        for ordering, result in results.items():
            row.update({f"{ordering}_{name}": value for name, value in _metric_values(result).items()})
        table[category] = row
    return table


def _query_categories(
    features_uri: str | None, query_ids: np.ndarray, notes: list[str]
) -> tuple[np.ndarray | None, str | None]:
    """Each query's category from the features table, and the catalog URI its manifest names."""
    if not features_uri:
        notes.append("The rankings manifest names no features table: no per-category table, no gallery picture.")
        return None, None
    try:
        features = storage.resolve(features_uri)
        manifest = storage.read_manifest(features)
        rows = storage.read_table(
            features, columns=["image_id", "category", "split"], filter=pc.field("image_id").isin(pa.array(query_ids))
        )
    except TABLE_ERRORS as error:
        notes.append(f"Features table unavailable ({error}): no per-category table, no gallery picture.")
        return None, None
    category_of = dict(zip(rows["image_id"].to_pylist(), rows["category"].to_pylist(), strict=True))
    categories = np.array([category_of.get(query) or UNKNOWN_CATEGORY for query in query_ids.tolist()], dtype=object)
    missing = len(query_ids) - len(category_of)
    if missing:
        notes.append(f"{missing} queries are not in the features table {features_uri}: category {UNKNOWN_CATEGORY}.")
    not_query = sum(1 for split in rows["split"].to_pylist() if split != "query")
    if not_query:
        notes.append(f"{not_query} ranked queries are not split=query rows of the features table.")
    catalog = manifest.get("catalog")
    if not catalog:
        notes.append(f"The features manifest of {features_uri} names no catalog: no gallery picture.")
    return categories, catalog


def _gallery(catalog_uri: str | None, examples: list[GalleryExample], notes: list[str]) -> bytes | None:
    """The gallery picture, reading only the example rows' images from the catalog."""
    if not catalog_uri or not examples:
        return None
    wanted = sorted(
        {example.query_id for example in examples} | {g for example in examples for g in example.gallery_ids}
    )
    try:
        catalog = storage.resolve(catalog_uri)
        rows = storage.read_table(
            catalog, columns=["image_id", "image"], filter=pc.field("image_id").isin(pa.array(wanted))
        )
    except TABLE_ERRORS as error:
        notes.append(f"Catalog unavailable ({error}): no gallery picture.")
        return None
    images = dict(zip(rows["image_id"].to_pylist(), rows["image"].to_pylist(), strict=True))
    if len(images) < len(wanted):
        notes.append(
            f"{len(wanted) - len(images)} of the {len(wanted)} gallery picture images are not in the catalog "
            f"{catalog_uri}: shown as grey placeholders."
        )
    return gallery_picture(examples, images)


def run(
    rankings: str,
    out: str,
    depth: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_examples: int = 8,
) -> dict[str, Any]:
    """Evaluate the published rankings table at `rankings`, write the report into `out`.

    Returns the metrics.json content: `queries` (evaluated, |P| > 0), `excluded_queries`,
    `depth`, `rerank_top`, `global` and `reranked` ({"R@K": ..., "mAP": ...} as fractions),
    `per_category`, `rerank_effect`, `model_id`, `notes` and where it all came from.
    """
    started = time.time()
    init_ray()
    table = storage.resolve(rankings)
    manifest = storage.read_manifest(table)
    files = storage.table_files(table)
    if not files:
        raise storage.StorageError(f"{table.uri}: the published rankings snapshot lists no files")
    rankings_depth = int(manifest["depth"])
    depth = rankings_depth if depth is None else int(depth)
    if not 1 <= depth <= rankings_depth:
        raise ValueError(f"depth must be between 1 and the rankings' depth {rankings_depth}, got {depth}")
    ks = RetrievalMetrics(ks).ks  # validated and sorted before any work starts

    parts = _score_files(table, files, depth, gallery_examples)
    per_query = _gather(parts)
    examples = sorted((e for part in parts for e in part["examples"]), key=lambda e: e.query_id)[:gallery_examples]
    notes: list[str] = []
    categories, catalog_uri = _query_categories(manifest.get("features"), per_query["query_id"], notes)
    gallery_png = _gallery(catalog_uri, examples, notes)

    overall = _orderings_metrics(per_query, np.ones(len(per_query["query_id"]), dtype=bool), ks)
    if overall["global"]["queries"] == 0:
        notes.append("No query has a gallery image of its item: every metric is 0.")
    if ks[-1] > depth:
        notes.append(f"R@K for K > {depth} (the evaluation depth) can only count matches within the first {depth}.")
    if manifest.get("queries") is not None and int(manifest["queries"]) != len(per_query["query_id"]):
        notes.append(
            f"The rankings manifest counts {manifest['queries']} queries; its files hold {len(per_query['query_id'])}."
        )
    metrics: dict[str, Any] = {
        "queries": overall["global"]["queries"],
        "excluded_queries": overall["global"]["excluded_queries"],
        "depth": depth,
        "rerank_top": manifest.get("rerank_top"),
        "global": _metric_values(overall["global"]),
        "reranked": _metric_values(overall["reranked"]),
        "per_category": _per_category(per_query, categories, ks) if categories is not None else {},
        "rerank_effect": _rerank_effect(per_query, depth),
        "model_id": manifest.get("model_id"),
        "alpha": manifest.get("alpha"),
        "rankings": table.uri,
        "rankings_snapshot": manifest.get("snapshot"),
        "rankings_files": len(files),
        "rankings_rows": int(sum(part["rows"] for part in parts)),
        "notes": notes,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    target = storage.resolve(out)
    written = write_report(target, metrics, gallery_png)
    storage.write_json(target.join("metrics.json"), metrics)
    written.append(target.join("metrics.json").uri)
    _print_summary(metrics, written, time.time() - started)
    return metrics


def _print_summary(metrics: dict[str, Any], written: list[str], seconds: float) -> None:
    names = list(metrics["global"])
    effect = metrics["rerank_effect"]
    lines = [
        f"evaluate: done in {seconds:.1f}s",
        f"  read      {metrics['rankings']}: {metrics['rankings_rows']} rows in {metrics['rankings_files']} files, "
        f"{metrics['queries'] + metrics['excluded_queries']} queries (model {metrics['model_id']})",
        f"  evaluated {metrics['queries']} queries at depth {metrics['depth']}, rerank top {metrics['rerank_top']}",
        f"  excluded  {metrics['excluded_queries']} queries with no gallery image of their item",
        "  " + "metric".ljust(9) + "".join(name.rjust(8) for name in names),
        "  " + "global".ljust(9) + "".join(f"{metrics['global'][n]:8.4f}" for n in names),
        "  " + "reranked".ljust(9) + "".join(f"{metrics['reranked'][n]:8.4f}" for n in names),
        f"  rerank    improved {effect['improved']:.4f}, worsened {effect['worsened']:.4f}, "
        f"unchanged {effect['unchanged']:.4f} (first-match rank)",
        f"  wrote     {', '.join(written)}",
    ]
    lines += [f"  note      {note}" for note in metrics["notes"]]
    print("\n".join(lines), flush=True)


def build_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of `mga evaluate` and `python -m pipelines.evaluate`."""
    parser.add_argument("--rankings", required=True, help="rankings table URI written by `mga search`")
    parser.add_argument("--out", required=True, help="report directory (local path or s3://bucket/prefix)")
    parser.add_argument("--depth", type=int, default=None, help="evaluation depth (default: the rankings' depth)")
    parser.add_argument(
        "--ks",
        type=lambda text: [int(k) for k in text.split(",")],
        default=list(DEFAULT_KS),
        help="comma-separated K of R@K (default: 1,10,20,30,40,50)",
    )
    parser.add_argument("--gallery-examples", type=int, default=8, help="queries shown in the gallery picture")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.rankings, args.out, depth=args.depth, ks=args.ks, gallery_examples=args.gallery_examples)


def main(argv: Sequence[str] | None = None) -> None:
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
