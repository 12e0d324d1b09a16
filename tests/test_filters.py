"""`--gallery-where` / `--queries-where`: SQL filters on the identity columns, checked against
DuckDB's own evaluation of the same WHERE text, and the files and row groups they let a
read skip."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from mga.errors import InputError
from pipelines.filters import parse_filter
from pipelines.search.queries import Gallery
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table

ROWS = pa.table(
    {
        "image_id": [f"img-{i}" for i in range(8)],
        "item_id": ["a", "a", "b", None, "c", "c", None, "it's"],
        "split": ["gallery", "gallery", "gallery", "query", "query", "gallery", "query", "gallery"],
        "domain": ["shop", "consumer", "shop", "consumer", "consumer", "shop", "shop", "shop"],
        "category": ["dress", "dress", "skirt", "dress", None, "coat", "skirt", "dress"],
        "sha256": ["0"] * 8,
    }
)

FILTERS = [
    "split = 'gallery'",
    "split = 'gallery' AND domain = 'shop'",
    "category IN ('dress', 'skirt')",
    "category NOT IN ('dress')",
    "item_id IS NULL",
    "item_id IS NOT NULL AND split = 'query'",
    "item_id != 'a'",
    "item_id <> 'a' OR category = 'coat'",
    "NOT (domain = 'consumer' OR category <> 'dress')",
    "NOT category IN ('dress')",
    "(split = 'query' OR split = 'gallery') and domain in ('shop')",
    "item_id = 'it''s'",
    "TRUE",
]


@pytest.mark.parametrize("text", FILTERS)
def test_a_filter_selects_what_duckdb_selects(text):
    chosen = pads.dataset(ROWS).to_table(filter=parse_filter(text).expression).column("image_id").to_pylist()
    rows = ROWS  # noqa: F841 - DuckDB reads the Arrow table by its Python name
    expected = [row[0] for row in duckdb.sql(f"SELECT image_id FROM rows WHERE {text} ORDER BY image_id").fetchall()]
    assert sorted(chosen) == expected


def test_pruning_comes_from_the_top_level_equalities_only():
    assert parse_filter("split = 'gallery' AND category IN ('a', 'b')").pruning == (("split", ("gallery",)), ("category", ("a", "b")))
    assert parse_filter("split = 'gallery' OR domain = 'shop'").pruning == ()
    assert parse_filter("NOT split = 'gallery'").pruning == ()
    assert parse_filter("(split = 'gallery' AND domain = 'shop') AND category != 'x'").pruning == (("split", ("gallery",)), ("domain", ("shop",)))


@pytest.mark.parametrize(
    "text, message",
    [
        ("colour = 'red'", "unknown column 'colour': a filter takes image_id, item_id, split, domain, category, sha256"),
        ("split = gallery", "expected a 'quoted' string, found 'gallery'"),
        ("split = 'gallery' AND", "ends early"),
        ("split = 'gallery')", "unexpected ')'"),
        ("split > 'a'", "cannot read \"> 'a'\""),
        ("", "empty filter (TRUE takes every row)"),
        ("split LIKE 'g%'", "expected =, !=, <>, IN, NOT IN or IS [NOT] NULL after split, found 'LIKE'"),
    ],
)
def test_a_bad_filter_is_one_line_naming_the_option(text, message):
    with pytest.raises(InputError) as error:
        parse_filter(text, "--gallery-where")
    assert str(error.value) == f"--gallery-where {text!r}: {message}"


def test_a_filter_skips_the_files_and_row_groups_its_statistics_exclude(tmp_path):
    """Three files, one category each, two row groups each (by split): a filter on category reads
    the files that may hold it, a filter on split the row groups that may."""
    location = resolve(str(tmp_path / "features"))
    categories = ("dress", "skirt", "coat")
    with TableWriter(location) as writer:
        for number, category in enumerate(categories):
            rows = pa.table({"image_id": [f"{category}-{i}" for i in range(4)], "split": ["gallery", "gallery", "query", "query"],
                             "category": [category] * 4})
            write_parquet(writer.file(f"part-{number}.parquet"), rows, row_group_size=2)
        table = writer.commit(rows.schema, {"table": "features"})
    pieces = Gallery(table, parse_filter("category IN ('dress', 'coat') AND split = 'gallery'")).pieces()
    assert sorted((path.rsplit("/", 1)[-1], groups) for path, groups in pieces) == [("part-0.parquet", (0,)), ("part-2.parquet", (0,))]
    # Nothing to prune on: every row group, a file's consecutive groups read as one piece.
    assert sorted(groups for _, groups in Gallery(table, parse_filter("category != 'dress'")).pieces()) == [(0, 1)] * 3
    Gallery(table, parse_filter("category = 'coat'")).require_rows("--gallery-where")
    with pytest.raises(InputError, match=r"version 0\): no row matches --gallery-where \"category = 'hat'\""):
        Gallery(table, parse_filter("category = 'hat'")).require_rows("--gallery-where")
    with pytest.raises(InputError, match="no row matches --queries-where \"category = 'coat' AND split = 'train'\""):
        Gallery(open_table(location), parse_filter("category = 'coat' AND split = 'train'")).require_rows("--queries-where")
