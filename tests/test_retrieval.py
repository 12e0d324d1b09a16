"""Retrieval at catalog scale: float16 tokens, atomic publish, incremental embed, approximate
shortlists, the tables in DuckDB, and the GPU switches of embed and search.

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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import ray._private.state  # the GCS actor table: the state API needs the dashboard, not started locally
import torch
from PIL import Image, ImageOps

from mga.artifact import pack_artifact
from mga.config import ModelConfig
from mga.model import MGAModel
from mga.synthetic import SynthSpec
from pipelines import embed, evaluate, resources, search, synth
from pipelines.model_store import write_artifact
from pipelines.schemas import CATALOG, features_schema
from pipelines.storage import MANIFEST, list_files, new_snapshot, publish, read_manifest, read_table, resolve, table_files, write_parquet

MODEL = ModelConfig(backbone="tf_efficientnetv2_b0", layers=(3, 4), global_dim=32, token_dim=16, num_tokens=4, heads=2)
SPEC = SynthSpec(seed=5, groups=6, items_per_group=4, test_fraction=0.5, train_views=2, gallery_views=3, query_views=3, image_size=64)
IMAGES = 6 * 4 // 2 * (2 + 3 + 3)  # 12 train items x 2, 12 test items x (3 gallery + 3 query) = 96
RERANK = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_model(uri: str, seed: int = 0, image_size: int = 64) -> str:
    """A randomly initialised tiny model as an artifact; returns its model_id."""
    torch.manual_seed(seed)
    files = pack_artifact(MGAModel(MODEL), {"image_size": image_size})
    write_artifact(uri, files)
    return json.loads(files["artifact.json"])["model_id"]


def sorted_table(uri: str, keys=("image_id",)) -> pa.Table:
    return read_table(resolve(uri)).sort_by([(key, "ascending") for key in keys])


def manifest_of(uri: str) -> dict:
    return read_manifest(resolve(uri))


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """Catalog, model, float32 features, rankings and report, shared by the module."""
    root = tmp_path_factory.mktemp("retrieval")
    paths = {name: str(root / name) for name in ("catalog", "model", "features", "rankings", "report")}
    synth.run(paths["catalog"], SPEC, images_per_shard=24)
    paths["model_id"] = write_random_model(paths["model"])
    embed.run(paths["model"], paths["catalog"], paths["features"], batch_size=16)
    search.run(paths["features"], paths["rankings"], rerank_top=RERANK)
    evaluate.run(paths["rankings"], paths["report"], gallery_examples=0)
    paths["root"] = str(root)
    return paths


def _metrics(report: str) -> dict:
    return json.loads(resolve(report).join("metrics.json").read_bytes())


@pytest.mark.timeout(600)
def test_float16_tokens_cost_little_accuracy(world, tmp_path):
    f16, r16, rep16 = (str(tmp_path / name) for name in ("features16", "rankings16", "report16"))
    manifest = embed.run(world["model"], world["catalog"], f16, batch_size=16, token_dtype="float16")
    assert manifest["token_dtype"] == "float16" and manifest["rows"] == IMAGES
    table16 = sorted_table(f16)
    assert table16.schema == features_schema(32, [64, 64], pa.float16())
    table32 = sorted_table(world["features"])
    assert table16.column("image_id").equals(table32.column("image_id"))
    tokens16 = np.stack(table16.column("tokens_1").to_numpy(zero_copy_only=False)).astype(np.float32)
    tokens32 = np.stack(table32.column("tokens_1").to_numpy(zero_copy_only=False))
    token_error = float(np.abs(tokens16 - tokens32).max())
    assert token_error < 2e-3  # float16 keeps ~3 decimal digits of a unit-norm token

    search.run(f16, r16, rerank_top=RERANK)
    evaluate.run(r16, rep16, gallery_examples=0)
    m32, m16 = _metrics(world["report"]), _metrics(rep16)
    pairs = _sql(
        f"""SELECT max(abs(a.score_token - b.score_token)) AS worst, count(*) AS n
            FROM read_parquet({_files(world['rankings'])}) a JOIN read_parquet({_files(r16)}) b USING (query_id, gallery_id)
            WHERE a.score_token IS NOT NULL AND b.score_token IS NOT NULL"""
    ).fetchone()
    delta_map = m16["reranked"]["mAP"] - m32["reranked"]["mAP"]
    delta_r1 = m16["reranked"]["R@1"] - m32["reranked"]["R@1"]
    size32 = sum(os.path.getsize(p) for p in list_files(resolve(world["features"]), ".parquet"))
    size16 = sum(os.path.getsize(p) for p in list_files(resolve(f16), ".parquet"))
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

    # DuckDB reads the float16 columns (Parquet FLOAT16) as FLOAT, with the same values.
    column_type = _sql(f"SELECT typeof(tokens_1) FROM read_parquet({_files(f16)}) LIMIT 1").fetchone()[0]
    assert column_type == "FLOAT[]"
    first = _sql(f"SELECT image_id, tokens_1 FROM read_parquet({_files(f16)}) ORDER BY image_id LIMIT 1").fetchone()
    assert first[0] == table16.column("image_id")[0].as_py()
    np.testing.assert_array_equal(np.array(first[1], np.float32), tokens16[0])


def _sql(query: str):
    """A query on a fresh in-memory DuckDB connection (DuckDB 2: results come from a cursor)."""
    return duckdb.connect().execute(query)


def _files(uri: str) -> str:
    """The published snapshot's files as a DuckDB list literal."""
    table = resolve(uri)
    return "[" + ", ".join(f"'{table.join(name).path}'" for name in read_manifest(table)["files"]) + "]"


@pytest.mark.timeout(300)
def test_tables_open_in_duckdb_as_they_are(world):
    metrics = _metrics(world["report"])
    features, rankings = _files(world["features"]), _files(world["rankings"])
    catalog = manifest_of(world["catalog"])
    per_split = dict(_sql(f"SELECT split, count(*) FROM read_parquet({features}) GROUP BY split").fetchall())
    assert per_split == catalog["rows_by_split"]

    # Join rankings to features on both ids: every row's is_match is the item equality.
    joined = _sql(
        f"""SELECT count(*), sum(CASE WHEN r.is_match = (q.item_id = g.item_id) THEN 1 ELSE 0 END),
                   count(DISTINCT r.query_id), min(q.split), max(q.split), min(g.split), max(g.split)
            FROM read_parquet({rankings}) r
            JOIN read_parquet({features}) q ON r.query_id = q.image_id
            JOIN read_parquet({features}) g ON r.gallery_id = g.image_id"""
    ).fetchone()
    assert joined[0] == joined[1] == manifest_of(world["rankings"])["rows"]
    assert joined[2] == metrics["queries"] and joined[3:] == ("query", "query", "gallery", "gallery")

    # R@1 in SQL, both orderings, equals metrics.json.
    global_r1 = _sql(
        f"""WITH ranked AS (
              SELECT query_id, is_match, query_positives,
                     row_number() OVER (PARTITION BY query_id ORDER BY score_global DESC, gallery_id) AS position
              FROM read_parquet({rankings}))
            SELECT avg(CASE WHEN is_match THEN 1.0 ELSE 0.0 END) FROM ranked WHERE position = 1 AND query_positives > 0"""
    ).fetchone()[0]
    reranked_r1 = _sql(
        f"SELECT avg(CASE WHEN is_match THEN 1.0 ELSE 0.0 END) FROM read_parquet({rankings}) WHERE rank = 1 AND query_positives > 0"
    ).fetchone()[0]
    print(f"\nDuckDB R@1 global {global_r1:.4f} reranked {reranked_r1:.4f}; metrics.json {metrics['global']['R@1']:.4f} {metrics['reranked']['R@1']:.4f}")
    assert abs(float(global_r1) - metrics["global"]["R@1"]) < 1e-12
    assert abs(float(reranked_r1) - metrics["reranked"]["R@1"]) < 1e-12

    # The catalog too: bytes, boxes and hashes as written.
    row = _sql(f"SELECT image, sha256, bbox FROM read_parquet({_files(world['catalog'])}) LIMIT 1").fetchone()
    assert hashlib.sha256(row[0]).hexdigest() == row[1] and len(row[2]) == 4


def _edited_catalog(world, out: str) -> tuple[str, str]:
    """The catalog with one image removed and one image's bytes changed, published at `out`."""
    table = read_table(resolve(world["catalog"])).sort_by("image_id")
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
    location = resolve(out)
    snapshot = new_snapshot(location)
    write_parquet(snapshot.join("part-00000.parquet"), pa.Table.from_pylist(rows, schema=CATALOG))
    publish(location, snapshot, {"table": "catalog", "rows": len(rows), "rejected": 0, "rejects_files": []})
    return removed, changed


@pytest.mark.timeout(600)
def test_incremental_embed_drops_deleted_and_reembeds_changed(world, tmp_path):
    out = str(tmp_path / "features")
    shutil.copytree(world["features"], out)  # manifests name files relative to the table
    catalog = str(tmp_path / "catalog")
    removed, changed = _edited_catalog(world, catalog)
    before = sorted_table(out)
    manifest = embed.run(world["model"], catalog, out, incremental=True, batch_size=16)
    assert manifest["incremental"] == {"new": 0, "changed": 1, "unchanged": IMAGES - 2, "deleted": 1}
    assert manifest["embedded"] == 1 and manifest["carried"] == IMAGES - 2 and manifest["rows"] == IMAGES - 1
    after = sorted_table(out)
    ids = after.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == IMAGES - 1 and removed not in ids and changed in ids
    old = {row["image_id"]: row for row in before.to_pylist()}
    new = {row["image_id"]: row for row in after.to_pylist()}
    assert new[changed]["sha256"] != old[changed]["sha256"] and new[changed]["global"] != old[changed]["global"]
    assert new[changed]["embedded_at"] > old[changed]["embedded_at"]
    unchanged = [image_id for image_id in ids if image_id != changed]
    assert all(new[i]["global"] == old[i]["global"] and new[i]["tokens_0"] == old[i]["tokens_0"] for i in unchanged)
    # The catalog's rows are what the features hold (the changed image's hash included).
    catalog_rows = {r["image_id"]: r["sha256"] for r in read_table(resolve(catalog), columns=["image_id", "sha256"]).to_pylist()}
    assert {i: new[i]["sha256"] for i in ids} == catalog_rows

    # A change of token dtype converts the carried rows too: one schema in the snapshot.
    again = embed.run(world["model"], catalog, out, incremental=True, token_dtype="float16")
    assert again["incremental"] == {"new": 0, "changed": 0, "unchanged": IMAGES - 1, "deleted": 0} and again["embedded"] == 0
    schemas = [pq.read_schema(path) for path in table_files(resolve(out))]
    assert schemas and all(schema == features_schema(32, [64, 64], pa.float16()) for schema in schemas)
    assert sorted_table(out).num_rows == IMAGES - 1


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
    location = resolve(uri)
    snapshot = new_snapshot(location)
    write_parquet(snapshot.join("part-0.parquet"), pa.table(columns, schema=schema))
    publish(location, snapshot, {"table": "features", "model_id": model_id, "global_dim": 32, "num_tokens": 4, "token_dim": 16, "layers": [3, 4], "token_dtype": "float32"})
    return vectors


@pytest.mark.timeout(600)
def test_approximate_indexes_report_recall_against_exact(world, tmp_path):
    gallery, queries, depth = 3000, 200, 50
    features = str(tmp_path / "random")
    _features_table(features, world["model_id"], gallery, queries)
    exact = search.run(features, str(tmp_path / "exact"), depth=depth, rerank_top=3, model=world["model"])
    truth = read_table(resolve(str(tmp_path / "exact"))).to_pandas().groupby("query_id").gallery_id.apply(set)
    figures = {}
    for kind in ("hnsw", "ivf", "ivfpq"):
        out = str(tmp_path / kind)
        manifest = search.run(features, out, depth=depth, rerank_top=3, index=kind, model=world["model"])
        ranked = read_table(resolve(out)).to_pandas()
        assert manifest["index"] == kind and manifest["rows"] == len(ranked) <= queries * depth
        assert ranked.groupby("query_id").size().max() <= depth and ranked.query_id.nunique() == queries
        assert not ranked.duplicated(["query_id", "gallery_id"]).any()
        assert ranked[ranked["rank"] <= 3].score_token.notna().all() and ranked[ranked["rank"] > 3].score_token.isna().all()
        overlap = float(np.mean([len(set(rows.gallery_id) & truth[q]) / depth for q, rows in ranked.groupby("query_id")]))
        figures[kind] = (manifest["shortlist_recall_at_100"], overlap)
        # Positives the index missed are not ranked (null): metrics count them as not retrieved.
        metrics = evaluate.run(out, str(tmp_path / f"report-{kind}"), gallery_examples=0)
        assert 0 <= metrics["global"]["mAP"] <= 1
    print(f"\nshortlist on {gallery} random clustered vectors (D=32), {queries} queries, depth {depth}: "
          + "; ".join(f"{kind} recall@100 vs exact {r:.3f}, rankings' top-{depth} overlap with exact {o:.3f}" for kind, (r, o) in figures.items()))
    assert exact["index"] == "exact" and exact["shortlist_recall_at_100"] is None
    assert figures["hnsw"][0] >= 0.9 and figures["hnsw"][1] >= 0.9
    assert figures["ivf"][0] >= 0.5 and figures["ivfpq"][0] >= 0.3


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


def _snapshot_dirs(uri: str) -> set[str]:
    return {name for name in os.listdir(uri) if name.startswith("v-")}


@pytest.mark.timeout(600)
def test_interrupted_embed_leaves_the_previous_snapshot_and_a_rerun_publishes(world, tmp_path):
    out = str(tmp_path / "features")
    shutil.copytree(world["features"], out)
    manifest_before = open(os.path.join(out, MANIFEST), "rb").read()
    rows_before = sorted_table(out)
    old_snapshots = _snapshot_dirs(out)
    # The job joins the test session's Ray instance as a second driver, as `ray job submit`
    # would run it on a cluster; SIGKILLing the driver makes Ray reap its actors and tasks.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.embed", "--model", world["model"], "--catalog", world["catalog"], "--out", out, "--batch-size", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True,
    )
    # To land the kill between "data files written" and "manifest published" every time, the
    # job's RejectLog actor (which the driver asks for the rejects after the data is written and
    # before it publishes) is frozen with SIGSTOP as soon as it exists: the driver then waits
    # there with its data files on disk, and is SIGKILLed.
    own_job = ray.get_runtime_context().get_job_id()
    killed_with, frozen = None, None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if frozen is None:
                logs = [a for a in ray._private.state.actors().values()
                        if a["ActorClassName"] == "RejectLog" and a["State"] == "ALIVE" and a["JobID"] != own_job and a["Pid"]]
                if logs:
                    frozen = logs[0]["Pid"]
                    os.kill(frozen, signal.SIGSTOP)
            fresh = _snapshot_dirs(out) - old_snapshots
            written = [f for name in fresh for f in os.listdir(os.path.join(out, name)) if f.endswith(".parquet")]
            if frozen and written:
                time.sleep(0.5)  # let the write task finish its file
                killed_with = len([f for name in fresh for f in os.listdir(os.path.join(out, name)) if f.endswith(".parquet")])
                break
            time.sleep(0.05)
        # The driver, SIGKILLed: nothing of it can clean up; Ray reaps the job's actors and tasks.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        if frozen:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert killed_with, "the embed subprocess never wrote a data file"
    # Killed with part of the new snapshot on disk: readers still see the old table, unchanged.
    orphans = _snapshot_dirs(out) - old_snapshots
    assert orphans and open(os.path.join(out, MANIFEST), "rb").read() == manifest_before
    assert sorted_table(out).equals(rows_before)

    manifest = embed.run(world["model"], world["catalog"], out, batch_size=16)
    after = sorted_table(out)
    ids = after.column("image_id").to_pylist()
    assert manifest["rows"] == len(ids) == len(set(ids)) == IMAGES
    assert ids == rows_before.column("image_id").to_pylist()
    np.testing.assert_allclose(np.stack(after.column("global").to_numpy(zero_copy_only=False)),
                               np.stack(rows_before.column("global").to_numpy(zero_copy_only=False)), atol=1e-5)
    # The manifest names the new snapshot only; the previous one is kept for its readers. The killed
    # job's files are in no manifest; they are younger than the previous snapshot (they could be a
    # second writer's, still at work), so the next publish removes them.
    assert {name.split("/")[0] for name in manifest["files"]} == {manifest["snapshot"]}
    assert _snapshot_dirs(out) == old_snapshots | {manifest["snapshot"]} | orphans
    later = embed.run(world["model"], world["catalog"], out, incremental=True)
    assert later["embedded"] == 0 and _snapshot_dirs(out) == {manifest["snapshot"], later["snapshot"]}
    print(f"\nembed SIGKILLed with {killed_with} data file(s) of its snapshot written: old snapshot intact, re-run published {len(ids)} rows, 0 duplicates")
