"""Object storage end to end: prepare to a real S3 endpoint (moto server over HTTP), then embed
with a model artifact from the bucket, reading the catalog back from it and writing the features
there. (Training through S3, a catalog read and checkpoints written there and resumed from after
a lost node, is the multi-node stage's: tests/test_multinode.py, one Ray Train run fewer here.)"""

from __future__ import annotations

import csv

import pytest

from pipelines.synthetic import SynthSpec, plan_catalog, render_image
from pipelines import embed, prepare
from pipelines.storage import resolve
from pipelines.tables import open_table, read_table
from tests.tiny import write_random_model


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_prepare_embed_through_s3(ray_local, s3_env, tmp_path):
    spec = SynthSpec(seed=5, groups=2, items_per_group=3, train_views=4, gallery_views=1, query_views=1, image_size=64)
    rows = []
    for planned in plan_catalog(spec):
        data, _ = render_image(spec, planned)
        path = tmp_path / "images" / f"{planned.image_id}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        rows.append({"path": f"images/{path.name}", "item_id": planned.item_id, "split": planned.split, "domain": planned.domain})
    manifest_csv = tmp_path / "catalog.csv"
    with manifest_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "item_id", "split", "domain"])
        writer.writeheader()
        writer.writerows(rows)

    bucket = f"s3://{s3_env['bucket']}"
    prepared = prepare.run("manifest", f"{bucket}/catalog", manifest=str(manifest_csv))
    assert prepared["rows"] == len(rows) and prepared["rejected"] == 0
    catalog = open_table(resolve(f"{bucket}/catalog"))
    assert catalog.version == prepared["version"] == 0 and catalog.rows == len(rows)
    assert catalog.info == {key: value for key, value in prepared.items() if key != "version"}
    rejects = open_table(resolve(prepared["rejects"]["table"]), prepared["rejects"]["version"])
    assert prepared["rejects"]["table"] == f"{bucket}/catalog_rejects" and rejects.rows == 0

    model_id = write_random_model(f"{bucket}/model", image_size=64)
    features = embed.run(f"{bucket}/model", f"{bucket}/catalog", f"{bucket}/features")
    assert features["rows"] == len(rows) and features["rejected"] == 0
    assert features["catalog"] == f"{bucket}/catalog" and features["catalog_version"] == catalog.version
    snapshot = open_table(resolve(f"{bucket}/features"))
    assert snapshot.version == features["version"] == 0
    table = read_table(snapshot, ["image_id", "model_id"])
    assert table.num_rows == len(rows) and set(table.column("model_id").to_pylist()) == {model_id}
    assert sorted(table.column("image_id").to_pylist()) == sorted(read_table(catalog, ["image_id"]).column("image_id").to_pylist())
