"""`mga nightly`: prepare -> embed -> search --incremental -> evaluate on the demo's catalog.

The catalog is the demo's synthetic one (pipelines.demo.DEMO_SPEC, 1,200 images) exported
as real JPEG files and a retailer's CSV manifest. The chain runs on it, then after a 1%
change of the manifest (new images, changed images, images gone), then again with nothing
changed; a run that fails midway leaves every table at its last committed version.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest
import ray
import yaml
from PIL import Image

from pipelines import nightly, search
from pipelines.console import JobFailed
from pipelines.demo import DEMO_SPEC
from pipelines.history import read_history
from pipelines.storage import resolve
from pipelines.tables import companion, open_table, read_table
from tests.test_incremental_search import assert_same_search
from tests.tiny import write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = {"depth": 20, "rerank_top": 5}


def export_manifest(catalog: str, folder) -> list[dict]:
    """The catalog table's images as JPEG files under `folder`, listed in `folder`/catalog.csv."""
    rows = read_table(open_table(resolve(catalog))).sort_by("image_id").to_pylist()
    records = []
    for row in rows:
        path = folder / "images" / f"{row['image_id']}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(row["image"])
        box = row["bbox"] or [""] * 4
        records.append({"path": f"images/{row['image_id']}.jpg", "item_id": row["item_id"], "split": row["split"], "domain": row["domain"],
                        "category": row["category"], **dict(zip(("x1", "y1", "x2", "y2"), box))})
    write_manifest(folder, records)
    return records


def write_manifest(folder, records: list[dict]) -> None:
    with open(folder / "catalog.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def versions(paths: dict) -> dict[str, int]:
    return {name: open_table(resolve(uri)).version for name, uri in paths.items()}


@pytest.fixture(scope="module")
def demo_chain(ray_local, tmp_path_factory):
    from pipelines import synth

    root = tmp_path_factory.mktemp("nightly")
    synth.run(str(root / "synth"), DEMO_SPEC)
    records = export_manifest(str(root / "synth"), root)
    write_random_model(str(root / "model"))
    paths = {name: str(root / name) for name in ("catalog", "features", "rankings")}
    paths["history"] = companion(resolve(paths["rankings"]), "history").uri
    config = {
        "model": str(root / "model"), "catalog": paths["catalog"], "features": paths["features"], "rankings": paths["rankings"],
        "report": str(root / "report"),
        "prepare": {"source": "manifest", "manifest": str(root / "catalog.csv"), "min_shards": 4},
        "embed": {"batch_size": 32},
        "search": {**SEARCH, "block_rows": 256},
        "evaluate": {"ks": [1, 5, 10]},
    }
    (root / "nightly.yaml").write_text(yaml.safe_dump(config))
    first = nightly.run(str(root / "nightly.yaml"))
    return {"root": root, "records": records, "paths": paths, "config": config, "first": first}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_first_run_builds_every_table(demo_chain):
    outcomes = demo_chain["first"]["outcomes"]
    assert set(outcomes) == {"prepare", "embed", "search", "evaluate", "metrics"}
    assert versions(demo_chain["paths"]) == {"catalog": 0, "features": 0, "rankings": 0, "history": 0}
    assert open_table(resolve(demo_chain["paths"]["catalog"])).rows == len(demo_chain["records"]) == 1200
    report = (demo_chain["root"] / "report" / "report.html").read_text()
    assert "<h2>History</h2>" in report and "1 evaluations of" in report


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_one_percent_change_a_failure_midway_then_nothing(demo_chain, tmp_path):
    root, paths, records = demo_chain["root"], demo_chain["paths"], list(demo_chain["records"])
    before = versions(paths)
    # 1% of 1,200: 6 new images (new views of gallery items), 3 changed (re-encoded), 3 gone.
    gallery = [record for record in records if record["split"] == "gallery"]
    for number, record in enumerate(gallery[:6]):
        new = {**record, "path": f"images/new-{number}.jpg"}
        Image.open(root / record["path"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / new["path"], quality=80)
        records.append(new)
    for record in gallery[10:13]:
        Image.open(root / record["path"]).rotate(5).save(root / record["path"], quality=85)
    gone = {record["path"] for record in gallery[20:23]}
    write_manifest(root, [record for record in records if record["path"] not in gone])

    # The model is missing tonight: prepare commits the new catalog, embed fails, and the chain
    # stops there with every later table at its version.
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump({**demo_chain["config"], "model": str(tmp_path / "no-such-model")}))
    with pytest.raises(JobFailed, match="nightly stopped at embed: .*no-such-model"):
        nightly.run(str(tmp_path / "nightly.yaml"))
    assert versions(paths) == {**before, "catalog": before["catalog"] + 1}

    # With the model back, the next run carries on from there.
    changed = nightly.run(str(root / "nightly.yaml"))
    after = {name: version + 1 for name, version in before.items()}
    assert versions(paths) == after, changed["outcomes"]
    assert changed["outcomes"]["prepare"].endswith(f"unchanged at version {after['catalog']}")
    embed = changed["results"]["embed"]["incremental"]
    assert (embed["new"], embed["changed"], embed["deleted"]) == (6, 3, 3)
    rankings = changed["results"]["search"]
    assert rankings["incremental"]["gallery_added"] == 9 and rankings["incremental"]["gallery_removed"] == 6
    search.run(paths["features"], str(root / "full"), **SEARCH)
    assert_same_search(paths["rankings"], str(root / "full"))
    history = read_history(resolve(paths["history"]), resolve(paths["rankings"]).uri, None)
    assert history.column("rankings_version").to_pylist() == [0, 1]
    assert history.column("features_version").to_pylist() == [0, 1]
    assert pc.map_lookup(history.column("reranked"), "R@1", "first").to_pylist()[-1] == changed["results"]["evaluate"]["reranked"]["R@1"]
    assert "2 evaluations of" in (root / "report" / "report.html").read_text()

    # Nothing changed since: every step runs and no table gets a version; the CLI exits 0.
    # As `ray job submit` runs it: a driver joining the running Ray instance (no instance of its own to start).
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    quiet = subprocess.run([sys.executable, "-m", "pipelines.nightly", str(root / "nightly.yaml")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert versions(paths) == after
    assert "skipped" in quiet.stdout and quiet.stdout.count("unchanged at version") == 3


BASE = {"model": "m", "catalog": "c", "features": "f", "rankings": "r", "report": "out"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({**BASE, "rankigns": "x"}, r"rankigns.*(not permitted|extra)"),
        ({key: value for key, value in BASE.items() if key != "model"}, "model"),
        ({**BASE, "embed": {"batchsize": 8}}, r"embed: unrecognized arguments: --batchsize 8"),
        ({**BASE, "search": {"depth": "deep"}}, r"search: argument --depth: invalid int value: 'deep'"),
        ({**BASE, "embed": {"out": "elsewhere"}}, r"embed.out: set by the chain \(from `features`\)"),
        ({**BASE, "prepare": {"manifest": "feed.csv"}}, r"prepare.source: missing"),
        ({**BASE, "prepare": {"source": "manifest"}}, r"prepare: .*--manifest"),
    ],
)
def test_a_bad_config_is_refused_before_anything_runs(tmp_path, settings, message):
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(nightly.ConfigError, match=message) as error:
        nightly.run(str(tmp_path / "nightly.yaml"))
    assert str(tmp_path / "nightly.yaml") in str(error.value)


def test_cli_says_what_is_wrong_in_one_line(tmp_path):
    (tmp_path / "nightly.yaml").write_text("model: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "nightly", str(tmp_path / "nightly.yaml")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("mga: error: ") and "not valid YAML" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_config_from_s3(s3_env, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1").put_object(Bucket=s3_env["bucket"], Key="nightly.yaml", Body=yaml.safe_dump({**BASE, "evaluate": {"depth": 10}}).encode())
    config = nightly.load_nightly_config(f"s3://{s3_env['bucket']}/nightly.yaml")
    assert [step.name for step in nightly.plan_steps(config)] == ["embed", "search", "evaluate"]
    assert nightly.plan_steps(config)[-1].args.depth == 10
