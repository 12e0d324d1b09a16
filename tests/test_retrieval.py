"""Retrieval at catalog scale: float16 tokens, atomic commits, incremental embed (a merge),
approximate shortlists, the Delta tables in DuckDB, and the GPU switches of embed and search.

The model is a randomly initialised tiny MGA network packed as an artifact (no training:
these tests are about the pipeline, and a random network ranks well enough to measure
what float16 tokens or an approximate index change).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import duckdb
import functools
import importlib.util
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
import ray._private.state  # the GCS actor table: the state API needs the dashboard, not started locally
from PIL import Image, ImageOps

from mga.config import ModelConfig
from pipelines.synthetic import SynthSpec
from tests.tiny import MODEL as TINY_MODEL
from pipelines import embed, evaluate, resources, search, synth
from pipelines.filters import parse_filter
from pipelines.rewrites import copy_sources
from pipelines.schemas import CATALOG, column_matrix, features_schema
from pipelines.search.changes import row_changes
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table, read_table, vacuum

MODEL = ModelConfig(**TINY_MODEL)
SPEC = SynthSpec(seed=5, groups=6, items_per_group=4, test_fraction=0.5, train_views=2, gallery_views=3, query_views=3, image_size=64)
IMAGES = 6 * 4 // 2 * (2 + 3 + 3)  # 12 train items x 2, 12 test items x (3 gallery + 3 query) = 96
RERANK = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sorted_table(uri: str, keys=("image_id",), version: int | None = None) -> pa.Table:
    """The rows of the table's current version (or `version`), sorted."""
    return read_table(open_table(resolve(uri), version)).sort_by([(key, "ascending") for key in keys])


def info_of(uri: str) -> dict:
    """The commit metadata our jobs attach to the table's current version."""
    return open_table(resolve(uri)).info


def commit_rows(uri: str, table: pa.Table, info: dict, files: int = 1) -> int:
    """Commit `table` as the next version (an overwrite) of the table at `uri`, in `files` files; returns the version."""
    per_file = max(1, -(-table.num_rows // files))
    with TableWriter(resolve(uri)) as writer:
        for number, start in enumerate(range(0, max(table.num_rows, 1), per_file)):
            write_parquet(writer.file(f"part-{number:05d}.parquet"), table.slice(start, per_file))
        return writer.commit(table.schema, info).version


@pytest.fixture(scope="module")
def world(ray_local, random_model, tmp_path_factory):
    """Catalog, model, float32 features, rankings and report, shared by the module."""
    root = tmp_path_factory.mktemp("retrieval")
    paths = {name: str(root / name) for name in ("catalog", "model", "features", "rankings", "report")}
    synth.run(paths["catalog"], SPEC, images_per_shard=24)
    paths["model"], paths["model_id"] = random_model["uri"], random_model["model_id"]  # the session's random model
    embed.run(paths["model"], paths["catalog"], paths["features"], batch_size=16)
    search.run(paths["features"], paths["rankings"], rerank_top=RERANK)
    evaluate.run(paths["rankings"], paths["report"], gallery_examples=0)
    paths["root"] = str(root)
    return paths


def _metrics(report: str) -> dict:
    return json.loads(resolve(report).join("metrics.json").read_bytes())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_float16_tokens_cost_little_accuracy(world, tmp_path):
    f16, r16, rep16 = (str(tmp_path / name) for name in ("features16", "rankings16", "report16"))
    result = embed.run(world["model"], world["catalog"], f16, batch_size=16, token_dtype="float16")
    assert result["token_dtype"] == "float16" and result["rows"] == IMAGES and result["version"] == 0
    table16 = sorted_table(f16)
    # Delta has no half type: float16 tokens are binary, 2 bytes per value (little-endian halves).
    assert table16.schema == features_schema(32, [64, 64], "float16")
    assert pa.types.is_binary(table16.schema.field("tokens_1").type) and set(pc.binary_length(table16.column("tokens_1")).to_pylist()) == {2 * 64}
    table32 = sorted_table(world["features"])
    assert table16.column("image_id").equals(table32.column("image_id"))
    tokens16 = column_matrix(table16, "tokens_1", (4, 16))
    tokens32 = column_matrix(table32, "tokens_1", (4, 16))
    token_error = float(np.abs(tokens16 - tokens32).max())
    assert token_error < 2e-3  # float16 keeps ~3 decimal digits of a unit-norm token
    assert np.array_equal(tokens16, tokens32.astype(np.float16).astype(np.float32))  # halves of the float32 values, round to nearest

    search.run(f16, r16, rerank_top=RERANK)
    evaluate.run(r16, rep16, gallery_examples=0)
    m32, m16 = _metrics(world["report"]), _metrics(rep16)
    pairs = _sql(
        f"""SELECT max(abs(a.score_token - b.score_token)) AS worst, count(*) AS n
            FROM {_scan(world['rankings'])} a JOIN {_scan(r16)} b USING (query_id, gallery_id)
            WHERE a.score_token IS NOT NULL AND b.score_token IS NOT NULL"""
    ).fetchone()
    delta_map = m16["reranked"]["mAP"] - m32["reranked"]["mAP"]
    delta_r1 = m16["reranked"]["R@1"] - m32["reranked"]["R@1"]
    size32 = _table_bytes(world["features"])
    size16 = _table_bytes(f16)
    print(
        f"\nfloat16 tokens vs float32 ({m32['queries']} queries, rerank top {RERANK}): "
        f"mAP {m32['reranked']['mAP']:.4f} -> {m16['reranked']['mAP']:.4f} (delta {delta_map:+.4f}), "
        f"R@1 {m32['reranked']['R@1']:.4f} -> {m16['reranked']['R@1']:.4f} (delta {delta_r1:+.4f}), "
        f"max |dS_token| {pairs[0]:.2e} over {pairs[1]} pairs, max |d token| {token_error:.2e}, "
        f"features files {size32} -> {size16} bytes ({size16 / size32:.2f}x)"
    )
    assert pairs[1] >= m32["queries"] * RERANK * 0.9
    assert pairs[0] < 0.01
    assert abs(delta_map) <= 0.02 and abs(delta_r1) <= 2 / m32["queries"] + 1e-9
    assert m16["global"] == m32["global"]  # the global feature stays float32
    assert size16 < size32

    # DuckDB reads the float16 columns through the Delta table as BLOBs holding the same halves.
    column_type = _sql(f"SELECT typeof(tokens_1) FROM {_scan(f16)} LIMIT 1").fetchone()[0]
    assert column_type == "BLOB"
    first = _sql(f"SELECT image_id, tokens_1 FROM {_scan(f16)} ORDER BY image_id LIMIT 1").fetchone()
    assert first[0] == table16.column("image_id")[0].as_py()
    np.testing.assert_array_equal(np.frombuffer(first[1], "<f2").astype(np.float32).reshape(4, 16), tokens16[0])


@functools.lru_cache(maxsize=1)
def _duckdb() -> duckdb.DuckDBPyConnection:
    """One DuckDB connection with the delta extension of the duckdb-ext-delta package loaded (no download)."""
    package = importlib.util.find_spec("duckdb_ext")
    assert package is not None, "the duckdb-ext-delta package (DuckDB's delta extension) is not installed"
    folder = os.path.join(list(package.submodule_search_locations)[0], "extensions")
    connection = duckdb.connect(config={"extension_directory": folder})
    connection.execute("LOAD delta")
    return connection


def _sql(query: str):
    """A query on a fresh cursor of the DuckDB connection (DuckDB 2: results come from a cursor)."""
    return _duckdb().cursor().execute(query)


def _scan(uri: str) -> str:
    """The Delta table at `uri` (its current version, through its log) as a DuckDB table expression."""
    return f"delta_scan('{resolve(uri).path}')"


def _table_bytes(uri: str) -> int:
    """Bytes of the data files of the table's current version (older versions' files do not count)."""
    snapshot = open_table(resolve(uri))
    return snapshot.bytes(snapshot.paths())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_tables_open_in_duckdb_as_they_are(world, tmp_path):
    metrics = _metrics(world["report"])
    features, rankings = _scan(world["features"]), _scan(world["rankings"])
    catalog = info_of(world["catalog"])
    per_split = dict(_sql(f"SELECT split, count(*) FROM {features} GROUP BY split").fetchall())
    assert per_split == catalog["rows_by_split"]

    # Join rankings to features on both ids: every row's is_match is the item equality.
    joined = _sql(
        f"""SELECT count(*), sum(CASE WHEN r.is_match = (q.item_id = g.item_id) THEN 1 ELSE 0 END),
                   count(DISTINCT r.query_id), min(q.split), max(q.split), min(g.split), max(g.split)
            FROM {rankings} r
            JOIN {features} q ON r.query_id = q.image_id
            JOIN {features} g ON r.gallery_id = g.image_id"""
    ).fetchone()
    assert joined[0] == joined[1] == info_of(world["rankings"])["rows"]
    assert joined[2] == metrics["queries"] and joined[3:] == ("query", "query", "gallery", "gallery")

    # R@1 in SQL, both orderings, equals metrics.json.
    global_r1 = _sql(
        f"""WITH ranked AS (
              SELECT query_id, is_match, query_positives,
                     row_number() OVER (PARTITION BY query_id ORDER BY score_global DESC, gallery_id) AS position
              FROM {rankings})
            SELECT avg(CASE WHEN is_match THEN 1.0 ELSE 0.0 END) FROM ranked WHERE position = 1 AND query_positives > 0"""
    ).fetchone()[0]
    reranked_r1 = _sql(
        f"SELECT avg(CASE WHEN is_match THEN 1.0 ELSE 0.0 END) FROM {rankings} WHERE rank = 1 AND query_positives > 0"
    ).fetchone()[0]
    print(f"\nDuckDB R@1 global {global_r1:.4f} reranked {reranked_r1:.4f}; metrics.json {metrics['global']['R@1']:.4f} {metrics['reranked']['R@1']:.4f}")
    assert abs(float(global_r1) - metrics["global"]["R@1"]) < 1e-12
    assert abs(float(reranked_r1) - metrics["reranked"]["R@1"]) < 1e-12

    # The catalog too: bytes, boxes and hashes as written.
    row = _sql(f"SELECT image, sha256, bbox FROM {_scan(world['catalog'])} LIMIT 1").fetchone()
    assert hashlib.sha256(row[0]).hexdigest() == row[1] and len(row[2]) == 4

    # A table with two versions: DuckDB reads the current one only, not the files of the old one
    # that are still on disk (what a glob of the table's Parquet files would wrongly add up).
    copy = str(tmp_path / "rankings")
    shutil.copytree(world["rankings"], copy)
    old_rows = info_of(copy)["rows"]
    top = sorted_table(copy, ("query_id", "rank")).filter(pc.field("rank") <= 3)
    version = commit_rows(copy, top, {**info_of(copy), "rows": top.num_rows, "depth": 3}, files=2)
    assert version == open_table(resolve(world["rankings"])).version + 1 and 0 < top.num_rows < old_rows
    on_disk = _sql(f"SELECT count(*) FROM read_parquet('{resolve(copy).path}/**/*.parquet')").fetchone()[0]
    assert on_disk == old_rows + top.num_rows
    assert _sql(f"SELECT count(*), max(rank) FROM {_scan(copy)}").fetchone() == (top.num_rows, 3) == (open_table(resolve(copy)).rows, 3)


def _edited_catalog(world, out: str) -> tuple[str, str]:
    """The catalog with one image removed and one image's bytes changed, committed at `out`."""
    table = sorted_table(world["catalog"])
    ids = table.column("image_id").to_pylist()
    removed, changed = ids[3], ids[10]
    table = table.filter(pc.field("image_id") != removed)
    rows = table.to_pylist()
    for row in rows:
        if row["image_id"] == changed:
            buffer = io.BytesIO()
            ImageOps.mirror(Image.open(io.BytesIO(row["image"]))).save(buffer, "JPEG", quality=90)
            row["image"] = buffer.getvalue()
            row["sha256"] = hashlib.sha256(row["image"]).hexdigest()
    commit_rows(out, pa.Table.from_pylist(rows, schema=CATALOG), {"table": "catalog", "rows": len(rows), "rejected": 0})
    return removed, changed


def _run_dirs(uri: str) -> set[str]:
    return {name for name in os.listdir(uri) if name.startswith("run-")}


def _files_holding(snapshot, image_ids: list[str]) -> set[str]:
    """The data files of `snapshot` that hold any of `image_ids`."""
    rows = read_table(snapshot, ["image_id", "__filename"])
    return set(rows.filter(pc.is_in(rows.column("image_id"), pa.array(image_ids))).column("__filename").to_pylist())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_incremental_embed_drops_deleted_and_reembeds_changed(world, tmp_path):
    out = str(tmp_path / "features")
    shutil.copytree(world["features"], out)  # Delta logs name files relative to the table
    # The stored rows as they are, laid out in four files (by image_id) as a new version: the
    # merge below must rewrite only the file holding the changed and the deleted image.
    commit_rows(out, sorted_table(out), info_of(out), files=4)
    catalog = str(tmp_path / "catalog")
    removed, changed = _edited_catalog(world, catalog)
    base = open_table(resolve(out))
    before = sorted_table(out)
    stale_files = _files_holding(base, [removed, changed])
    stale_rows = sum(rows for path, rows in zip(base.files["path"].to_pylist(), base.files["num_records"].to_pylist()) if path in stale_files)
    runs_before = _run_dirs(out)
    result = embed.run(world["model"], catalog, out, incremental=True, batch_size=16)
    # A merge: the changed image re-embedded; the files holding the changed and the deleted rows
    # rewritten without them (their other rows copied as stored), every other file untouched.
    assert result["incremental"] == {"new": 0, "changed": 1, "unchanged": IMAGES - 2, "deleted": 1, "rows_written": 1 + stale_rows - 2}
    assert result["embedded"] == 1 and result["rows"] == IMAGES - 1 and "carried" not in result
    assert result["version"] == base.version + 1 and result["catalog"] == resolve(catalog).uri
    merged = open_table(resolve(out))
    assert merged.version == result["version"] and merged.rows == IMAGES - 1
    old_files, new_files = set(base.paths()), set(merged.paths())
    assert old_files - new_files == stale_files and len(stale_files) == 1 and len(old_files) == 4
    new_runs = _run_dirs(out) - runs_before
    assert len(new_runs) == 1 and {os.path.relpath(path, out).split("/")[0] for path in new_files - old_files} == new_runs
    # The commit names the file the rewritten one copies, from which an incremental search reads
    # the changes (comparing the two files' ids, not the rewritten rows' identity).
    assert list(copy_sources(base, merged).values()) == list(stale_files)
    changes = row_changes(resolve(out), base.version, merged, parse_filter("image_id IS NOT NULL"))
    assert sorted(changes.removed.column("image_id").to_pylist()) == sorted([removed, changed])
    assert changes.added.column("image_id").to_pylist() == [changed] and changes.new.files.num_rows == 1
    after = sorted_table(out)
    ids = after.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == IMAGES - 1 and removed not in ids and changed in ids
    old = {row["image_id"]: row for row in before.to_pylist()}
    new = {row["image_id"]: row for row in after.to_pylist()}
    assert new[changed]["sha256"] != old[changed]["sha256"] and new[changed]["global"] != old[changed]["global"]
    assert new[changed]["embedded_at"] > old[changed]["embedded_at"]
    unchanged = [image_id for image_id in ids if image_id != changed]
    assert all(new[i] == old[i] for i in unchanged)  # every stored value, embedded_at included
    # The catalog's rows are what the features hold (the changed image's hash included).
    catalog_rows = {r["image_id"]: r["sha256"] for r in read_table(open_table(resolve(catalog)), ["image_id", "sha256"]).to_pylist()}
    assert {i: new[i]["sha256"] for i in ids} == catalog_rows
    # The version before the merge is still readable by its number (time travel), as it was.
    assert sorted_table(out, version=base.version).equals(before)

    # Nothing changed since: no new version, no files written, the table as it was.
    runs = _run_dirs(out)
    same = embed.run(world["model"], catalog, out, incremental=True, batch_size=16)
    assert same["incremental"] == {"new": 0, "changed": 0, "unchanged": IMAGES - 1, "deleted": 0, "rows_written": 0} and same["embedded"] == 0
    assert same["version"] == merged.version == open_table(resolve(out)).version and same["rows"] == IMAGES - 1
    assert _run_dirs(out) == runs and sorted_table(out).equals(after)

    # A change of token dtype is no merge: everything is embedded again, one schema in the version.
    # (A few images of the catalog: the branch is what is tested, not the model's throughput.)
    few = str(tmp_path / "few")
    commit_rows(few, sorted_table(catalog).slice(0, 6), {"table": "catalog", "rows": 6, "rejected": 0})
    again = embed.run(world["model"], few, out, incremental=True, token_dtype="float16")
    assert "incremental" not in again and again["embedded"] == again["rows"] == 6 and again["version"] == merged.version + 1
    converted = open_table(resolve(out))
    schemas = [pq.read_schema(path) for path in converted.paths()]
    assert schemas and all(schema == features_schema(32, [64, 64], "float16") for schema in schemas)
    assert sorted_table(out).column("image_id").to_pylist() == ids[:6]


def _features_table(uri: str, model_id: str, gallery: int, queries: int, seed: int = 0) -> np.ndarray:
    """A features table of random clustered, L2-normalised vectors (no model needed); returns the vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, 32))
    count = gallery + queries
    vectors = centres[rng.integers(0, 64, count)] + 0.5 * rng.normal(size=(count, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    tokens = rng.normal(size=(count, 4, 16)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=2, keepdims=True)
    schema = features_schema(32, [64, 64])
    columns = {
        "image_id": [f"img-{i:05d}" for i in range(count)],
        "item_id": [f"item-{i % (gallery // 2):05d}" for i in range(count)],
        "split": ["gallery"] * gallery + ["query"] * queries,
        "domain": ["shop"] * count,
        "category": ["c"] * count,
        "sha256": ["0" * 64] * count,
        "model_id": [model_id] * count,
        "global": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 32),
        "tokens_0": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), 64),
        "tokens_1": pa.FixedSizeListArray.from_arrays(pa.array(tokens[:, ::-1].reshape(-1)), 64),
        "embedded_at": pa.array([0] * count, pa.timestamp("us", tz="UTC")),
    }
    commit_rows(uri, pa.table(columns, schema=schema),
                {"table": "features", "model_id": model_id, "global_dim": 32, "num_tokens": 4, "token_dim": 16, "layers": [3, 4], "token_dtype": "float32"})
    return vectors


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_approximate_indexes_report_recall_against_exact(world, tmp_path):
    from mga.tie_keys import tie_keys
    from mga.shortlist import exact_top_k
    from pipelines.filters import parse_filter
    from pipelines.search.approximate import approximate_shortlist, build_index
    from pipelines.search.queries import Gallery, Positives, QueryChunk

    gallery, queries, depth = 3000, 200, 50
    features = str(tmp_path / "random")
    vectors = _features_table(features, world["model_id"], gallery, queries)
    snapshot = open_table(resolve(features))
    ids = np.array([f"img-{i:05d}" for i in range(gallery)])
    truth = exact_top_k(torch.from_numpy(vectors[gallery:]), torch.from_numpy(vectors[:gallery]), torch.from_numpy(tie_keys(ids)), depth)
    truth_ids = ids[truth.rows.numpy()]

    # Each index on its own (no Ray): the share of the exact top-`depth` it returns.
    query_ids = pa.array([f"query-{i}" for i in range(queries)])
    chunk = QueryChunk(query_ids, pa.nulls(queries, pa.string()), np.ascontiguousarray(vectors[gallery:]), pa.table({}), (4, 16), Positives.empty())
    overlap = {}
    for kind in ("hnsw", "ivf", "ivfpq"):
        shortlisted = approximate_shortlist(*build_index(Gallery(snapshot, parse_filter("split = 'gallery'")), kind), chunk, depth)
        found = shortlisted.ids.take(pa.array(shortlisted.top.rows.reshape(-1).numpy())).to_numpy(zero_copy_only=False).reshape(queries, depth)
        overlap[kind] = float(np.mean([len(set(f) & set(t)) / depth for f, t in zip(found, truth_ids)]))
    print(f"\nshortlist on {gallery} random clustered vectors (D=32), {queries} queries: top-{depth} overlap with exact "
          + ", ".join(f"{kind} {value:.3f}" for kind, value in overlap.items()))
    assert overlap["hnsw"] >= 0.9 and overlap["ivf"] >= 0.5 and overlap["ivfpq"] >= 0.3

    # Through the job: the exact scan, and IVF-PQ, whose recall against it is in the commit metadata.
    exact = search.run(features, str(tmp_path / "exact"), depth=depth, rerank_top=3, model=world["model"])
    assert exact["index"] == "exact" and exact["shortlist_recall_at_100"] is None
    ranked = read_table(open_table(resolve(str(tmp_path / "exact")))).to_pandas()
    # The rerank reorders the head only: each query's list holds the exact top-`depth`.
    assert ranked.sort_values("query_id").groupby("query_id").gallery_id.apply(set).to_list() == [set(row) for row in truth_ids]
    out = str(tmp_path / "ivfpq")
    result = search.run(features, out, depth=depth, rerank_top=3, index="ivfpq", model=world["model"])
    ranked = read_table(open_table(resolve(out))).to_pandas()
    assert result["index"] == "ivfpq" and result["rows"] == len(ranked) <= queries * depth
    assert ranked.groupby("query_id").size().max() <= depth and ranked.query_id.nunique() == queries
    assert not ranked.duplicated(["query_id", "gallery_id"]).any()
    assert ranked[ranked["rank"] <= 3].score_token.notna().all() and ranked[ranked["rank"] > 3].score_token.isna().all()
    assert result["shortlist_recall_at_100"] >= 0.3
    # Positives the index missed are not ranked (null): metrics count them as not retrieved.
    metrics = evaluate.run(out, str(tmp_path / "report-ivfpq"), gallery_examples=0)
    assert 0 <= metrics["global"]["mAP"] <= 1


def test_gpu_switches_for_autoscaling_clusters():
    # auto follows the GPUs up at start; yes asks even with none up (the autoscaler adds them).
    assert resources.actor_gpus("auto", 0) == 0 and resources.actor_gpus("auto", 2) == 1
    assert resources.actor_gpus("yes", 0) == 1 and resources.actor_gpus("yes", 0, 0.5) == 0.5
    assert resources.actor_gpus("no", 4) == 0
    assert resources.default_actors(0, 0) == 1 and resources.default_actors(1, 0) == 1 and resources.default_actors(1, 4) == 4 and resources.default_actors(0.5, 2) == 4
    with pytest.raises(ValueError, match="--use-gpu"):
        resources.actor_gpus("maybe", 0)
    with pytest.raises(ValueError, match="--gpus-per-actor"):
        resources.actor_gpus("yes", 0, 0)
    import argparse

    for module in (embed, search):
        parser = argparse.ArgumentParser()
        module.build_parser(parser)
        base = ["--model", "m", "--catalog", "c", "--out", "o"] if module is embed else ["--features", "f", "--out", "o"]
        args = parser.parse_args(base + ["--use-gpu", "yes", "--gpus-per-actor", "0.5"])
        assert args.use_gpu == "yes" and args.gpus_per_actor == 0.5
        assert parser.parse_args(base).use_gpu == "auto"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_interrupted_embed_leaves_the_previous_version_and_a_rerun_commits(world, tmp_path):
    out = str(tmp_path / "features")
    shutil.copytree(world["features"], out)
    previous = open_table(resolve(out))
    rows_before = sorted_table(out)
    old_runs = _run_dirs(out)
    # The job joins the test session's Ray instance as a second driver, as `ray job submit`
    # would run it on a cluster; SIGKILLing the driver makes Ray reap its actors and tasks.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.embed", "--model", world["model"], "--catalog", world["catalog"], "--out", out, "--batch-size", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True,
    )
    # The driver is frozen (SIGSTOP) the moment its run's first data file appears: the stream
    # is still writing (batches of 4, 24 of them) and nothing can be committed; then SIGKILLed.
    killed_with = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if _parquet_files(out, _run_dirs(out) - old_runs):
                os.killpg(process.pid, signal.SIGSTOP)
                time.sleep(0.5)  # let the write tasks in flight finish their files
                killed_with = len(_parquet_files(out, _run_dirs(out) - old_runs))
                break
            time.sleep(0.05)
        # The driver, SIGKILLed: nothing of it can clean up; Ray reaps the job's actors and tasks.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert killed_with, "the embed subprocess never wrote a data file"
    # Killed with part of its run on disk: the table is at its previous version, unchanged; the
    # killed run's files are an orphan run directory that no version lists.
    orphans = _run_dirs(out) - old_runs
    current = open_table(resolve(out))
    assert orphans and current.version == previous.version and current.info == previous.info
    assert set(current.paths()) == set(previous.paths()) and not set(current.paths()) & set(_parquet_files(out, orphans))
    assert sorted_table(out).equals(rows_before)

    result = embed.run(world["model"], world["catalog"], out, batch_size=16)
    after = sorted_table(out)
    ids = after.column("image_id").to_pylist()
    assert result["version"] == previous.version + 1 and result["rows"] == len(ids) == len(set(ids)) == IMAGES
    assert ids == rows_before.column("image_id").to_pylist()
    np.testing.assert_allclose(column_matrix(after, "global"), column_matrix(rows_before, "global"), atol=1e-5)
    # The new version lists the re-run's files only; the previous version stays readable by its number.
    rerun = _run_dirs(out) - old_runs - orphans
    assert len(rerun) == 1 and {os.path.relpath(path, out).split("/")[0] for path in open_table(resolve(out)).paths()} == rerun
    assert sorted_table(out, version=previous.version).equals(rows_before)
    # Vacuum with no retention: the killed run's orphan and the previous version's files go, the
    # current version stays readable as it is.
    vacuum(resolve(out), retain_hours=0)
    assert not _files(out, orphans | old_runs)
    assert sorted_table(out).equals(after)
    runs, vacuumed = _run_dirs(out), open_table(resolve(out)).version  # (vacuum commits versions of its own, no data change)
    later = embed.run(world["model"], world["catalog"], out, incremental=True)
    assert later["embedded"] == 0 and later["version"] == vacuumed == open_table(resolve(out)).version and _run_dirs(out) == runs
    print(f"\nembed SIGKILLed with {killed_with} data file(s) of its run written: previous version intact, re-run committed {len(ids)} rows, 0 duplicates; "
          f"vacuum removed the orphan run")
    # Last, the directories: only the re-run's is left (the killed run's and the previous version's went with their files).
    assert _run_dirs(out) == rerun, f"run directories left after vacuum: {sorted(_run_dirs(out) - rerun)}"


def _files(uri: str, runs: set[str]) -> list[str]:
    """The files below the run directories `runs` of the table at `uri`."""
    return [os.path.join(folder, name) for run in runs for folder, _, names in os.walk(os.path.join(uri, run)) for name in names]


def _parquet_files(uri: str, runs: set[str]) -> list[str]:
    return [path for path in _files(uri, runs) if path.endswith(".parquet")]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_query_photos_equal_the_batch_search_of_their_uploads(world, tmp_path, capsys, s3_env):
    """Customer photos as JPEG files, half of them unlabelled: `mga prepare manifest` -> `mga embed`
    -> `mga search --queries` ranks them as `mga query` does straight from the files; DuckDB reads
    the items of each photo's results from the rankings alone."""
    from pipelines import cli, prepare, query

    catalog = sorted_table(world["catalog"]).filter(pc.field("split") == "query").slice(0, 6)
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = ["path,item_id,split"]
    for number, row in enumerate(catalog.to_pylist()):
        (photos / f"p{number}.jpg").write_bytes(row["image"])
        lines.append(f"photos/p{number}.jpg,{row['item_id'] if number < 3 else ''},query")
    (tmp_path / "uploads.csv").write_text("\n".join(lines) + "\n")
    uploads = prepare.run("manifest", str(tmp_path / "uploads"), manifest=str(tmp_path / "uploads.csv"))
    assert uploads["rows"] == 6 and uploads["unlabelled"] == 3
    embed.run(world["model"], str(tmp_path / "uploads"), str(tmp_path / "uploads-features"), batch_size=4)
    rankings = str(tmp_path / "rankings")
    searched = search.run(world["features"], rankings, queries=str(tmp_path / "uploads-features"), gallery_where="split = 'gallery' AND domain = 'shop'")
    assert searched["queries"] == 6 and searched["unlabelled_queries"] == 3

    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    answered = query.run([str(photos)], world["features"], top=5)
    assert [name.rsplit("/", 1)[-1] for name, _ in answered["unreadable"]] == ["broken.jpg"]
    expected = sorted_table(rankings, ("query_id", "rank")).filter(pc.field("rank") <= 5)
    got = answered["results"]
    assert [q.rsplit("/", 1)[-1] for q in got.column("query_id").to_pylist()] == [q.rsplit("/", 1)[-1] for q in expected.column("query_id").to_pylist()]
    for column in ("rank", "gallery_id", "gallery_item_id"):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist(), column
    for column in ("score_global", "score_token", "score"):
        assert np.allclose(got.column(column).to_numpy(), expected.column(column).to_numpy(), atol=1e-5), column
    gallery_categories = dict(zip(*(sorted_table(world["features"]).column(name).to_pylist() for name in ("image_id", "category"))))
    assert got.column("category").to_pylist() == [gallery_categories[g] for g in got.column("gallery_id").to_pylist()]
    # Photos in a bucket, shortlisted by a faiss index over the gallery's 36 images (HNSW returns them exactly).
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1")
    for number in (0, 3):
        client.put_object(Bucket=s3_env["bucket"], Key=f"uploads/p{number}.jpg", Body=(photos / f"p{number}.jpg").read_bytes())
    in_bucket = query.run([f"s3://{s3_env['bucket']}/uploads"], world["features"], top=5, index="hnsw")["results"]
    assert in_bucket.column("query_id").to_pylist() == [f"s3://{s3_env['bucket']}/uploads/p{n}.jpg" for n in (0, 3) for _ in range(5)]
    mine = got.filter(pc.is_in(got.column("query_id"), pa.array([str(photos / "p0.jpg"), str(photos / "p3.jpg")])))
    assert in_bucket.column("gallery_id").to_pylist() == mine.column("gallery_id").to_pylist()

    # The command as a user runs it (in this process: no exit means exit code 0): a printed table per
    # photo, the page, one line per unreadable photo.
    capsys.readouterr()
    cli.main(["query", str(photos), str(tmp_path / "missing.jpg"), "--features", world["features"], "--top", "3", "--out", str(tmp_path / "page")])
    done = capsys.readouterr()
    assert done.err.splitlines() == [
        f"mga query: cannot read {tmp_path / 'missing.jpg'}: no such file or directory",
        f"mga query: cannot read {photos / 'broken.jpg'}: not an image (unrecognised format)",
    ]
    first = got.filter(pc.field("query_id") == str(photos / "p0.jpg")).to_pylist()[0]
    assert f"photo 1/6: {photos / 'p0.jpg'}" in done.out and f"{first['gallery_id']}  {first['gallery_item_id']}" in done.out
    assert (tmp_path / "page" / "query.png").read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "page" / "query.html").read_text()
    assert page.count("<table>") == 6 and first["gallery_id"] in page and "data:image/png;base64," in page

    # "The 5 catalog items for each photo": one query on the rankings, no join.
    top_items = _sql(
        f"SELECT query_id, list(gallery_item_id ORDER BY rank) FROM {_scan(rankings)} WHERE rank <= 5 GROUP BY query_id ORDER BY query_id"
    ).fetchall()
    assert [items for _, items in top_items] == [
        expected.filter(pc.field("query_id") == query_id).column("gallery_item_id").to_pylist() for query_id, _ in top_items
    ]
    assert _sql(f"SELECT count(DISTINCT query_id) FROM {_scan(rankings)} WHERE query_item_id IS NULL AND is_match IS NULL AND query_positives IS NULL").fetchone()[0] == 3
