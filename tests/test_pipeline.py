"""The pipeline end to end on a real local Ray: synth -> train (2 workers) -> embed -> search -> evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.compute as pc
import pytest
import ray

from pipelines import embed, evaluate, search
from pipelines.model_store import load_model
from pipelines.schemas import RANKINGS, features_schema
from pipelines.storage import resolve
from pipelines.tables import open_table, read_table


@pytest.fixture(scope="module")
def trained(trained_model, trained_features, tmp_path_factory):
    """The session's trained model and its features, with this module's output paths."""
    root = tmp_path_factory.mktemp("pipeline")
    paths = {"catalog": trained_model["catalog"], "model": trained_model["model"], "features": trained_features["uri"],
             "rankings": str(root / "rankings"), "report": str(root / "report"), "tracking_uri": trained_model["tracking_uri"]}
    return paths, trained_model["result"], trained_features["manifest"]


RERANK = 4


@pytest.fixture(scope="module")
def searched(trained):
    """The module's search of the trained features: all 12 queries in one chunk on one actor."""
    paths, _, _ = trained
    return search.run(paths["features"], paths["rankings"], rerank_top=RERANK, workers=1, query_chunk=12, rerank_batch=3)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_train_with_two_workers_writes_a_loadable_artifact(trained):
    paths, result, _ = trained
    model, model_id, config = load_model(paths["model"])
    assert model_id == result["model_id"] and result["epochs"] == 1
    assert config["image_size"] == 64 and config["train"]["items"] == 6
    assert np.isfinite(result["metrics"]["loss"]) and result["metrics"]["steps"] >= 1
    # 6 items, P = 3, two workers: one whole batch each, nothing dropped, undecodable or left out.
    assert [result["metrics"][name] for name in ("steps", "undecodable_images", "dropped_batches", "left_out_items")] == [1, 0, 0, 0]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_embed_search_evaluate_tables_follow_the_schemas(trained, searched):
    paths, result, manifest = trained
    catalog = open_table(resolve(paths["catalog"]))
    features_table = open_table(resolve(paths["features"]))
    assert features_table.version == manifest["version"] and manifest["catalog_version"] == catalog.version
    features = read_table(features_table)
    assert features.schema == features_schema(32, [4 * 16, 4 * 16], "float32")
    assert features.num_rows == manifest["rows"] == catalog.rows == catalog.info["rows"]
    assert set(features.column("model_id").to_pylist()) == {result["model_id"]}
    global_feature = np.stack(features.column("global").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(global_feature, axis=1), 1.0, atol=1e-5)
    tokens = np.stack(features.column("tokens_1").to_numpy(zero_copy_only=False)).reshape(-1, 4, 16)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=2), 1.0, atol=1e-5)
    assert {key: manifest[key] for key in ("global_dim", "num_tokens", "token_dim", "layers", "token_dtype")} == {
        "global_dim": 32, "num_tokens": 4, "token_dim": 16, "layers": [3, 4], "token_dtype": "float32"}

    rankings_table = open_table(resolve(paths["rankings"]))
    assert rankings_table.version == searched["version"] and searched["features_version"] == features_table.version
    assert searched["positives"] == {"table": resolve(paths["rankings"]).uri + "_positives", "version": 0}
    rankings = read_table(rankings_table)
    assert rankings.schema == RANKINGS and rankings.num_rows == searched["rows"] == rankings_table.rows
    gallery = features.filter(pc.field("split") == "gallery")
    items = dict(zip(features.column("image_id").to_pylist(), features.column("item_id").to_pylist()))
    frame = rankings.to_pandas()
    assert frame.query_id.nunique() == 12 and len(frame) == 12 * gallery.num_rows
    for query_id, rows in frame.groupby("query_id"):
        rows = rows.sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, gallery.num_rows + 1))
        head, tail = rows[rows["rank"] <= RERANK], rows[rows["rank"] > RERANK]
        assert head.score_token.notna().all() and tail.score_token.isna().all()
        assert (np.diff(head.score.to_numpy()) <= 1e-6).all() and (np.diff(tail.score_global.to_numpy()) <= 1e-6).all()
        assert head.score.min() >= tail.score.max()
        assert (rows.is_match == [items[g] == items[query_id] for g in rows.gallery_id]).all()
        assert (rows.query_positives == 2).all()

    metrics = evaluate.run(paths["rankings"], paths["report"])
    saved = json.loads((resolve(paths["report"]).join("metrics.json")).read_bytes())
    assert saved["queries"] == 12 and saved["excluded_queries"] == 0
    assert saved["rankings_version"] == rankings_table.version and saved["rankings_rows"] == rankings.num_rows
    for ordering in ("global", "reranked"):
        assert set(saved[ordering]) == {"R@1", "R@10", "R@20", "R@30", "R@40", "R@50", "mAP"}
        assert all(0.0 <= value <= 1.0 for value in saved[ordering].values())
    # With 6 gallery images, every query has its match within 10.
    assert saved["global"]["R@10"] == 1.0 and metrics["reranked"]["R@10"] == 1.0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_training_and_its_evaluation_are_tracked_on_the_mlflow_server(trained, searched, tmp_path):
    from mlflow import MlflowClient

    paths, result, _ = trained
    client = MlflowClient(paths["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("mga").experiment_id], filter_string="attributes.run_name = 't'")
    assert run.info.status == "FINISHED" and run.data.tags["model_id"] == result["model_id"]
    params = run.data.params
    assert params["model.alpha"] == "0.5" and params["data.items_per_batch"] == "3" and params["catalog"] == resolve(paths["catalog"]).uri
    assert params["catalog_version"] == "0" and params["train classes"] == "6" and "optim.epochs" not in params
    for name in ("loss", "images_per_s", "data_wait_s", "undecodable_images", "dropped_batches"):
        assert [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, name)] == [(1, pytest.approx(result["metrics"][name]))]
    assert {entry.path for entry in client.list_artifacts(run.info.run_id, "model")} == {"model/artifact.json", "model/config.json", "model/model.safetensors"}
    artifact = json.loads(open(client.download_artifacts(run.info.run_id, "model/artifact.json", str(tmp_path))).read())
    assert artifact["model_id"] == result["model_id"]

    # The evaluation goes to the run of the model that made the features: its metrics at the rankings' version.
    metrics = evaluate.run(paths["rankings"], str(tmp_path / "report"), tracking_uri=paths["tracking_uri"], history=None)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval_reranked_R_at_1"] == pytest.approx(metrics["reranked"]["R@1"]) and logged["eval_global_mAP"] == pytest.approx(metrics["global"]["mAP"])
    assert logged["eval_queries"] == 12 and [m.step for m in client.get_metric_history(run.info.run_id, "eval_reranked_mAP")] == [metrics["rankings_version"]]
    report = f"evaluations/rankings/v{metrics['rankings_version']}"
    assert {f"{report}/report.html", f"{report}/metrics.json", f"{report}/recall.png"} <= {entry.path for entry in client.list_artifacts(run.info.run_id, report)}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_search_ranking_does_not_depend_on_worker_count_or_a_killed_scan_actor(trained, searched, tmp_path):
    paths, _, _ = trained
    # 12 queries: the module's search (one chunk on one actor) against four chunks of 3 on two
    # actors, with other blocks and batches, one of the actors SIGKILLed mid-search: Ray restarts
    # it and retries its call, which fetches the chunk's arrays again. (Four chunks: with two the
    # search could end before the kill landed, and an actor killed after its pool is gone is not restarted.)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(two=search.run(
        paths["features"], str(tmp_path / "two"), rerank_top=RERANK, workers=2, query_chunk=3, block_rows=7, rerank_batch=5)))
    runner.start()
    killed, deadline = None, time.time() + 300
    while runner.is_alive() and time.time() < deadline and killed is None:
        alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] == "GalleryScanner"]
        if alive:
            time.sleep(0.1)  # into its first calls
            killed = alive[0]
            os.kill(killed["Pid"], signal.SIGKILL)
        time.sleep(0.02)
    runner.join(timeout=300)
    assert killed is not None and "two" in result, "no scan actor was killed while the search ran, or the search failed"
    assert ray._private.state.actors()[killed["ActorID"]]["NumRestarts"] >= 1
    tables = [read_table(open_table(resolve(uri))).sort_by([("query_id", "ascending"), ("rank", "ascending")])
              for uri in (paths["rankings"], str(tmp_path / "two"))]
    assert tables[0].equals(tables[1]) and searched["rerank_top"] == result["two"]["rerank_top"] == RERANK


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_incremental_embed_leaves_unchanged_rows_as_stored(trained, tmp_path):
    paths, _, _ = trained
    out = str(tmp_path / "features")
    images = open_table(resolve(paths["catalog"])).rows
    # No features table yet: nothing to merge with, so every image is embedded (version 0).
    first = embed.run(paths["model"], paths["catalog"], out, incremental=True)
    assert first["embedded"] == first["rows"] == images and first["version"] == 0
    stored = open_table(resolve(out))
    before = read_table(stored).sort_by("image_id")
    # Nothing changed in the catalog: nothing embedded, no new version, the same files.
    second = embed.run(paths["model"], paths["catalog"], out, incremental=True)
    assert second["incremental"] == {"new": 0, "changed": 0, "unchanged": images, "deleted": 0, "rows_written": 0}
    assert second["embedded"] == 0 and second["version"] == first["version"] and second["rows"] == images
    current = open_table(resolve(out))
    assert current.version == stored.version and current.info == stored.info
    assert current.files.column("path").to_pylist() == stored.files.column("path").to_pylist()
    after = read_table(current).sort_by("image_id")
    assert after.num_rows == images and after.column("global").equals(before.column("global"))
    assert after.column("image_id").to_pylist() == before.column("image_id").to_pylist()


def _mga(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_cli_refuses_bad_configs_and_inputs_with_one_line(tmp_path):
    unknown = _mga("train", "--set", "optim.epochz=3", "--catalog", str(tmp_path), "--output", str(tmp_path / "m"))
    assert unknown.returncode == 2 and "optim.epochz" in unknown.stderr and "Traceback" not in unknown.stderr
    negative = _mga("train", "--set", "data.image_size=-4", "--catalog", str(tmp_path), "--output", str(tmp_path / "m"))
    assert negative.returncode == 2 and "data.image_size" in negative.stderr
    missing = _mga("embed", "--model", str(tmp_path / "nope"), "--catalog", str(tmp_path / "nothing"), "--out", str(tmp_path / "f"))
    assert missing.returncode == 2 and "nothing" in missing.stderr and "is not a Delta table" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert not (tmp_path / "f").exists() and not (tmp_path / "f_rejects").exists()
