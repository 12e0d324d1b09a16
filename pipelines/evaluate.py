"""The evaluate job: R@K and mAP of a rankings table, written as metrics.json plus a report.

    python -m pipelines.evaluate --rankings URI --out URI [--depth N]

Metrics come from the positives table `mga search` writes beside the rankings (DESIGN.md,
"Metrics"): every gallery image of each query's item with its full-gallery rank under both
orderings, "global" (S_global, ties by a fixed key of the gallery id) and "reranked" (the
ATA-reranked head followed by the rest in global order), both from mga.retrieval, the step
search and training validation share. So R@K and mAP are exact over the whole gallery
while the rankings hold only the first `--depth` rows per query; `--depth` here cuts the
ranking (a positive below it counts as not retrieved). Rows are read through the table,
whatever files hold them; memory grows with the queries and their positives only.
Unlabelled queries (photos without an item: null `query_positives`) are ranked but cannot
be scored: they are left out of every metric and counted (`unlabelled_queries`).
The queries' features table (named with its version in the rankings' commit metadata)
supplies each query's category; the catalogs the queries' and the gallery's features came
from (named likewise) the pictures of a few examples, each read at the version the
rankings were made from; without them the report is written anyway and says what is missing. `--version N` evaluates an older
version of the rankings (Delta time travel).

Outputs in `--out`: recall.png, per_category.png, gallery.png, history.png, report.md,
report.html, and metrics.json last, so a reader never finds a report without its metrics.
Then the evaluation is appended to the metrics history (pipelines.history; `--history URI`,
default `<rankings>_history`), whose earlier evaluations of the same rankings the report
plots beside this one: a drop after a new model or a broken feed shows at a glance.
With a tracking URI (`--tracking-uri`, else MLFLOW_TRACKING_URI) the metrics and the report go
to MLflow too: to the run of the training that made the model (found by its model_id), or to
a new run naming the rankings table and versions when there is none.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mga.errors import InputError
from mga.metrics import DEFAULT_KS, RetrievalMetrics, rank_metrics
from pipelines import storage
from pipelines.catalog import TABLE_ERRORS, catalog_images, features_catalog
from pipelines.command import module_main
from pipelines.history import append_history, history_location, history_row, read_history
from pipelines.tables import Snapshot, TableNotFound, open_table, read_table
from pipelines.report import GalleryExample, gallery_picture, write_report
from pipelines.tracking import configured_uri

ORDERINGS = ("global", "reranked")
GALLERY_TOP = 5  # results per query in the gallery picture
UNKNOWN_CATEGORY = "(unknown)"


def read_queries(table: Snapshot) -> tuple[np.ndarray, np.ndarray, int]:
    """Every ranked labelled query id (sorted) and its |P|, from the rank-1 rows of every
    rankings file; and how many ranked queries are unlabelled (null |P|: no item to score)."""
    rows = read_table(table, ["query_id", "query_positives"], pc.field("rank") == 1).sort_by("query_id")
    ids = rows.column("query_id").to_numpy(zero_copy_only=False).astype(str)
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise InputError(f"{table.uri}: query {ids[1:][ids[1:] == ids[:-1]][0]!r} is ranked more than once")
    labelled = np.asarray(pc.is_valid(rows.column("query_positives")))
    positives = pc.fill_null(rows.column("query_positives"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return ids[labelled], positives[labelled], int((~labelled).sum())


def score_positives(positives: pa.Table, query_ids: np.ndarray, query_positives: np.ndarray, depth: int | None) -> dict[str, np.ndarray]:
    """Per query (aligned with `query_ids`): |P|, and the first-match rank and AP of both orderings.

    `positives` holds one row per (query, positive) with its full-gallery ranks; a query's
    rows may come from any file. Every positive of every query must be there: the count per
    query is checked against the rankings' `query_positives`.
    """
    index = pc.index_in(positives.column("query_id"), value_set=pa.array(query_ids)).to_numpy(zero_copy_only=False)
    if np.isnan(index.astype(float)).any():
        raise InputError("the positives table names queries that the rankings do not rank")
    index = index.astype(np.int64)
    per_query: dict[str, np.ndarray] = {"query_id": query_ids}
    for ordering in ORDERINGS:
        ranks = pc.fill_null(positives.column(f"rank_{ordering}"), 0).to_numpy(zero_copy_only=False)  # null: not ranked
        first, ap, counts = rank_metrics(index, ranks, len(query_ids), depth)
        per_query[f"first_rank_{ordering}"], per_query[f"ap_{ordering}"] = first, ap
    if np.any(counts != query_positives):
        worst = int(np.argmax(counts != query_positives))
        raise InputError(
            f"query {query_ids[worst]!r}: the positives table holds {int(counts[worst])} positives, the rankings count {int(query_positives[worst])}"
        )
    per_query["positives"] = counts
    return per_query


def read_examples(table: Snapshot, per_query: dict[str, np.ndarray], count: int, top: int = GALLERY_TOP) -> list[GalleryExample]:
    """The first `count` queries with a positive, each with its first `top` ranked results."""
    chosen = per_query["query_id"][per_query["positives"] > 0][:count]
    if len(chosen) == 0:
        return []
    rows = read_table(
        table, ["query_id", "rank", "gallery_id", "is_match"], pc.field("query_id").isin(pa.array(chosen)) & (pc.field("rank") <= top),
        ("query_id", chosen.tolist()),
    ).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    examples = []
    for query in chosen:
        mine = rows.filter(pc.equal(rows.column("query_id"), query))
        examples.append(GalleryExample(str(query), tuple(mine.column("gallery_id").to_pylist()), tuple(bool(m) for m in mine.column("is_match").to_pylist())))
    return examples


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


def _rerank_effect(per_query: dict[str, np.ndarray]) -> dict[str, float | int]:
    """Shares of queries (with a positive) whose first match moved up, down or stayed."""
    included = per_query["positives"] > 0
    # No match within the depth ranks below every match.
    before, after = (
        np.where(r == 0, np.iinfo(np.int64).max, r)[included]
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


def _query_categories(manifest: dict[str, Any], query_ids: np.ndarray, notes: list[str]) -> tuple[np.ndarray | None, Snapshot | None]:
    """Each query's category from the queries' features table, and that table's catalog (at
    the version the features came from), both named by the rankings' metadata."""
    features_uri = manifest.get("queries_table") or manifest.get("features")  # rankings from before --queries: one table
    version = manifest.get("queries_version", manifest.get("features_version"))
    if not features_uri:
        notes.append("The rankings' metadata names no features table: no per-category table, no gallery picture.")
        return None, None
    try:
        features = open_table(storage.resolve(features_uri), version)
        rows = read_table(features, ["image_id", "category"], pc.field("image_id").isin(pa.array(query_ids)), ("image_id", query_ids.tolist()))
    except TABLE_ERRORS as error:
        notes.append(f"Features table unavailable ({error}): no per-category table, no gallery picture.")
        return None, None
    category_of = dict(zip(rows["image_id"].to_pylist(), rows["category"].to_pylist(), strict=True))
    categories = np.array([category_of.get(query) or UNKNOWN_CATEGORY for query in query_ids.tolist()], dtype=object)
    missing = len(query_ids) - len(category_of)
    if missing:
        notes.append(f"{missing} queries are not in the features table {features_uri}: category {UNKNOWN_CATEGORY}.")
    return categories, features_catalog(features, notes)


def _gallery_catalog(manifest: dict[str, Any], query_catalog: Snapshot | None, notes: list[str]) -> Snapshot | None:
    """The catalog of the gallery's features table: the queries' own when both came from one table."""
    if manifest.get("queries_table") in (None, manifest.get("features")):
        return query_catalog
    try:
        return features_catalog(open_table(storage.resolve(manifest["features"]), manifest.get("features_version")), notes)
    except TABLE_ERRORS as error:
        notes.append(f"Gallery features table unavailable ({error}): no pictures of gallery images.")
        return None


def _gallery(query_catalog: Snapshot | None, gallery_catalog: Snapshot | None, examples: list[GalleryExample], notes: list[str]) -> bytes | None:
    """The gallery picture: each example query's image from its catalog, its results' from the gallery's."""
    if (query_catalog is None and gallery_catalog is None) or not examples:
        return None
    images = catalog_images(query_catalog, [example.query_id for example in examples], notes)
    images.update(catalog_images(gallery_catalog, [g for example in examples for g in example.gallery_ids], notes))
    return gallery_picture(examples, images)


def run(
    rankings: str,
    out: str,
    depth: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_examples: int = 8,
    version: int | None = None,
    history: str | None = "",
    tracking_uri: str = "",
) -> dict[str, Any]:
    """Evaluate the rankings table at `rankings` (its current version, or `version`), write the
    report into `out`, append the metrics to the history table `history` ("": the rankings'
    companion `<rankings>_history`; None: no history), and log it to MLflow with a tracking URI
    (`tracking_uri`, else MLFLOW_TRACKING_URI; pipelines.tracking).

    Returns the metrics.json content: `queries` (evaluated, |P| > 0), `excluded_queries`,
    `depth`, `rerank_top`, `global` and `reranked` ({"R@K": ..., "mAP": ...} as fractions),
    `per_category`, `rerank_effect`, `model_id`, `notes` and where it all came from.
    """
    started = time.time()
    table = open_table(storage.resolve(rankings), version)
    manifest = table.info
    if not isinstance(manifest.get("positives"), dict):
        raise storage.StorageError(f"{table.uri} (version {table.version}): its commits name no positives table (not written by `mga search`?)")
    if depth is not None and depth < 1:
        raise InputError(f"depth must be positive, got {depth}")
    ks = RetrievalMetrics(ks).ks  # validated and sorted before any work starts
    history_table = None if history is None else history_location(table.location, history)

    query_ids, query_positives, unlabelled = read_queries(table)
    try:
        positives_table = open_table(storage.resolve(manifest["positives"]["table"]), manifest["positives"]["version"])
    except TableNotFound as error:
        raise storage.StorageError(f"{table.uri}: {error}") from None
    positives = read_table(positives_table, ["query_id", "rank_global", "rank_reranked"])
    per_query = score_positives(positives, query_ids, query_positives, depth)
    examples = read_examples(table, per_query, gallery_examples)
    notes: list[str] = []
    categories, query_catalog = _query_categories(manifest, per_query["query_id"], notes)
    gallery_png = _gallery(query_catalog, _gallery_catalog(manifest, query_catalog, notes) if examples else None, examples, notes)

    overall = _orderings_metrics(per_query, np.ones(len(per_query["query_id"]), dtype=bool), ks)
    if overall["global"]["queries"] == 0:
        notes.append("No query has a gallery image of its item: every metric is 0.")
    if depth is not None and ks[-1] > depth:
        notes.append(f"R@K for K > {depth} (the evaluation depth) can only count matches within the first {depth}.")
    if manifest.get("queries") is not None and int(manifest["queries"]) != len(query_ids) + unlabelled:
        notes.append(f"The rankings' metadata counts {manifest['queries']} queries; its files hold {len(query_ids) + unlabelled}.")
    metrics: dict[str, Any] = {
        "queries": overall["global"]["queries"],
        "excluded_queries": overall["global"]["excluded_queries"],
        "unlabelled_queries": unlabelled,
        "depth": "gallery" if depth is None else depth,
        "rankings_depth": manifest.get("depth"),
        "gallery": manifest.get("gallery"),
        "rerank_top": manifest.get("rerank_top"),
        "global": _metric_values(overall["global"]),
        "reranked": _metric_values(overall["reranked"]),
        "per_category": _per_category(per_query, categories, ks) if categories is not None else {},
        "rerank_effect": _rerank_effect(per_query),
        "model_id": manifest.get("model_id"),
        "alpha": manifest.get("alpha"),
        "rankings": table.uri,
        "rankings_version": table.version,
        "features": manifest.get("features"),
        "features_version": manifest.get("features_version"),
        "queries_table": manifest.get("queries_table") or manifest.get("features"),
        "queries_version": manifest.get("queries_version", manifest.get("features_version")),
        "history": None if history_table is None else history_table.uri,
        "rankings_rows": manifest.get("rows"),
        "positives_rows": positives.num_rows,
        "notes": notes,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # orders the history's evaluations
    }

    row = history_row(metrics)
    past = None if history_table is None else pa.concat_tables([read_history(history_table, table.uri, depth), row])
    target = storage.resolve(out)
    written = write_report(target, metrics, gallery_png, past)
    storage.write_json(target.join("metrics.json"), metrics)
    written.append(target.join("metrics.json").uri)
    if history_table is not None:
        written.append(f"{history_table.uri} (version {append_history(history_table, row)})")
    tracked = _track(tracking_uri, metrics, target, written) if (tracking_uri := configured_uri(tracking_uri)) else None
    _print_summary(metrics, written, tracked, time.time() - started)
    return metrics


def _track(uri: str, metrics: dict[str, Any], report: storage.Location, written: list[str]) -> str | None:
    """Log the evaluation to the MLflow run of the model that made the features (by model_id), or to a new run
    naming the rankings; metrics at the rankings' version as step, the report's files as artifacts. Says where."""
    from pipelines import tracking

    name = metrics["rankings"].rstrip("/").rsplit("/", 1)[-1]
    tags = {"mga.rankings": metrics["rankings"], "mga.rankings_version": str(metrics["rankings_version"]), tracking.MODEL_TAG: str(metrics["model_id"] or "")}
    tracker, found = tracking.model_run(uri, metrics["model_id"], f"evaluate {name} v{metrics['rankings_version']}", tags)
    if tracker is None:
        return None
    if not found:
        tracker.log_params({key: metrics[key] for key in ("rankings", "rankings_version", "features", "features_version", "queries_table", "queries_version", "model_id")})
    values = {"eval_queries": metrics["queries"], "eval_excluded_queries": metrics["excluded_queries"], "eval_unlabelled_queries": metrics["unlabelled_queries"]}
    values.update({f"eval_{ordering}_{key}": value for ordering in ORDERINGS for key, value in metrics[ordering].items()})
    tracker.log_metrics(values, step=int(metrics["rankings_version"]))
    files = {uri.rsplit("/", 1)[-1]: storage.resolve(uri).read_bytes() for uri in written if uri.startswith(report.uri.rstrip("/") + "/")}
    tracker.log_files(files, f"evaluations/{name}/v{metrics['rankings_version']}")
    if not found:
        tracker.finish()
    if not tracker.active:
        return None
    whose = "the model's training run" if found else f"a new run in experiment {tracking.EVALUATIONS_EXPERIMENT} (no run has model_id {metrics['model_id']})"
    return f"MLflow run {tracker.run_id} at {uri} ({whose})"


def _print_summary(metrics: dict[str, Any], written: list[str], tracked: str | None, seconds: float) -> None:
    names = list(metrics["global"])
    effect = metrics["rerank_effect"]
    lines = [
        f"evaluate: done in {seconds:.1f}s",
        f"  read      {metrics['rankings']}: {metrics['queries'] + metrics['excluded_queries'] + metrics['unlabelled_queries']} queries, "
        f"{metrics['positives_rows']} positives with full-gallery ranks (model {metrics['model_id']})",
        f"  scored    {metrics['queries']} queries over a gallery of {metrics['gallery']} at depth {metrics['depth']}, rerank top {metrics['rerank_top']}",
        f"  excluded  {metrics['excluded_queries']} queries with no gallery image of their item",
        f"  unlabelled queries: {metrics['unlabelled_queries']} (ranked, no item to score)",
        "  " + "metric".ljust(9) + "".join(name.rjust(8) for name in names),
        "  " + "global".ljust(9) + "".join(f"{metrics['global'][n]:8.4f}" for n in names),
        "  " + "reranked".ljust(9) + "".join(f"{metrics['reranked'][n]:8.4f}" for n in names),
        f"  rerank    improved {effect['improved']:.4f}, worsened {effect['worsened']:.4f}, "
        f"unchanged {effect['unchanged']:.4f} (first-match rank)",
        f"  wrote     {', '.join(written)}",
    ]
    if tracked:
        lines.append(f"  logged    {tracked}")
    lines += [f"  note      {note}" for note in metrics["notes"]]
    print("\n".join(lines), flush=True)


def build_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of `mga evaluate` and `python -m pipelines.evaluate`."""
    parser.add_argument("--rankings", required=True, help="rankings table URI written by `mga search`")
    parser.add_argument("--out", required=True, help="report directory (local path or s3://bucket/prefix)")
    parser.add_argument("--depth", type=int, default=None, help="evaluation depth: a positive ranked below it counts as not retrieved (default: the whole gallery)")
    parser.add_argument(
        "--ks",
        type=lambda text: [int(k) for k in text.split(",")],
        default=list(DEFAULT_KS),
        help="comma-separated K of R@K (default: 1,10,20,30,40,50)",
    )
    parser.add_argument("--gallery-examples", type=int, default=8, help="queries shown in the gallery picture")
    parser.add_argument("--version", type=int, default=None, help="evaluate this version of the rankings table (default: the current one)")
    history = parser.add_mutually_exclusive_group()
    history.add_argument("--history", default="", help="metrics history table URI the evaluation is appended to (default: <rankings>_history)")
    history.add_argument("--no-history", dest="history", action="store_const", const=None, help="append to no history (and plot none)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI the evaluation is logged to (default: MLFLOW_TRACKING_URI; none without it)")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.rankings, args.out, depth=args.depth, ks=args.ks, gallery_examples=args.gallery_examples, version=args.version, history=args.history, tracking_uri=args.tracking_uri)


def main(argv: Sequence[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
