"""The metrics history: a Delta table with one row per evaluation, appended by `mga evaluate`.

A row says what was evaluated (the rankings table and version, the gallery's and the
queries' features tables and versions, the model) and when, and holds every metric of
metrics.json: `global` and `reranked` map each metric name (R@K, mAP) to its value, so the
set of K can change between evaluations without changing the table's schema, and
`per_category` maps each query category to its metrics. The report plots the rows of its
rankings table (pipelines.report.history_plot); DuckDB reads them as they are:

    SELECT evaluated_at, rankings_version, reranked['R@1'], reranked['mAP']
    FROM delta_scan('s3://bucket/rankings_history') ORDER BY evaluated_at

Each evaluation is its own append commit: evaluations of different rankings tables may
share one history, and two that commit at once both land (the loser of the race retries).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.storage import Location, resolve, write_parquet
from pipelines.tables import TableConflict, TableWriter, companion, open_table, read_table, table_exists

METRIC_VALUES = pa.map_(pa.string(), pa.float64())
HISTORY = pa.schema(
    [
        ("evaluated_at", pa.timestamp("us", tz="UTC")),
        ("rankings", pa.string()),
        ("rankings_version", pa.int64()),
        ("features", pa.string()),  # the gallery's features table
        ("features_version", pa.int64()),
        ("queries_table", pa.string()),
        ("queries_version", pa.int64()),
        ("model_id", pa.string()),
        ("depth", pa.int64()),  # the evaluation depth; null: the whole gallery
        ("rerank_top", pa.int64()),
        ("gallery", pa.int64()),
        ("queries", pa.int64()),
        ("excluded_queries", pa.int64()),
        ("unlabelled_queries", pa.int64()),
        ("global", METRIC_VALUES),
        ("reranked", METRIC_VALUES),
        ("per_category", pa.map_(pa.string(), METRIC_VALUES)),
    ]
)
COMMIT_TRIES = 5  # appends never conflict in content: a lost race is retried on the new version


def history_location(rankings: Location, history: str) -> Location:
    """The metrics history of the rankings table at `rankings`: `history` when given, else `<rankings>_history`."""
    return resolve(history) if history else companion(rankings, "history")


def history_row(metrics: Mapping[str, Any]) -> pa.Table:
    """The history row of one evaluation (the evaluate job's metrics.json content)."""
    depth = metrics["depth"]
    row = {
        "evaluated_at": datetime.fromisoformat(metrics["evaluated_at"]),
        "rankings": metrics["rankings"],
        "rankings_version": metrics["rankings_version"],
        "features": metrics.get("features"),
        "features_version": metrics.get("features_version"),
        "queries_table": metrics.get("queries_table"),
        "queries_version": metrics.get("queries_version"),
        "model_id": metrics.get("model_id"),
        "depth": None if depth == "gallery" else int(depth),
        "rerank_top": metrics.get("rerank_top"),
        "gallery": metrics.get("gallery"),
        "queries": metrics["queries"],
        "excluded_queries": metrics["excluded_queries"],
        "unlabelled_queries": metrics["unlabelled_queries"],
        "global": list(metrics["global"].items()),
        "reranked": list(metrics["reranked"].items()),
        "per_category": [
            (category, [(name, float(value)) for name, value in values.items()]) for category, values in metrics["per_category"].items()
        ],
    }
    return pa.Table.from_pylist([row], schema=HISTORY)


def append_history(location: Location, row: pa.Table) -> int:
    """Append `row` to the history table at `location` (created by the first); returns the version."""
    attempt = 1
    while True:
        try:
            with TableWriter(location) as writer:  # a lost race deletes its file on the way out
                write_parquet(writer.file("evaluation.parquet"), row)
                return writer.commit(HISTORY, {"table": "metrics_history"}, remove=[]).version
        except TableConflict:
            if attempt == COMMIT_TRIES:
                raise
            attempt += 1


def read_history(location: Location, rankings: str, depth: int | None) -> pa.Table:
    """The history's evaluations of the rankings table `rankings` at the evaluation `depth`
    (null: the whole gallery), oldest first; an empty table when there is no history yet."""
    if not table_exists(location):
        return HISTORY.empty_table()
    rows = read_table(open_table(location), HISTORY.names, pc.field("rankings") == rankings)
    same_depth = pc.is_null(rows.column("depth")) if depth is None else pc.equal(rows.column("depth"), depth)
    return rows.filter(pc.fill_null(same_depth, False)).sort_by("evaluated_at")


def evaluated(location: Location, rankings: str, version: int, depth: int | None) -> bool:
    """Whether the history holds an evaluation of `rankings` at `version` and `depth`."""
    rows = read_history(location, rankings, depth)
    return bool(pc.any(pc.equal(rows.column("rankings_version"), version)).as_py())
