"""Delta tables: one commit per job, racing writers, readers that go through Delta, vacuum.

The unit tests write small tables by hand on local disk and on the moto S3 server; the Ray
tests race two real `mga embed` processes on one output and read a catalog the way DuckDB,
deltalake, Polars and Ray Data users do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from mga.artifact import pack_artifact
from mga.config import ModelConfig
from mga.model import MGAModel
from pipelines.synthetic import SynthSpec
from pipelines import synth
from pipelines.model_store import write_artifact
from pipelines.storage import StorageError, resolve, write_parquet
from pipelines.tables import TableConflict, TableNotFound, TableWriter, open_table, read_table, vacuum

SCHEMA = pa.schema([("image_id", pa.string()), ("item_id", pa.string())])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = SynthSpec(seed=3, groups=4, items_per_group=3, test_fraction=0.5, train_views=2, gallery_views=2, query_views=2, image_size=64)


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return resolve(str(tmp_path / "table"))
    bucket = request.getfixturevalue("s3_env")["bucket"]
    return resolve(f"s3://{bucket}/table")


def _rows(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "item_id": [f"item-{image_id[0]}" for image_id in ids]}, schema=SCHEMA)


def _stage(writer: TableWriter, ids: list[str]) -> None:
    write_parquet(writer.file("part-0.parquet"), _rows(ids))


def _ids(location) -> list[str]:
    return sorted(read_table(open_table(location), ["image_id"]).column("image_id").to_pylist())


def test_commit_versions_metadata_and_time_travel(location):
    for number, ids in enumerate((["a1", "a2"], ["b1"], ["c1", "c2", "c3"])):
        with TableWriter(location) as writer:
            _stage(writer, ids)
            committed = writer.commit(SCHEMA, {"table": "test", "number": number})
        assert committed.version == number and committed.rows == len(ids)
    assert _ids(location) == ["c1", "c2", "c3"]
    first = open_table(location, version=0)
    assert first.info == {"table": "test", "number": 0}
    assert sorted(read_table(first, ["image_id"]).column("image_id").to_pylist()) == ["a1", "a2"]
    with pytest.raises(StorageError, match="no version 7"):
        open_table(location, version=7)


def test_racing_merges_never_double_a_row(location):
    with TableWriter(location) as writer:
        _stage(writer, ["a1"])
        writer.commit(SCHEMA, {"n": 0})
    first, second = TableWriter(location), TableWriter(location)
    for writer in (first, second):  # both found b1 new and stage it
        _stage(writer, ["b1"])
    first.commit(SCHEMA, {"n": 1}, remove=[])
    with pytest.raises(TableConflict, match=r"another job committed version 1 while this one ran \(it started from version 0\)"):
        second.commit(SCHEMA, {"n": 2}, remove=[])
    second.abort()
    assert _ids(location) == ["a1", "b1"]


def test_racing_overwrites_and_creations(location):
    creators = TableWriter(location), TableWriter(location)
    for writer, ids in zip(creators, (["a1"], ["b1"])):
        _stage(writer, ids)
    creators[0].commit(SCHEMA, {"n": 0})
    with pytest.raises(TableConflict, match="started from no table"):
        creators[1].commit(SCHEMA, {"n": 1})
    overwriters = TableWriter(location), TableWriter(location)
    for writer, ids in zip(overwriters, (["c1"], ["d1"])):
        _stage(writer, ids)
    overwriters[1].commit(SCHEMA, {"n": 2})
    with pytest.raises(TableConflict):
        overwriters[0].commit(SCHEMA, {"n": 3})
    assert _ids(location) == ["d1"]


def test_failed_job_leaves_nothing_and_vacuum_keeps_the_current_version(location):
    with TableWriter(location) as writer:
        _stage(writer, ["a1"])
        writer.commit(SCHEMA, {"n": 0})
    with pytest.raises(RuntimeError, match="boom"), TableWriter(location) as failed:
        _stage(failed, ["x1"])
        raise RuntimeError("boom")
    assert failed.written() == [] and _ids(location) == ["a1"]
    killed = TableWriter(location)  # a job killed before its commit: its files stay, listed by no version
    _stage(killed, ["k1"])
    with TableWriter(location) as writer:
        _stage(writer, ["b1"])
        writer.commit(SCHEMA, {"n": 1})
    assert vacuum(location, retain_hours=1) == []  # everything is younger than an hour
    time.sleep(1.1)
    deleted = [path for path in vacuum(location, retain_hours=0) if path.endswith(".parquet")]  # S3: and a directory marker
    assert len(deleted) == 2  # version 0's file and the killed job's
    assert killed.written() == []
    assert _ids(location) == ["b1"] and open_table(location).info == {"n": 1}
    with pytest.raises(StorageError):
        read_table(open_table(location, version=0))


def test_not_a_table(tmp_path):
    with pytest.raises(TableNotFound, match="is not a Delta table"):
        open_table(resolve(str(tmp_path / "nothing")))


# ---------------------------------------------------------------------------------------
# Ray: real jobs and the readers users have


def _duckdb_connection():
    """DuckDB with the delta extension the PyPI package duckdb-ext-delta ships (no download)."""
    import duckdb
    import duckdb_ext

    connection = duckdb.connect(config={"extension_directory": os.path.join(duckdb_ext.__path__[0], "extensions")})
    connection.execute("LOAD delta")
    return connection


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_readers_see_exactly_the_current_version(ray_local, tmp_path):
    import polars
    import ray.data
    from deltalake import DeltaTable

    uri = str(tmp_path / "catalog")
    synth.run(uri, SPEC, images_per_shard=12)
    second = synth.run(uri, SynthSpec(**{**SPEC.__dict__, "groups": 2}), images_per_shard=12)
    expected = second["rows"]
    assert expected < open_table(resolve(uri), version=0).rows  # old files still on disk, larger
    table = DeltaTable(uri)
    assert table.to_pyarrow_table(columns=["image_id"]).num_rows == expected
    assert DeltaTable(uri, version=0).to_pyarrow_table(columns=["image_id"]).num_rows == open_table(resolve(uri), 0).rows
    del table
    assert _duckdb_connection().execute(f"SELECT count(*) FROM delta_scan('{uri}')").fetchone()[0] == expected
    assert polars.read_delta(uri, columns=["image_id"]).height == expected
    assert ray.data.read_delta(uri, columns=["image_id"]).count() == expected
    history = DeltaTable(uri).history()
    assert [entry["mga"]["rows"] for entry in history if "mga" in entry] == [expected, open_table(resolve(uri), 0).rows]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_embeds_racing_on_one_table(ray_local, tmp_path):
    """Two real `mga embed --incremental` jobs into one output: no row lost or written twice."""
    catalog, model, features = (str(tmp_path / name) for name in ("catalog", "model", "features"))
    synth.run(catalog, SPEC, images_per_shard=12)
    torch.manual_seed(0)
    config = ModelConfig(backbone="tf_efficientnetv2_b0", layers=(3, 4), global_dim=32, token_dim=16, num_tokens=4, heads=2)
    write_artifact(model, pack_artifact(MGAModel(config), {"image_size": 64}))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    command = [sys.executable, "-m", "pipelines.embed", "--model", model, "--catalog", catalog, "--out", features, "--incremental", "--batch-size", "8",
               "--actors", "1", "--cpus-per-actor", "0.5"]  # two jobs on the shared 4-CPU test cluster: leave CPUs for decoding
    jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(2)]
    outcomes = [(job.wait(timeout=500), job.stderr.read()) for job in jobs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes
    if codes == [0, 2]:
        error = next(text for code, text in outcomes if code == 2).strip().splitlines()[-1]
        assert error.startswith("mga: error: ") and "another job committed version" in error and "run it again" in error
    current = open_table(resolve(features))
    ids = read_table(current, ["image_id"]).column("image_id")
    catalog_ids = read_table(open_table(resolve(catalog)), ["image_id"]).column("image_id")
    assert len(ids) == len(pc.unique(ids)) == len(catalog_ids)
    assert set(ids.to_pylist()) == set(catalog_ids.to_pylist())
    assert current.info["table"] == "features" and current.info["catalog"] == catalog
