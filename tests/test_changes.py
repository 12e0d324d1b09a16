"""pipelines.search.changes: the rows of a selection that changed between two versions, found
from the files only one version lists and the rows' identity (on local disk and on S3), with
and without the lineage of rewritten files that `mga embed --incremental` commits."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mga.errors import InputError
from pipelines.filters import parse_filter
from pipelines.search.changes import row_changes
from pipelines.rewrites import copy_without
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table

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


@pytest.fixture(params=["lineage", "no lineage"])
def lineage(request) -> bool:
    """Whether rewrites record the file they copy (embed does; another engine's rewrite does not)."""
    return request.param == "lineage"


def copies_without(writer: TableWriter, paths: list[str], drop: list[str]) -> dict[str, str]:
    """Each file of `paths` copied into `writer`'s run without the rows `drop`, as embed's merge
    rewrites them; their lineage, {copy: source}."""
    copies = {}
    for number, path in enumerate(paths):
        target = writer.file(f"rewritten-{number}.parquet")
        copy_without(writer.location, path, drop, target, pq.read_schema(path, filesystem=writer.location.fs))
        copies[target.path] = path
    return copies


def commit(location, drop: list[str], new: pa.Table | None, lineage: bool = True) -> int:
    """A version as `mga embed --incremental` commits one: the files holding `drop` rewritten
    without them (and their lineage recorded, unless `lineage` is false), `new` in a file of its own."""
    with TableWriter(location) as writer:
        remove = writer.base.files.column("path").to_pylist() if writer.base is not None else []
        copies = copies_without(writer, remove, drop)
        if new is not None:
            write_parquet(writer.file("new.parquet"), new)
        return writer.commit(SCHEMA, {"table": "features"}, remove=remove if writer.base is not None else None, copies=copies if lineage else None).version


def test_changes_are_the_rows_whose_identity_differs(location, lineage):
    commit(location, [], rows(
        ("a", "item-1", "gallery", "s-a", 1), ("b", None, "query", "s-b", 1), ("c", "item-2", "gallery", "s-c", 1),
        ("d", "item-2", "gallery", "s-d", 1), ("t", "item-3", "train", "s-t", 1),
    ))
    # a relabelled, c re-embedded, e new, t (not selected) re-embedded; b (an unlabelled photo: a
    # null item) and d only copied into the rewritten file.
    version = commit(location, ["a", "c", "t"], rows(
        ("a", "item-9", "gallery", "s-a", 1), ("c", "item-2", "gallery", "s-c2", 2), ("e", "item-4", "gallery", "s-e", 2),
        ("t", "item-3", "train", "s-t2", 2),
    ), lineage)
    where = parse_filter("split IN ('gallery', 'query')")
    changes = row_changes(location, 0, open_table(location, version), where)
    assert sorted(changes.removed.to_pylist(), key=str) == sorted([{"image_id": "a", "item_id": "item-1"}, {"image_id": "c", "item_id": "item-2"}], key=str)
    assert sorted(changes.added.column("image_id").to_pylist()) == ["a", "c", "e"]
    assert changes.added.column("item_id").to_pylist()[changes.added.column("image_id").to_pylist().index("a")] == "item-9"
    # Only the files one version lists were read: the rewritten one and the new one (with its
    # lineage, the rewritten one holds no new row).
    assert changes.old.files.num_rows == 1 and changes.new.files.num_rows == (1 if lineage else 2)
    # Nothing changed between a version and itself.
    assert not row_changes(location, version, open_table(location, version), where)


def test_an_image_id_twice_is_refused(location):
    commit(location, [], rows(("a", "item-1", "gallery", "s-a", 1)))
    version = commit(location, [], rows(("x", "item-1", "gallery", "s-x", 1), ("x", "item-2", "gallery", "s-y", 1)))
    with pytest.raises(InputError, match="image_id must be unique"):
        row_changes(location, 0, open_table(location, version), parse_filter("split = 'gallery'"))


def test_copies_of_copies_across_versions(location, lineage):
    """Three nights of churn between the versions compared: with lineage, each file of the last
    version is traced back through the copies between to the file of the first it copies."""
    commit(location, [], rows(*[(f"g{i}", f"item-{i % 4}", "gallery", f"s{i}", 1) for i in range(12)]))
    commit(location, ["g1", "g2"], rows(("n1", "item-1", "gallery", "s-n1", 2), ("g2", "item-2", "gallery", "s-g2b", 2)), lineage)
    commit(location, ["g5", "n1"], None, lineage)
    version = commit(location, ["g7"], rows(("g5", "item-9", "gallery", "s5", 1)), lineage)
    changes = row_changes(location, 0, open_table(location, version), parse_filter("split = 'gallery'"))
    # g1 and g7 deleted, g2 re-embedded, g5 relabelled; n1 came and went in between.
    assert sorted(changes.removed.column("image_id").to_pylist()) == ["g1", "g2", "g5", "g7"]
    assert sorted(changes.added.column("image_id").to_pylist()) == ["g2", "g5"]
    # Traced back: the copy of the first version's file; not: the copy of the second's new file
    # (no file of the first version) and the last's new file, whose identity is read.
    assert changes.new.files.num_rows == (2 if lineage else 3)


def test_a_copy_with_rows_its_source_lacks_is_refused(location):
    commit(location, [], rows(("a", "item-1", "gallery", "s-a", 1), ("b", "item-1", "gallery", "s-b", 1)))
    with TableWriter(location) as writer:
        source = writer.base.files.column("path")[0].as_py()
        forged = writer.file("rewritten-0.parquet")
        write_parquet(forged, rows(("a", "item-1", "gallery", "s-a", 1), ("z", "item-1", "gallery", "s-z", 1)))
        version = writer.commit(SCHEMA, {"table": "features"}, remove=[source], copies={forged.path: source}).version
    with pytest.raises(InputError, match="holds rows that .* did not"):
        row_changes(location, 0, open_table(location, version), parse_filter("split = 'gallery'"))


def test_a_new_row_with_the_id_of_a_copied_one_is_refused(location):
    commit(location, [], rows(("a", "item-1", "gallery", "s-a", 1), ("b", "item-1", "gallery", "s-b", 1)))
    version = commit(location, ["b"], rows(("a", "item-2", "gallery", "s-a2", 2)))
    with pytest.raises(InputError, match="image_id must be unique"):
        row_changes(location, 0, open_table(location, version), parse_filter("split = 'gallery'"))
