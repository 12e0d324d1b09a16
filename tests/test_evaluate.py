"""The evaluate job on small hand-built tables: both orderings, metrics.json, the report.

Metrics come from the positives table (full-gallery ranks); the rankings rows give the
queries, |P| and the gallery picture.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines import evaluate, report, storage
from pipelines.history import read_history
from pipelines.schemas import POSITIVES, RANKINGS
from pipelines.tables import TableWriter, companion, open_table

T, F = True, False
TOPS = "tops & tees <x>"  # needs escaping in HTML
DRESSES = "dresses"

# (query_id, rank, gallery_id, score_global, is_match, |P|), depth 4, rerank top 2.
# qa, P=2: global order gX gA1 gA2 gY = F T T F  -> first 2, AP (1/2 + 2/3)/2 = 7/12
#          reranked      gA1 gX gA2 gY = T F T F -> first 1, AP (1 + 2/3)/2   = 5/6
# qb, P=3 (one positive below the depth); gC and gB1 tie on score_global, gB1 sorts first:
#          global        gB1 gC gZ gB2 = T F F T -> first 1, AP (1 + 2/4)/3   = 1/2
#          reranked      gC gB1 gZ gB2 = F T F T -> first 2, AP (1/2 + 2/4)/3 = 1/3
# qc, P=0: excluded.  qd, P=1, its positive is below the depth: first 0, AP 0.
# qe: unlabelled (no item: null |P| and is_match), ranked but never scored.
ROWS_FILE_1 = [
    ("qa", 1, "gA1", 0.80, T, 2),
    ("qa", 2, "gX", 0.90, F, 2),
    ("qa", 3, "gA2", 0.70, T, 2),
    ("qa", 4, "gY", 0.60, F, 2),
    ("qb", 1, "gC", 0.85, F, 3),
    ("qb", 2, "gB1", 0.85, T, 3),
    ("qb", 3, "gZ", 0.40, F, 3),
    ("qb", 4, "gB2", 0.30, T, 3),
]
ROWS_FILE_2 = [
    ("qc", 1, "gX", 0.50, F, 0),
    ("qc", 2, "gY", 0.40, F, 0),
    ("qc", 3, "gZ", 0.30, F, 0),
    ("qc", 4, "gC", 0.20, F, 0),
    ("qd", 1, "gY", 0.50, F, 1),
    ("qd", 2, "gX", 0.45, F, 1),
    ("qd", 3, "gZ", 0.30, F, 1),
    ("qe", 1, "gA1", 0.70, None, None),
    ("qe", 2, "gX", 0.60, None, None),
]  # qd has only 3 rows: a ranking shorter than the depth
CATEGORIES = {"qa": TOPS, "qb": DRESSES, "qc": TOPS, "qd": TOPS}
MISSING_IMAGE = "gZ"  # not in the catalog: the gallery shows a placeholder

# Every positive with its full-gallery ranks (global, reranked); gB3 and gD lie below the depth.
POSITIVE_RANKS = [
    ("qa", "gA1", 2, 1),
    ("qa", "gA2", 3, 3),
    ("qb", "gB1", 1, 2),
    ("qb", "gB2", 4, 4),
    ("qb", "gB3", 6, 6),
    ("qd", "gD", 5, 5),
]

# At evaluation depth 4.
EXPECTED = {
    "global": {"R@1": 1 / 3, "R@10": 2 / 3, "mAP": (7 / 12 + 1 / 2 + 0) / 3},
    "reranked": {"R@1": 1 / 3, "R@10": 2 / 3, "mAP": (5 / 6 + 1 / 3 + 0) / 3},
}


def rankings_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows, strict=True))
    # Items: a query's is item-<query> (none when unlabelled); a match is of the query's item.
    query_items = [None if count is None else f"item-{query}" for query, count in zip(columns[0], columns[5])]
    return pa.table(
        {
            "query_id": pa.array(columns[0], pa.string()),
            "query_item_id": pa.array(query_items, pa.string()),
            "rank": pa.array(columns[1], pa.int32()),
            "gallery_id": pa.array(columns[2], pa.string()),
            "gallery_item_id": pa.array([item if match else f"item-{g}" for item, match, g in zip(query_items, columns[4], columns[2])], pa.string()),
            "score_global": pa.array(columns[3], pa.float32()),
            # Search leaves score_token null beyond the rerank top (2 here).
            "score_token": pa.array([0.5 if rank <= 2 else None for rank in columns[1]], pa.float32()),
            "score": pa.array([1.0 - 0.1 * rank for rank in columns[1]], pa.float32()),
            "is_match": pa.array(columns[4], pa.bool_()),
            "query_positives": pa.array(columns[5], pa.int32()),
        },
        schema=RANKINGS,
    )


def positives_table(rows: list[tuple]) -> pa.Table:
    """(query_id, gallery_id, rank_global, rank_reranked) rows; evaluate reads no score_global."""
    columns = list(zip(*rows, strict=True))
    columns.append([0.0] * len(rows))
    return pa.table(dict(zip(POSITIVES.names, columns)), schema=POSITIVES)


def publish_table(uri: str, parts: list[pa.Table], info: dict, positives: pa.Table | None = None) -> str:
    """A Delta table written by hand, one file per part; with `positives`, the positives table beside it
    (`<uri>_positives`) is committed first and named with its version, as `mga search` does."""
    table = storage.resolve(uri)
    if positives is not None:
        with TableWriter(companion(table, "positives")) as writer:
            storage.write_parquet(writer.file("part-0.parquet"), positives)
            committed = writer.commit(POSITIVES, {"table": "positives", "of": table.uri, "rows": positives.num_rows})
        info = {**info, "positives": {"table": committed.uri, "version": committed.version}}
    with TableWriter(table) as writer:
        for index, part in enumerate(parts):
            storage.write_parquet(writer.file(f"part-{index:05d}.parquet"), part)
        writer.commit(parts[0].schema, info)
    return table.uri


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def build_tables(root, features: bool = True) -> str:
    """Catalog, features and rankings tables under `root`; returns the rankings URI."""
    image_ids = sorted(set(CATEGORIES) | {row[2] for row in ROWS_FILE_1 + ROWS_FILE_2} - {MISSING_IMAGE})
    catalog = publish_table(
        str(root / "catalog"),
        [pa.table({"image_id": image_ids, "image": [jpeg((40 * i % 255, 90, 160)) for i in range(len(image_ids))]})],
        {"table": "catalog"},
    )
    features_uri = str(root / "features")
    if features:
        publish_table(
            features_uri,
            [
                pa.table(
                    {
                        "image_id": list(CATEGORIES),
                        "category": list(CATEGORIES.values()),
                        "split": ["query"] * len(CATEGORIES),
                    }
                )
            ],
            {"table": "features", "catalog": catalog, "catalog_version": 0},
        )
    return publish_table(
        str(root / "rankings"),
        [rankings_table(ROWS_FILE_1), rankings_table(ROWS_FILE_2)],
        rankings_info(features_uri, queries=5),
        positives_table(POSITIVE_RANKS),
    )


def rankings_info(features_uri: str, queries: int) -> dict:
    """The rankings' commit metadata as `mga search` writes it (less the positives, which publish_table adds)."""
    return {
        "table": "rankings",
        "features": features_uri,
        "features_version": 0,
        "model_id": "model-test",
        "depth": 4,
        "rerank_top": 2,
        "alpha": 0.5,
        "queries": queries,
        "gallery": 9,
    }


def test_scores_come_from_the_positives_full_gallery_ranks():
    query_ids, counts = np.array(["qa", "qb", "qc", "qd"]), np.array([2, 3, 0, 1])
    scored = evaluate.score_positives(positives_table(POSITIVE_RANKS), query_ids, counts, depth=4)
    assert scored["positives"].tolist() == [2, 3, 0, 1]
    assert scored["first_rank_global"].tolist() == [2, 1, 0, 0]
    assert scored["first_rank_reranked"].tolist() == [1, 2, 0, 0]
    assert scored["ap_global"][[0, 1, 3]] == pytest.approx([7 / 12, 1 / 2, 0])
    assert scored["ap_reranked"][[0, 1, 3]] == pytest.approx([5 / 6, 1 / 3, 0])
    # Over the whole gallery the positives below the depth count: qb's gB3 at 6, qd's gD at 5.
    whole = evaluate.score_positives(positives_table(POSITIVE_RANKS), query_ids, counts, depth=None)
    assert whole["ap_global"][[1, 3]] == pytest.approx([(1 + 2 / 4 + 3 / 6) / 3, 1 / 5])
    assert whole["first_rank_global"].tolist() == [2, 1, 0, 5]


def test_inconsistent_positives_are_rejected():
    with pytest.raises(ValueError, match="holds 2 positives, the rankings count 3"):
        evaluate.score_positives(positives_table(POSITIVE_RANKS[:2]), np.array(["qa"]), np.array([3]), depth=None)
    with pytest.raises(ValueError, match="do not rank"):
        evaluate.score_positives(positives_table(POSITIVE_RANKS), np.array(["qa"]), np.array([2]), depth=None)


def frame_colour(png: bytes, row: int, rank: int) -> tuple[int, int, int]:
    """The colour of the frame of result `rank` (0 = the query) in gallery row `row`."""
    tile_w, tile_h = report.TILE + 2 * report.FRAME, report.TILE + 2 * report.FRAME + report.CAPTION
    x = report.GAP + (report.QUERY_GAP + rank * (tile_w + report.GAP) if rank else 0)
    y = report.GAP + row * (tile_h + report.GAP)
    return Image.open(io.BytesIO(png)).convert("RGB").getpixel((x + 1, y + 1))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_run_end_to_end(ray_local, tmp_path):
    rankings = build_tables(tmp_path)
    out = tmp_path / "report"
    metrics = evaluate.run(rankings, str(out), depth=4)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert {"queries", "excluded_queries", "depth", "rerank_top", "global", "reranked"} <= set(on_disk)
    assert on_disk["queries"] == 3 and on_disk["excluded_queries"] == 1 and on_disk["unlabelled_queries"] == 1
    assert on_disk["depth"] == 4 and on_disk["rerank_top"] == 2 and on_disk["model_id"] == "model-test"
    for ordering, expected in EXPECTED.items():
        values = on_disk[ordering]
        assert set(values) == {"R@1", "R@10", "R@20", "R@30", "R@40", "R@50", "mAP"}
        assert values["R@1"] == pytest.approx(expected["R@1"])
        for k in (10, 20, 30, 40, 50):
            assert values[f"R@{k}"] == pytest.approx(expected["R@10"])
        assert values["mAP"] == pytest.approx(expected["mAP"])
    assert on_disk["per_category"][TOPS]["queries"] == 2  # qa and qd; qc is excluded
    assert on_disk["per_category"][TOPS]["global_R@1"] == 0.0
    assert on_disk["per_category"][TOPS]["reranked_R@1"] == 0.5
    assert on_disk["per_category"][DRESSES]["global_R@1"] == 1.0
    assert on_disk["per_category"][DRESSES]["reranked_R@1"] == 0.0
    assert on_disk["rerank_effect"]["improved"] == pytest.approx(1 / 3)  # qa: 2 -> 1
    assert on_disk["rerank_effect"]["worsened"] == pytest.approx(1 / 3)  # qb: 1 -> 2
    assert on_disk["rerank_effect"]["unchanged"] == pytest.approx(1 / 3)  # qd: none either way
    assert on_disk["positives_rows"] == 6 and on_disk["gallery"] == 9
    assert on_disk["rankings"] == rankings and on_disk["rankings_version"] == 0
    assert any("1 of the 8 picture images are not in the catalog" in note for note in on_disk["notes"])

    markdown = (out / "report.md").read_text()
    for number in ("0.3611", "0.3889", "0.3333", "0.6667", "+0.0278"):  # mAPs, R@1, R@10, mAP change
        assert number in markdown
    assert f"| {TOPS} | 2 | 0.0000 | 0.5000 |" in markdown
    for figure in ("recall.png", "per_category.png", "gallery.png"):
        assert f"]({figure})" in markdown
        assert (out / figure).read_bytes().startswith(b"\x89PNG")

    page = (out / "report.html").read_text()
    assert "0.3611" in page and "0.3889" in page
    assert "tops &amp; tees &lt;x&gt;" in page and TOPS not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing external
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 4 and base64.b64decode(embedded[3]) == (out / "history.png").read_bytes()
    # The evaluation is the first row of the metrics history beside the rankings.
    history = read_history(companion(storage.resolve(rankings), "history"), storage.resolve(rankings).uri, 4)
    assert history.num_rows == 1 and history.column("rankings_version").to_pylist() == [0] and history.column("depth").to_pylist() == [4]
    assert dict(history.column("reranked")[0].as_py()) == on_disk["reranked"] and dict(history.column("global")[0].as_py()) == on_disk["global"]
    categories = dict(history.column("per_category")[0].as_py())
    assert dict(categories[TOPS])["reranked_R@1"] == 0.5 and dict(categories[TOPS])["queries"] == 2
    assert (history.column("queries")[0].as_py(), history.column("unlabelled_queries")[0].as_py(), history.column("model_id")[0].as_py()) == (3, 1, "model-test")
    assert "1 evaluations of" in markdown
    gallery = base64.b64decode(embedded[2])
    assert gallery == (out / "gallery.png").read_bytes()
    # Rows qa, qb, qd. qa's reranked top: gA1 (match), gX; qb's: gC, gB1 (match).
    assert (
        Image.open(io.BytesIO(gallery)).size[1]
        == 3 * (report.TILE + 2 * report.FRAME + report.CAPTION + report.GAP) + report.GAP
    )
    assert frame_colour(gallery, 0, 0) == report.COLOURS["query"]
    assert frame_colour(gallery, 0, 1) == report.COLOURS["match"]
    assert frame_colour(gallery, 0, 2) == report.COLOURS["miss"]
    assert frame_colour(gallery, 1, 1) == report.COLOURS["miss"]
    assert frame_colour(gallery, 1, 2) == report.COLOURS["match"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_main_with_smaller_depth_and_no_features(ray_local, tmp_path, capsys):
    rankings = build_tables(tmp_path, features=False)
    out = tmp_path / "shallow"
    evaluate.main(["--rankings", rankings, "--out", str(out), "--depth", "2"])
    metrics = json.loads((out / "metrics.json").read_text())

    # Depth 2: qa global F T / reranked T F; qb global T F / reranked F T; qd nothing.
    assert metrics["depth"] == 2
    assert metrics["global"]["mAP"] == pytest.approx(((1 / 2) / 2 + 1 / 3 + 0) / 3)
    assert metrics["reranked"]["mAP"] == pytest.approx((1 / 2 + (1 / 2) / 3 + 0) / 3)
    assert metrics["per_category"] == {}
    assert any("Features table unavailable" in note for note in metrics["notes"])
    assert {path.name for path in out.iterdir()} == {"metrics.json", "report.md", "report.html", "recall.png", "history.png"}
    assert "Features table unavailable" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "5 queries, 6 positives" in printed and "excluded  1 queries" in printed and "unlabelled queries: 1" in printed

    # Without --depth: over the whole gallery, positives below the rankings' depth included.
    whole = evaluate.run(rankings, str(tmp_path / "whole"))
    assert whole["depth"] == "gallery" and whole["global"]["R@10"] == 1.0
    assert whole["global"]["mAP"] == pytest.approx((7 / 12 + (1 + 2 / 4 + 3 / 6) / 3 + 1 / 5) / 3)
    # A new version of the rankings (qa and qb only, with its own positives version): the current
    # version is evaluated by default, `--version 0` evaluates the first with ITS positives (Delta
    # time travel: reading today's positives would find no positive of qd, which v0 counts as 1).
    first = open_table(storage.resolve(rankings))
    publish_table(rankings, [rankings_table(ROWS_FILE_1)], rankings_info(str(tmp_path / "features"), queries=2), positives_table(POSITIVE_RANKS[:5]))
    assert open_table(storage.resolve(rankings)).version == first.version + 1
    current = evaluate.run(rankings, str(tmp_path / "current"), gallery_examples=0)
    assert current["rankings_version"] == first.version + 1 and current["queries"] == 2 and current["excluded_queries"] == 0
    assert current["global"]["mAP"] == pytest.approx((7 / 12 + (1 + 2 / 4 + 3 / 6) / 3) / 2)
    evaluate.main(["--rankings", rankings, "--out", str(tmp_path / "old"), "--version", str(first.version), "--gallery-examples", "0"])
    old = json.loads((tmp_path / "old" / "metrics.json").read_text())
    assert old["rankings_version"] == first.version and old["global"] == whole["global"] and old["reranked"] == whole["reranked"]
    assert old["queries"] == 3 and old["excluded_queries"] == 1 and old["positives_rows"] == 6
    # Every evaluation is in the history, each depth apart: the report plots those of its own depth.
    history = companion(storage.resolve(rankings), "history")
    assert read_history(history, storage.resolve(rankings).uri, 2).column("rankings_version").to_pylist() == [first.version]
    assert read_history(history, storage.resolve(rankings).uri, None).column("rankings_version").to_pylist() == [first.version, first.version + 1, first.version]
    assert "3 evaluations of" in (tmp_path / "old" / "report.md").read_text()
    with pytest.raises(SystemExit):  # the command line turns it into one line on stderr
        evaluate.main(["--rankings", rankings, "--out", str(out), "--depth", "0"])
    assert "mga: error: depth must be positive, got 0" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(300)
def test_run_writes_the_report_to_s3(ray_local, tmp_path, s3_env):
    import boto3

    rankings = build_tables(tmp_path)
    prefix = f"s3://{s3_env['bucket']}/reports/run-1"
    history = f"s3://{s3_env['bucket']}/metrics_history"
    metrics = evaluate.run(rankings, prefix, history=history)
    assert metrics["depth"] == "gallery"
    assert evaluate.run(rankings, f"s3://{s3_env['bucket']}/reports/run-2", history=history, gallery_examples=0)["global"] == metrics["global"]
    rows = read_history(storage.resolve(history), storage.resolve(rankings).uri, None)
    assert rows.num_rows == 2 and dict(rows.column("global")[1].as_py()) == metrics["global"]

    client = boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=s3_env["bucket"], Prefix="reports/run-1/")
    # pyarrow's create_dir leaves a "reports/run-1/" marker object: skip it.
    names = {item["Key"].rsplit("/", 1)[-1] for item in listed["Contents"]} - {""}
    assert names == {"metrics.json", "report.md", "report.html", "recall.png", "per_category.png", "gallery.png", "history.png"}
    body = client.get_object(Bucket=s3_env["bucket"], Key="reports/run-1/metrics.json")["Body"].read()
    assert json.loads(body)["reranked"]["mAP"] == pytest.approx(metrics["reranked"]["mAP"])


@pytest.mark.timeout(180)
def test_an_evaluation_is_logged_to_its_models_run_or_to_a_run_of_its_own(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines import tracking

    rankings = build_tables(tmp_path)
    (tmp_path / "store").mkdir()
    store = tracking.local_store(tmp_path / "store")
    client = MlflowClient(store)

    # No run made model-test: a run of its own in mga-evaluations, named after the rankings and version.
    first = evaluate.run(rankings, str(tmp_path / "report-1"), depth=4, tracking_uri=store)
    (own,) = client.search_runs([client.get_experiment_by_name(tracking.EVALUATIONS_EXPERIMENT).experiment_id])
    assert own.info.run_name == "evaluate rankings v0" and own.info.status == "FINISHED"
    assert own.data.params["rankings"] == rankings and own.data.params["rankings_version"] == "0" and own.data.params["model_id"] == "model-test"
    assert own.data.metrics["eval_reranked_R_at_1"] == pytest.approx(first["reranked"]["R@1"]) and own.data.metrics["eval_queries"] == 3
    assert {"evaluations/rankings/v0/report.html", "evaluations/rankings/v0/metrics.json"} <= {
        entry.path for entry in client.list_artifacts(own.info.run_id, "evaluations/rankings/v0")}

    # Once a training run carries the model's id, the evaluation goes there (MLFLOW_TRACKING_URI, no flag).
    training = tracking.open_run(store, "mga", "t")
    training.set_tags({tracking.MODEL_TAG: "model-test"})
    training.finish()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    second = evaluate.run(rankings, str(tmp_path / "report-2"), depth=4)
    assert client.get_run(training.run_id).data.metrics["eval_global_mAP"] == pytest.approx(second["global"]["mAP"])
    assert len(client.search_runs([client.get_experiment_by_name(tracking.EVALUATIONS_EXPERIMENT).experiment_id])) == 1
