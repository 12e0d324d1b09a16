"""pipelines.search.changes: the rows of a selection that changed between two versions, found
from the files only one version lists and the rows' identity (on local disk and on S3)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mga.errors import InputError
from pipelines.filters import parse_filter
from pipelines.search.changes import row_changes
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, copy_without, open_table

SCHEMA = pa.schema([
    ("image_id", pa.string()), ("item_id", pa.string()), ("split", pa.string()), ("domain", pa.string()),
    ("category", pa.string()), ("sha256", pa.string()), ("embedded_at", pa.timestamp("us", tz="UTC")),
])


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return resolve(str(tmp_path / "features"))
    return resolve(f"s3://{request.getfixturevalue('s3_env')['bucket']}/features")


def rows(*specs: tuple) -> pa.Table:
    """Rows of (image_id, item_id, split, sha256, embedded_at)."""
    columns = list(zip(*specs))
    return pa.table({
        "image_id": columns[0], "item_id": columns[1], "split": columns[2], "domain": ["shop"] * len(specs),
        "category": ["top"] * len(specs), "sha256": columns[3], "embedded_at": pa.array(columns[4], pa.timestamp("us", tz="UTC")),
    }, schema=SCHEMA)


def commit(location, drop: list[str], new: pa.Table | None) -> int:
    """A version as `mga embed --incremental` commits one: the files holding `drop` rewritten
    without them, `new` in a file of its own."""
    with TableWriter(location) as writer:
        remove = []
        if writer.base is not None:
            remove = writer.base.files.column("path").to_pylist()
            for number, path in enumerate(remove):
                copy_without(location, path, drop, writer.file(f"rewritten-{number}.parquet"), pq.read_schema(path, filesystem=location.fs))
        if new is not None:
            write_parquet(writer.file("new.parquet"), new)
        return writer.commit(SCHEMA, {"table": "features"}, remove=remove if writer.base is not None else None).version


def test_changes_are_the_rows_whose_identity_differs(location):
    commit(location, [], rows(
        ("a", "item-1", "gallery", "s-a", 1), ("b", None, "query", "s-b", 1), ("c", "item-2", "gallery", "s-c", 1),
        ("d", "item-2", "gallery", "s-d", 1), ("t", "item-3", "train", "s-t", 1),
    ))
    # a relabelled, c re-embedded, e new, t (not selected) re-embedded; b (an unlabelled photo: a
    # null item) and d only copied into the rewritten file.
    version = commit(location, ["a", "c", "t"], rows(
        ("a", "item-9", "gallery", "s-a", 1), ("c", "item-2", "gallery", "s-c2", 2), ("e", "item-4", "gallery", "s-e", 2),
        ("t", "item-3", "train", "s-t2", 2),
    ))
    where = parse_filter("split IN ('gallery', 'query')")
    changes = row_changes(location, 0, open_table(location, version), where)
    assert sorted(changes.removed.to_pylist(), key=str) == sorted([{"image_id": "a", "item_id": "item-1"}, {"image_id": "c", "item_id": "item-2"}], key=str)
    assert sorted(changes.added.column("image_id").to_pylist()) == ["a", "c", "e"]
    assert changes.added.column("item_id").to_pylist()[changes.added.column("image_id").to_pylist().index("a")] == "item-9"
    # Only the files one version lists were read: the rewritten one and the new one.
    assert changes.old.files.num_rows == 1 and changes.new.files.num_rows == 2
    # Nothing changed between a version and itself.
    assert not row_changes(location, version, open_table(location, version), where)


def test_an_image_id_twice_is_refused(location):
    commit(location, [], rows(("a", "item-1", "gallery", "s-a", 1)))
    version = commit(location, [], rows(("x", "item-1", "gallery", "s-x", 1), ("x", "item-2", "gallery", "s-y", 1)))
    with pytest.raises(InputError, match="image_id must be unique"):
        row_changes(location, 0, open_table(location, version), parse_filter("split = 'gallery'"))
