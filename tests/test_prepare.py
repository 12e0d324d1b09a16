"""`mga prepare` on small DeepFashion-format trees and CSV manifests with broken images among them."""

from __future__ import annotations

import hashlib
import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mga.artifact import pack_artifact
from mga.config import ModelConfig
from mga.model import MGAModel
from pipelines import embed, prepare, storage
from pipelines.embed import merge
from pipelines.embed.merge import plan_incremental
from pipelines.model_store import write_artifact
from pipelines.schemas import CATALOG, REJECTS
from pipelines.tables import TableWriter, companion, open_table, read_table

RAY_TIMEOUT = 300


# ------------------------------------------------------------------------------ helpers


def jpeg(seed: int, size: tuple[int, int] = (40, 30), orientation: int | None = None, noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
        pixels[: size[1] // 2, : size[0] // 2] = 255 - pixels[0, 0]
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, "JPEG", quality=90, exif=exif)
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_rgba(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 24), (seed % 256, 10, 200, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def put(root, relative: str, data: bytes) -> str:
    path = os.path.join(str(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def deepfashion_file(path, header: str, rows: list[str], count: int | None = None) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    # Real DeepFashion files pad columns with runs of spaces.
    body = [re.sub(" ", "   ", row, count=1) for row in rows]
    text = f"{len(rows) if count is None else count}\n{header}\n" + "\n".join(body) + "\n"
    with open(path, "w") as handle:
        handle.write(text)


def read_catalog(uri: str) -> dict[str, dict]:
    snapshot = open_table(storage.resolve(uri))
    table = read_table(snapshot)
    assert table.schema.equals(CATALOG), table.schema
    assert table.num_rows == snapshot.rows == snapshot.info["rows"]
    rows = table.to_pylist()
    ids = [row["image_id"] for row in rows]
    assert len(ids) == len(set(ids)), "image_id is unique"
    return {row["image_id"]: row for row in rows}


def read_rejects(uri: str) -> dict[str, str]:
    """The rejects companion table, at the version the catalog's current version names."""
    location = storage.resolve(uri)
    catalog = open_table(location)
    named = catalog.info["rejects"]
    assert named["table"] == companion(location, "rejects").uri == location.uri + "_rejects"
    snapshot = open_table(storage.resolve(named["table"]), named["version"])
    assert snapshot.info["table"] == "rejects" and snapshot.info["of"] == location.uri
    table = read_table(snapshot)
    assert table.schema.equals(REJECTS)
    assert table.num_rows == snapshot.info["rows"] == catalog.info["rejected"]
    # The rejects are never rows of the catalog: none of its files lies in the rejects table.
    catalog_files = catalog.files.column("path").to_pylist()
    assert catalog_files and all(path.startswith(location.path + "/run-") for path in catalog_files), catalog_files
    assert not set(catalog_files) & set(snapshot.files.column("path").to_pylist())
    return dict(zip(table["source_path"].to_pylist(), table["reason"].to_pylist(), strict=True))


INSHOP_HEADER = "image_name item_id evaluation_status"
INSHOP_BBOX_HEADER = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
D1 = "img/WOMEN/Dresses/id_00000001"
D2 = "img/WOMEN/Dresses/id_00000002"
M3 = "img/MEN/Denim/id_00000003"
M4 = "img/MEN/Denim/id_00000004"


def inshop_tree(tmp_path, image_dir: str = "img") -> tuple[str, dict]:
    """An In-Shop root: 9 good images of 4 items and 9 listed paths that must be rejected."""
    root = tmp_path / "inshop"
    files = {
        f"{D1}/01_1_front.jpg": jpeg(1),
        f"{D1}/01_2_side.jpg": jpeg(2),
        f"{D2}/02_1_front.jpg": jpeg(3),
        f"{D2}/02_2_side.jpg": jpeg(4),
        f"{D2}/02_3_back.jpg": jpeg(5, size=(40, 30), orientation=6),  # EXIF: decoded 30x40
        f"{M3}/03_1_front.jpg": png_rgba(6),  # a PNG under .jpg: decodable, kept as it is
        f"{M3}/03_2_side.jpg": jpeg(7),
        f"{M4}/04_7_ok.jpg": jpeg(8),
        f"{M3}/03_4_full.jpg": jpeg(9)[:200],  # truncated
        f"{M4}/04_1_front.jpg": b"",  # zero bytes
        f"{M4}/04_2_side.jpg": b"this is not an image\n",
        f"{M4}/04_5_big.jpg": jpeg(10, size=(200, 200)),  # above --max-pixels 10000
    }
    files[f"{D1}/01_3_copy.jpg"] = files[f"{D1}/01_1_front.jpg"]  # identical bytes, same item: kept
    for relative, data in files.items():
        put(root, relative.replace("img/", image_dir + "/", 1), data)
    outside = put(tmp_path, "outside.jpg", jpeg(11))
    os.symlink(outside, os.path.join(str(root), image_dir, "MEN/Denim/id_00000004/04_6_link.jpg"))
    partition = [
        f"{D1}/01_1_front.jpg id_00000001 train",
        f"{D1}/01_2_side.jpg id_00000001 train",
        f"{D1}/01_3_copy.jpg id_00000001 train",
        f"{D2}/02_1_front.jpg id_00000002 query",
        f"{D2}/02_2_side.jpg id_00000002 gallery",
        f"{D2}/02_3_back.jpg id_00000002 gallery",
        f"{M3}/03_1_front.jpg id_00000003 gallery",
        f"{M3}/03_2_side.jpg id_00000003 query",
        f"{M3}/03_4_full.jpg id_00000003 query",
        f"{M4}/04_1_front.jpg id_00000004 train",
        f"{M4}/04_2_side.jpg id_00000004 train",
        f"{M4}/04_3_back.jpg id_00000004 train",  # missing
        f"{M4}/04_5_big.jpg id_00000004 train",
        f"{M4}/04_6_link.jpg id_00000004 train",  # symlink escaping the root
        f"{M4}/04_7_ok.jpg id_00000004 train",
        "../outside.jpg id_00000004 train",
        f"{outside} id_00000004 train",  # absolute path escaping the root
        f"{D1}/01_1_front.jpg id_00000001 train",  # listed twice
    ]
    deepfashion_file(root / "Eval" / "list_eval_partition.txt", INSHOP_HEADER, partition)
    boxes = [
        f"{D1}/01_1_front.jpg 1 1 2 3 30 25",
        f"{D1}/01_2_side.jpg 1 2 -5 2 100 20",  # clipped to 0 2 40 20
        f"{D1}/01_3_copy.jpg 1 1 2 3 30 25",
        f"{D2}/02_1_front.jpg 3 1 10 10 10 20",  # degenerate -> null
        f"{D2}/02_3_back.jpg 3 3 1 2 25 35",  # in the EXIF-rotated 30x40 frame
        f"{M3}/03_1_front.jpg 2 1 50 50 60 60",  # outside the image -> degenerate
        f"{M3}/03_2_side.jpg 2 2 0 0 40 30",
        f"{M4}/04_7_ok.jpg 2 1 5 5 15 15",
    ]  # 02_2_side has no box
    deepfashion_file(root / "Anno" / "list_bbox_inshop.txt", INSHOP_BBOX_HEADER, boxes)
    return str(root), {"files": files, "outside": outside}


EXPECTED_INSHOP = {
    # image_id: (item, split, category, bbox, (width, height))
    f"{D1}/01_1_front.jpg": ("id_00000001", "train", "WOMEN/Dresses", [2, 3, 30, 25], (40, 30)),
    f"{D1}/01_2_side.jpg": ("id_00000001", "train", "WOMEN/Dresses", [0, 2, 40, 20], (40, 30)),
    f"{D1}/01_3_copy.jpg": ("id_00000001", "train", "WOMEN/Dresses", [2, 3, 30, 25], (40, 30)),
    f"{D2}/02_1_front.jpg": ("id_00000002", "query", "WOMEN/Dresses", None, (40, 30)),
    f"{D2}/02_2_side.jpg": ("id_00000002", "gallery", "WOMEN/Dresses", None, (40, 30)),
    f"{D2}/02_3_back.jpg": ("id_00000002", "gallery", "WOMEN/Dresses", [1, 2, 25, 35], (30, 40)),
    f"{M3}/03_1_front.jpg": ("id_00000003", "gallery", "MEN/Denim", None, (20, 24)),
    f"{M3}/03_2_side.jpg": ("id_00000003", "query", "MEN/Denim", [0, 0, 40, 30], (40, 30)),
    f"{M4}/04_7_ok.jpg": ("id_00000004", "train", "MEN/Denim", [5, 5, 15, 15], (40, 30)),
}


def expected_inshop_rejects(root: str, image_dir: str, outside: str) -> dict[str, str]:
    """source_path -> the start of the reason."""
    images = f"{root}/{image_dir}"
    m3, m4, d1 = (prefix.replace("img/", "", 1) for prefix in (M3, M4, D1))
    return {
        f"{images}/{m3}/03_4_full.jpg": "cannot decode",
        f"{images}/{m4}/04_1_front.jpg": "empty file",
        f"{images}/{m4}/04_2_side.jpg": "not an image",
        f"{images}/{m4}/04_3_back.jpg": "missing file",
        f"{images}/{m4}/04_5_big.jpg": "too large",
        f"{images}/{m4}/04_6_link.jpg": "outside the root",
        outside: "outside the root",  # listed as ../outside.jpg and as an absolute path
        f"{images}/{d1}/01_1_front.jpg": "duplicate",
    }


def check_inshop(out: str, root: str, tree: dict, image_dir: str = "img") -> dict:
    rows = read_catalog(out)
    assert set(rows) == set(EXPECTED_INSHOP)
    for image_id, (item, split, category, bbox, (width, height)) in EXPECTED_INSHOP.items():
        row = rows[image_id]
        data = tree["files"][image_id]
        assert (row["item_id"], row["split"], row["domain"], row["category"]) == (item, split, "shop", category), image_id
        assert row["bbox"] == bbox, image_id
        assert (row["width"], row["height"]) == (width, height), image_id
        assert row["image"] == data, image_id
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["source_path"] == os.path.join(root, image_id.replace("img/", image_dir + "/", 1))
    rejects = read_rejects(out)
    expected = expected_inshop_rejects(root, image_dir, tree["outside"])
    assert set(rejects) == set(expected), rejects
    for path, reason in expected.items():
        assert rejects[path].startswith(reason), (path, rejects[path])
    snapshot = open_table(storage.resolve(out))
    manifest = {**snapshot.info, "version": snapshot.version}
    assert manifest["input"] == 18 and manifest["rows"] == 9 and manifest["rejected"] == 9
    assert manifest["input"] == manifest["rows"] + manifest["rejected"]
    assert manifest["rows_per_split"] == {"train": 4, "query": 2, "gallery": 3}
    assert manifest["items_per_split"] == {"train": 2, "query": 2, "gallery": 2}
    assert manifest["rows_per_domain"] == {"shop": 9}
    assert manifest["rejects_by_reason"] == {
        "cannot decode": 1, "duplicate": 1, "empty file": 1, "missing file": 1, "not an image": 1, "outside the root": 3, "too large": 1,
    }
    assert manifest["bbox"] == {"kept": 5, "clipped": 1, "degenerate": 2, "none": 1}
    assert manifest["identical_bytes"] == {"within_item": 1, "across_items": 0}
    assert manifest["table"] == "catalog" and manifest["source"]["kind"] == "inshop"
    # One job, one commit: version 0 of a new table, every shard in the job's one run directory,
    # the rejects in the companion table's version 0, which the catalog's commit names.
    assert snapshot.version == 0
    assert manifest["rejects"] == {"table": storage.resolve(out).uri + "_rejects", "version": 0}
    files = [os.path.relpath(path, snapshot.location.path) for path in snapshot.files.column("path").to_pylist()]
    runs = {name.split("/")[0] for name in files}
    assert len(runs) == 1 and runs.pop().startswith("run-") and all(name.split("/")[1].startswith("part-") for name in files), files
    assert sorted(shard["file"] for shard in manifest["shards"]) == sorted(files)
    return manifest


# ------------------------------------------------------------------------------ In-Shop


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_inshop_rows_rejects_and_summary(ray_local, tmp_path, capsys):
    root, tree = inshop_tree(tmp_path)
    out = str(tmp_path / "catalog")
    prepare.main(["inshop", "--root", root, "--out", out, "--max-pixels", "10000", "--min-shards", "2"])
    manifest = check_inshop(out, root, tree)
    printed = capsys.readouterr().out
    assert re.search(r"input = written \+ rejected\s+18 = 9 \+ 9", printed), printed
    assert "52,712 images of 7,982 items: train 25,882 · query 14,218 · gallery 12,612" in printed
    assert "degenerate -> null 2" in printed
    # rows are sorted by item inside every shard, and no item spans two shards
    check_shards(out, manifest)


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_inshop_highres_layout_maps_boxes(ray_local, tmp_path):
    root, tree = inshop_tree(tmp_path, image_dir="img_highres")
    # A 512x256 high-res image shown in img/ as 256x128 centred in 256x256 (offset 64 in y).
    put(root, f"img_highres/{D1.replace('img/', '', 1)}/01_2_side.jpg", jpeg(2, size=(512, 256)))
    bbox_path = os.path.join(root, "Anno", "list_bbox_inshop.txt")
    with open(bbox_path) as handle:
        text = handle.read()
    with open(bbox_path, "w") as handle:
        handle.write(text.replace("1 2 -5 2 100 20", "1 2 64 96 128 160"))
    out = str(tmp_path / "catalog")
    prepare.run("inshop", out, root=root, max_pixels=300_000)
    rows = read_catalog(out)
    # box 64 96 128 160 in the 256 frame: x/0.5, (y-64)/0.5
    assert rows[f"{D1}/01_2_side.jpg"]["bbox"] == [128, 64, 256, 192]
    assert (rows[f"{D1}/01_2_side.jpg"]["width"], rows[f"{D1}/01_2_side.jpg"]["height"]) == (512, 256)
    assert rows[f"{D1}/01_2_side.jpg"]["source_path"] == f"{root}/img_highres/{D1[4:]}/01_2_side.jpg"
    # 40x30 image: scale 6.4, offset y (256-192)/2 = 32 -> (2/6.4, (3-32)/6.4, 30/6.4, (25-32)/6.4)
    assert rows[f"{D1}/01_1_front.jpg"]["bbox"] is None  # entirely above the image
    manifest = open_table(storage.resolve(out)).info
    assert manifest["source"]["images"] == "img_highres"
    assert manifest["input"] == manifest["rows"] + manifest["rejected"] == 18


def test_fit_bbox():
    assert prepare.fit_bbox(None, 10, 10) == (None, "none")
    assert prepare.fit_bbox((1, 2, 5, 6), 10, 10) == ([1, 2, 5, 6], "kept")
    assert prepare.fit_bbox((-3, 2, 50, 6), 10, 10) == ([0, 2, 10, 6], "clipped")
    assert prepare.fit_bbox((5, 5, 5, 9), 10, 10) == (None, "degenerate")
    assert prepare.fit_bbox((8, 5, 2, 9), 10, 10) == (None, "degenerate")  # x2 < x1
    assert prepare.fit_bbox((20, 20, 30, 30), 10, 10) == (None, "degenerate")
    # 512x256 image shown in a 256 frame at scale 0.5, offset (0, 64)
    assert prepare.fit_bbox((0, 64, 256, 192), 512, 256, frame=256) == ([0, 0, 512, 256], "kept")
    assert prepare.fit_bbox((64, 96, 128, 160), 512, 256, frame=256) == ([128, 64, 256, 192], "kept")


# ------------------------------------------------------------------------------ malformed files


def _malformed_inshop(tmp_path, partition: list[str], count: int | None = None, header: str = INSHOP_HEADER, boxes: list[str] | None = None):
    root = tmp_path / "bad"
    deepfashion_file(root / "Eval" / "list_eval_partition.txt", header, partition, count)
    boxes = boxes if boxes is not None else []
    deepfashion_file(root / "Anno" / "list_bbox_inshop.txt", INSHOP_BBOX_HEADER, boxes)
    (root / "img").mkdir(exist_ok=True)
    return str(root)


GOOD = [f"{D1}/01_1_front.jpg id_00000001 train", f"{D1}/01_2_side.jpg id_00000001 query"]


@pytest.mark.parametrize(
    "kwargs, line, expected",
    [
        ({"partition": GOOD, "count": 3}, 1, "the count line says 3 rows but the file has 2"),
        ({"partition": GOOD + [f"{D1}/x.jpg id_00000001"]}, 5, "expected 3 columns (image_name item_id evaluation_status), found 2"),
        ({"partition": GOOD + [f"{D1}/x.jpg id_00000001 test"]}, 5, "unknown evaluation_status 'test': expected train, query or gallery"),
        ({"partition": GOOD, "header": "image_name evaluation_status"}, 2, "expected the header 'image_name item_id evaluation_status'"),
        ({"partition": GOOD, "boxes": [f"{D1}/01_1_front.jpg 1 1 2 3 x 25"]}, 3, "expected an integer in column x_2, found 'x'"),
        ({"partition": GOOD, "boxes": [f"{D1}/01_1_front.jpg 1 1 2 3 25"]}, 3, "expected 7 columns"),
    ],
)
def test_malformed_inshop_files_name_file_and_line(tmp_path, kwargs, line, expected):
    root = _malformed_inshop(tmp_path, **kwargs)
    name = "list_bbox_inshop.txt" if "boxes" in kwargs else "list_eval_partition.txt"
    with pytest.raises(ValueError) as error:
        prepare.list_inshop(root)
    message = str(error.value)
    assert f"{name}:{line}: " in message and expected in message, message
    assert message.startswith(root), message


def test_malformed_count_line_and_empty_file(tmp_path):
    root = _malformed_inshop(tmp_path, GOOD)
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
    with open(path, "w") as handle:
        handle.write("two\nimage_name item_id evaluation_status\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected the number of rows (one integer), found 'two'")):
        prepare.list_inshop(root)
    open(path, "w").close()
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected the number of rows, found an empty file")):
        prepare.list_inshop(root)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        prepare.list_inshop(root)


def test_cli_error_is_one_line_and_exit_2(tmp_path, capsys):
    root = _malformed_inshop(tmp_path, GOOD, count=7)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["inshop", "--root", root, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "list_eval_partition.txt:1: the count line says 7 rows but the file has 2 rows" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ Consumer-to-Shop


C2S_HEADER = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
C2S_BBOX_HEADER = "image_name clothes_type source_type x_1 y_1 x_2 y_2"
B1 = "img/CLOTHING/Blouse/id_00000001"
B2 = "img/CLOTHING/Blouse/id_00000002"
T3 = "img/TOPS/Tee/id_00000003"
T4 = "img/TOPS/Tee/id_00000004"


def consumer2shop_tree(tmp_path) -> tuple[str, dict[str, bytes]]:
    root = tmp_path / "c2s"
    files = {}
    for index, relative in enumerate(
        [f"{B1}/comsumer_01.jpg", f"{B1}/comsumer_02.jpg", f"{B1}/shop_01.jpg", f"{B1}/shop_02.jpg",
         f"{B2}/comsumer_01.jpg", f"{B2}/shop_01.jpg",
         f"{T3}/comsumer_01.jpg", f"{T3}/comsumer_02.jpg", f"{T3}/shop_01.jpg",
         f"{T4}/shop_01.jpg"]
    ):
        files[relative] = jpeg(100 + index)
        put(root, relative, files[relative])
    pairs = [
        f"{B1}/comsumer_01.jpg {B1}/shop_01.jpg id_00000001 train",
        f"{B1}/comsumer_01.jpg {B1}/shop_02.jpg id_00000001 train",
        f"{B1}/comsumer_02.jpg {B1}/shop_01.jpg id_00000001 train",
        f"{B2}/comsumer_01.jpg {B2}/shop_01.jpg id_00000002 val",
        f"{T3}/comsumer_01.jpg {T3}/shop_01.jpg id_00000003 test",
        f"{T3}/comsumer_02.jpg {T3}/shop_01.jpg id_00000003 test",
        f"{T4}/comsumer_01.jpg {T4}/shop_01.jpg id_00000004 test",  # the consumer image is missing
    ]
    deepfashion_file(root / "Eval" / "list_eval_partition.txt", C2S_HEADER, pairs)
    boxes = [
        f"{B1}/comsumer_01.jpg 1 2 1 1 20 20",
        f"{B1}/shop_01.jpg 1 1 0 0 40 30",
        f"{T3}/comsumer_01.jpg 1 2 30 20 80 80",  # clipped to 30 20 40 30
        f"{T3}/shop_01.jpg 1 1 5 5 5 5",  # degenerate
    ]
    deepfashion_file(root / "Anno" / "list_bbox_consumer2shop.txt", C2S_BBOX_HEADER, boxes)
    return str(root), files


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_consumer2shop_rows(ray_local, tmp_path, capsys):
    root, files = consumer2shop_tree(tmp_path)
    out = str(tmp_path / "catalog")
    manifest = prepare.run("consumer2shop", out, root=root)
    rows = read_catalog(out)
    expected = {
        f"{B1}/comsumer_01.jpg": ("id_00000001", "train", "consumer", [1, 1, 20, 20]),
        f"{B1}/comsumer_02.jpg": ("id_00000001", "train", "consumer", None),
        f"{B1}/shop_01.jpg": ("id_00000001", "train", "shop", [0, 0, 40, 30]),
        f"{B1}/shop_02.jpg": ("id_00000001", "train", "shop", None),
        f"{B2}/comsumer_01.jpg": ("id_00000002", "val", "consumer", None),
        f"{B2}/shop_01.jpg": ("id_00000002", "val", "shop", None),
        f"{T3}/comsumer_01.jpg": ("id_00000003", "query", "consumer", [30, 20, 40, 30]),
        f"{T3}/comsumer_02.jpg": ("id_00000003", "query", "consumer", None),
        f"{T3}/shop_01.jpg": ("id_00000003", "gallery", "shop", None),
        f"{T4}/shop_01.jpg": ("id_00000004", "gallery", "shop", None),
    }
    assert set(rows) == set(expected)
    for image_id, (item, split, domain, bbox) in expected.items():
        row = rows[image_id]
        assert (row["item_id"], row["split"], row["domain"], row["bbox"]) == (item, split, domain, bbox), image_id
        assert row["category"] == ("CLOTHING/Blouse" if "Blouse" in image_id else "TOPS/Tee")
        assert row["image"] == files[image_id] and row["sha256"] == hashlib.sha256(files[image_id]).hexdigest()
        assert (row["width"], row["height"]) == (40, 30)
    assert read_rejects(out) == {f"{root}/{T4}/comsumer_01.jpg": "missing file"}
    assert manifest["input"] == 11 and manifest["rows"] == 10 and manifest["rejected"] == 1
    assert manifest["rows_per_split"] == {"train": 4, "query": 2, "gallery": 2, "val": 2}
    assert manifest["rows_per_domain"] == {"shop": 5, "consumer": 5}
    assert manifest["items_per_split"] == {"train": 1, "query": 1, "gallery": 2, "val": 1}
    assert manifest["bbox"] == {"kept": 2, "clipped": 1, "degenerate": 1, "none": 6}
    assert manifest["stats"]["pairs"] == 7
    assert "11 = 10 + 1" in capsys.readouterr().out


def test_consumer2shop_val_choices_and_conflicts(tmp_path):
    root, _ = consumer2shop_tree(tmp_path)

    def splits(val_as):
        listing = prepare.list_consumer2shop(root, val_as=val_as)
        return listing, {e.image_id: e.split for e in listing.entries if e.item_id == "id_00000002"}

    listing, val = splits("val")
    assert val == {f"{B2}/comsumer_01.jpg": "val", f"{B2}/shop_01.jpg": "val"} and listing.input == 11
    listing, val = splits("skip")
    assert val == {} and listing.input == 9 and listing.skipped == 2
    _, val = splits("query")
    assert val == {f"{B2}/comsumer_01.jpg": "query", f"{B2}/shop_01.jpg": "gallery"}
    _, val = splits("gallery")
    assert val == {f"{B2}/comsumer_01.jpg": "val", f"{B2}/shop_01.jpg": "gallery"}
    with pytest.raises(ValueError, match="--val-as 'bogus'"):
        prepare.list_consumer2shop(root, val_as="bogus")
    # A pair that names an image again under another item: the first wins, the conflict is reported.
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
    with open(path) as handle:
        lines = handle.read().splitlines()
    lines.append(f"{B1}/comsumer_01.jpg {T3}/shop_01.jpg id_00000003 test")
    lines[0] = str(len(lines) - 2)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    listing = prepare.list_consumer2shop(root)
    assert listing.stats["annotation_conflicts"] == 1
    assert {e.image_id: e.item_id for e in listing.entries}[f"{B1}/comsumer_01.jpg"] == "id_00000001"
    assert "list_eval_partition.txt:10" in listing.notes[0] and "list_eval_partition.txt:3" in listing.notes[0]


def test_consumer2shop_malformed(tmp_path):
    root, _ = consumer2shop_tree(tmp_path)
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
    deepfashion_file(path, C2S_HEADER, [f"{B1}/comsumer_01.jpg {B1}/shop_01.jpg id_00000001 query"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: unknown evaluation_status 'query': expected train, val or test")):
        prepare.list_consumer2shop(root)
    deepfashion_file(path, C2S_HEADER, [f"{B1}/comsumer_01.jpg {B1}/shop_01.jpg id_00000001 train"])
    bbox_path = os.path.join(root, "Anno", "list_bbox_consumer2shop.txt")
    deepfashion_file(bbox_path, C2S_BBOX_HEADER, [f"{B1}/comsumer_01.jpg 1 3 1 1 20 20"])
    with pytest.raises(ValueError, match=re.escape(f"{bbox_path}:3: unknown source_type '3': expected one of 1, 2")):
        prepare.list_consumer2shop(root)
    assert prepare.list_consumer2shop(root, bbox=False).input == 2


# ------------------------------------------------------------------------------ manifest CSV


def manifest_tree(tmp_path) -> tuple[str, dict[str, bytes]]:
    base = tmp_path / "shop"
    files = {f"images/sku{item}/{view}.jpg": jpeg(200 + item * 10 + view) for item in range(1, 6) for view in range(3)}
    files["images/broken.jpg"] = jpeg(299)[:150]
    for relative, data in files.items():
        put(base, relative, data)
    put(tmp_path, "elsewhere.jpg", jpeg(298))
    return str(base), files


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_manifest_with_all_columns(ray_local, tmp_path):
    base, files = manifest_tree(tmp_path)
    csv_path = os.path.join(base, "catalog.csv")
    lines = [
        "path,item_id,split,domain,category,x1,y1,x2,y2,notes",
        "images/sku1/0.jpg,sku1,train,shop,tops,1,2,30,20,hello",
        f"{base}/images/sku1/1.jpg,sku1,train,consumer,tops,,,,,",  # absolute, inside the root
        "images/sku2/0.jpg,sku2,gallery,shop,dresses,0,0,99.0,99.0,",  # floats, clipped
        "images/sku2/1.jpg,sku2,query,consumer,dresses,5,5,5,9,",  # degenerate
        "images/sku3/0.jpg,sku3,test,shop,,,,,,",  # test: by domain
        "images/sku3/1.jpg,sku3,test,consumer,,,,,,",
        "images/sku4/0.jpg,sku4,val,shop,,,,,,",
        "images/broken.jpg,sku5,train,shop,,,,,,",
        "images/nothere.jpg,sku5,train,shop,,,,,,",
        "../elsewhere.jpg,sku5,train,shop,,,,,,",
        "images/sku1/0.jpg,sku1,train,shop,tops,,,,,",  # the same path again
        "images/./sku5/0.jpg,sku5,train,shop,,,,,,",
        "images/sku4/1.jpg,,query,consumer,,,,,,",  # unlabelled photos to match: no item
        "images/sku4/2.jpg,,query,consumer,dresses,,,,,",
    ]
    with open(csv_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    out = str(tmp_path / "catalog")
    manifest = prepare.run("manifest", out, manifest=csv_path)
    rows = read_catalog(out)
    expected = {
        "images/sku1/0.jpg": ("sku1", "train", "shop", "tops", [1, 2, 30, 20]),
        "images/sku1/1.jpg": ("sku1", "train", "consumer", "tops", None),
        "images/sku2/0.jpg": ("sku2", "gallery", "shop", "dresses", [0, 0, 40, 30]),
        "images/sku2/1.jpg": ("sku2", "query", "consumer", "dresses", None),
        "images/sku3/0.jpg": ("sku3", "gallery", "shop", "", None),
        "images/sku3/1.jpg": ("sku3", "query", "consumer", "", None),
        "images/sku4/0.jpg": ("sku4", "val", "shop", "", None),
        "images/sku5/0.jpg": ("sku5", "train", "shop", "", None),
        "images/sku4/1.jpg": (None, "query", "consumer", "", None),
        "images/sku4/2.jpg": (None, "query", "consumer", "dresses", None),
    }
    assert set(rows) == set(expected)
    for image_id, (item, split, domain, category, bbox) in expected.items():
        row = rows[image_id]
        assert (row["item_id"], row["split"], row["domain"], row["category"], row["bbox"]) == (item, split, domain, category, bbox), image_id
        assert row["image"] == files[image_id] and row["source_path"] == os.path.join(base, image_id)
    rejects = read_rejects(out)
    assert rejects[f"{base}/images/broken.jpg"].startswith("cannot decode")
    assert rejects[f"{base}/images/nothere.jpg"] == "missing file"
    assert rejects[str(tmp_path / "elsewhere.jpg")].startswith("outside the root")
    assert rejects[f"{base}/images/sku1/0.jpg"].startswith("duplicate: images/sku1/0.jpg listed again at")
    assert manifest["input"] == 14 == manifest["rows"] + manifest["rejected"] and manifest["rejected"] == 4
    assert manifest["unlabelled"] == 2 and manifest["items"] == 5 and manifest["items_per_split"]["query"] == 2  # sku2, sku3
    assert any("2 unlabelled query rows" in note for note in manifest["notes"])
    assert manifest["bbox"] == {"kept": 1, "clipped": 1, "degenerate": 1, "none": 7}
    assert any("columns ignored: notes" in note for note in manifest["notes"])
    assert manifest["source"] == {"kind": "manifest", "manifest": csv_path, "root": base, "seed": 0, "test_fraction": 0.2}


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_incremental_prepare_merges_and_writes_only_what_changed(ray_local, tmp_path, capsys):
    base = tmp_path / "shop"
    files = {f"images/sku{item}/{view}.jpg": jpeg(400 + item * 10 + view) for item in range(1, 7) for view in range(3)}
    for relative, data in files.items():
        put(base, relative, data)
    rows = {relative: [relative, relative.split("/")[1], "train", "shop", "tops"] for relative in files}

    def write_manifest() -> str:
        path = os.path.join(base, "catalog.csv")
        with open(path, "w") as handle:
            handle.write("path,item_id,split,domain,category\n" + "".join(",".join(row) + "\n" for row in rows.values()))
        return path

    out = str(tmp_path / "catalog")
    first = prepare.run("manifest", out, manifest=write_manifest(), min_shards=3)
    assert "incremental" not in first
    model, features = str(tmp_path / "model"), str(tmp_path / "features")
    torch.manual_seed(0)
    config = ModelConfig(backbone="tf_efficientnetv2_b0", layers=(3, 4), global_dim=32, token_dim=16, num_tokens=4, heads=2)
    write_artifact(model, pack_artifact(MGAModel(config), {"image_size": 64}))
    model_id = embed.run(model, out, features, batch_size=8, actors=1, cpus_per_actor=0.5)["model_id"]
    before = open_table(storage.resolve(out))
    put(base, "images/sku1/0.jpg", jpeg(999))  # new bytes
    rows["images/sku2/0.jpg"][4] = "dresses"  # new metadata, same bytes
    del rows["images/sku3/1.jpg"]  # no longer listed
    put(base, "images/sku4/2.jpg", jpeg(444)[:100])  # now undecodable: rejected, removed
    put(base, "images/sku7/0.jpg", jpeg(777))  # a new image
    rows["images/sku7/0.jpg"] = ["images/sku7/0.jpg", "sku7", "train", "shop", "tops"]
    capsys.readouterr()
    merged = prepare.run("manifest", out, manifest=write_manifest(), min_shards=3, incremental=True)
    printed = capsys.readouterr().out

    after = open_table(storage.resolve(out))
    assert merged["incremental"]["new"] == 1 and merged["incremental"]["changed"] == 2 and merged["incremental"]["deleted"] == 2
    assert merged["incremental"]["unchanged"] == 18 - 4 and merged["rows"] == after.rows == 17
    assert "new 1 · changed 2 · unchanged 14 · deleted 2" in printed
    catalog = read_catalog(out)
    assert set(catalog) == set(rows) - {"images/sku4/2.jpg"}
    assert catalog["images/sku1/0.jpg"]["image"] == jpeg(999) and catalog["images/sku2/0.jpg"]["category"] == "dresses"
    assert read_rejects(out)[os.path.join(base, "images/sku4/2.jpg")].startswith("cannot decode")
    # Stored files without a stale row are untouched; the ones with one are rewritten without it.
    old_files, new_files = set(before.files.column("path").to_pylist()), set(after.files.column("path").to_pylist())
    stale_ids = {"images/sku1/0.jpg", "images/sku2/0.jpg", "images/sku3/1.jpg", "images/sku4/2.jpg"}
    holders = {path for path in old_files if stale_ids & set(pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist())}
    assert old_files - new_files == holders and len(holders) == merged["incremental"]["files_rewritten"]
    # The new and changed rows sit in files of their own: nothing else's image bytes come along.
    added = new_files - old_files
    embedded = {path for path in added if set(pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()) <= {"images/sku1/0.jpg", "images/sku2/0.jpg", "images/sku7/0.jpg"}}
    assert sum(pq.read_metadata(path).num_rows for path in embedded) == 3
    unchanged_rows = sum(pq.read_metadata(path).num_rows for path in added - embedded)
    assert merged["incremental"]["rows_written"] == 3 + unchanged_rows
    # The incremental embed reads the images of those files alone, and merges the features.
    assert set(plan_incremental(open_table(storage.resolve(features)), after, model_id).embed_files) == embedded
    merged_features = embed.run(model, out, features, incremental=True, batch_size=8, actors=1, cpus_per_actor=0.5)
    assert {key: merged_features["incremental"][key] for key in ("new", "changed", "unchanged", "deleted")} == {"new": 1, "changed": 2, "unchanged": 14, "deleted": 2}
    stored_ids = read_table(open_table(storage.resolve(features)), ["image_id"]).column("image_id").to_pylist()
    assert sorted(stored_ids) == sorted(catalog) and merged_features["embedded"] == 3
    # Nothing changed: no new version.
    again = prepare.run("manifest", out, manifest=write_manifest(), min_shards=3, incremental=True)
    assert again["version"] == after.version and again["incremental"]["unchanged"] == 17 and again["incremental"]["rows_written"] == 0


def test_manifest_without_split_is_seeded_by_item(tmp_path):
    base, _ = manifest_tree(tmp_path)
    csv_path = os.path.join(base, "catalog.csv")
    items = [f"sku{i}" for i in range(1, 6)]
    with open(csv_path, "w") as handle:
        handle.write("path,item_id\n")
        for item in items:
            for view in (2, 0, 1):  # not in path order
                handle.write(f"images/{item}/{view}.jpg,{item}\n")
    listing = prepare.list_manifest(csv_path, seed=3, test_fraction=0.5)
    test_items = {item for item in items if prepare.is_test_item(3, item, 0.5)}
    assert 0 < len(test_items) < len(items)  # this seed draws some of each
    for entry in listing.entries:
        assert entry.domain == "shop"
        if entry.item_id in test_items:
            assert entry.split == ("query" if entry.image_id.endswith("/0.jpg") else "gallery"), entry
        else:
            assert entry.split == "train"
    again = prepare.list_manifest(csv_path, seed=3, test_fraction=0.5)
    assert [(e.image_id, e.split) for e in again.entries] == [(e.image_id, e.split) for e in listing.entries]
    assert {e.split for e in prepare.list_manifest(csv_path, test_fraction=0.0).entries} == {"train"}
    assert {e.split for e in prepare.list_manifest(csv_path, test_fraction=1.0).entries} == {"query", "gallery"}
    # with a domain column: shop -> gallery, consumer -> query
    with open(csv_path, "w") as handle:
        handle.write("path,item_id,domain\nimages/sku1/0.jpg,sku1,consumer\nimages/sku1/1.jpg,sku1,shop\nimages/sku1/2.jpg,sku1,shop\n")
    listing = prepare.list_manifest(csv_path, test_fraction=1.0)
    assert [(e.image_id, e.split) for e in listing.entries] == [
        ("images/sku1/0.jpg", "query"), ("images/sku1/1.jpg", "gallery"), ("images/sku1/2.jpg", "gallery")
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("path,sku\nimages/sku1/0.jpg,sku1\n", ":1: missing column item_id"),
        ("path,item_id,split\nimages/sku1/0.jpg,sku1,train\nimages/sku1/1.jpg,sku1,holdout\n", ":3: unknown split 'holdout'"),
        ("path,item_id,domain\nimages/sku1/0.jpg,sku1,street\n", ":2: unknown domain 'street'"),
        ("path,item_id,x1,y1,x2,y2\nimages/sku1/0.jpg,sku1,1,2,,4\n", ":2: a box needs all of x1,y1,x2,y2 or none; x2 empty"),
        ("path,item_id,x1,y1,x2,y2\nimages/sku1/0.jpg,sku1,1,2,a,4\n", ":2: expected a number in column x2, found 'a'"),
        ("path,item_id,x1,y1\nimages/sku1/0.jpg,sku1,1,2\n", ":1: box columns need all of x1,y1,x2,y2"),
        ("path,item_id\nimages/sku1/0.jpg,\n", ":2: empty item_id: only split=query rows (unlabelled photos to match) may leave it empty"),
        ("path,item_id,split\nimages/sku1/0.jpg,,query\nimages/sku1/1.jpg, ,gallery\n", ":3: empty item_id: only split=query rows"),
        ("path,item_id\nimages/sku1/0.jpg,sku1,extra\n", ":2: expected 2 columns, found more"),
    ],
)
def test_manifest_malformed(tmp_path, text, expected):
    base, _ = manifest_tree(tmp_path)
    csv_path = os.path.join(base, "catalog.csv")
    with open(csv_path, "w") as handle:
        handle.write(text)
    with pytest.raises(ValueError) as error:
        prepare.list_manifest(csv_path)
    assert str(error.value).startswith(csv_path + expected), str(error.value)


# ------------------------------------------------------------------------------ shards


def check_shards(out: str, manifest: dict, target_bytes: int | None = None) -> list[list[str]]:
    table = storage.resolve(out)
    item_files: dict[str, str] = {}
    per_file = []
    for path in sorted(open_table(table).files.column("path").to_pylist()):
        rows = pq.read_table(path, filesystem=table.fs, columns=["item_id", "image_id", "image", "split"]).to_pylist()
        keys = [(row["item_id"], row["image_id"]) for row in rows]
        assert keys == sorted(keys), f"{path} is not sorted by item"
        groups = {"test" if row["split"] in ("query", "gallery") else row["split"] for row in rows}
        assert len(groups) == 1, f"{path} mixes {sorted(groups)} items"
        for item in {row["item_id"] for row in rows}:
            assert item not in item_files, f"{item} is split across {item_files.get(item)} and {path}"
            item_files[item] = path
        if target_bytes is not None and len({row["item_id"] for row in rows}) > 1:
            assert sum(len(row["image"]) for row in rows) <= target_bytes, path
        per_file.append((groups.pop(), sorted({row["item_id"] for row in rows})))
    # the files, in name order, hold the items in order: by split group (train, test, val), then item
    flattened = [(group, item) for group, items in per_file for item in items]
    assert flattened == sorted(flattened)
    per_file = [items for _, items in per_file]
    assert sum(shard["rows"] for shard in manifest["shards"]) == manifest["rows"]
    return per_file


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_tiny_shards_never_split_an_item(ray_local, tmp_path):
    base = tmp_path / "many"
    base.mkdir()
    with open(base / "list.csv", "w") as handle:
        handle.write("path,item_id,split\n")
        for item in range(12):
            for view in range(1 + item % 4):
                relative = f"i{item:02d}/{view}.jpg"
                data = jpeg(1000 + item * 10 + view, size=(48, 48), noise=True)
                put(base, relative, data)
                handle.write(f"{relative},item{item:02d},train\n")
    shard_mb = 16_000 / 2**20  # about two or three items per shard
    out = str(tmp_path / "catalog")
    manifest = prepare.run("manifest", out, manifest=str(base / "list.csv"), shard_mb=shard_mb, min_shards=1)
    per_file = check_shards(out, manifest, target_bytes=16_000)
    assert len(per_file) >= 4, per_file
    assert manifest["rows"] == sum(1 + item % 4 for item in range(12)) and manifest["rejected"] == 0
    assert open_table(storage.resolve(out)).files.num_rows == len(per_file) == len(manifest["shards"])


def test_plan_tasks_balances_whole_items():
    entries = [
        prepare.Entry(image_id=f"{item}/{view}", source="", item_id=f"item{item:02d}", split="train", domain="shop", category="", size=1000)
        for item in range(10) for view in range(item % 3 + 1)
    ]
    tasks = prepare.plan_tasks(entries, target_bytes=10**9, min_tasks=4)
    assert 4 <= len(tasks) <= 5
    items = [[e.item_id for e in task] for task in tasks]
    assert [i for task in items for i in task] == sorted(e.item_id for e in entries)
    assert all(len(set(task) & set(other)) == 0 for n, task in enumerate(items) for other in items[n + 1:])
    # the byte target forces more tasks than min_tasks
    assert len(prepare.plan_tasks(entries, target_bytes=2_500, min_tasks=1)) >= 8
    # Tasks (so files) never mix train, test (query + gallery) and val items; an item that
    # has images in two of them stays whole, in a "mixed" task of its own kind.
    splits = {0: ["train"], 1: ["query", "gallery"], 2: ["val"], 3: ["train", "gallery"]}
    mixed = [
        prepare.Entry(image_id=f"{item}/{view}", source="", item_id=f"item{item:02d}", split=splits[item % 4][view % len(splits[item % 4])], domain="shop", category="", size=1000)
        for item in range(12) for view in range(3)
    ]
    tasks = prepare.plan_tasks(mixed, target_bytes=10**9, min_tasks=1)
    kinds = [{"train" if e.split == "train" else "val" if e.split == "val" else "test" for e in task} for task in tasks]
    assert sorted(map(sorted, kinds)) == [["test"], ["test", "train"], ["train"], ["val"]]
    items = [{e.item_id for e in task} for task in tasks]
    assert sum(len(task) for task in items) == 12 and len(set().union(*items)) == 12


# ------------------------------------------------------------------------------ S3


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(RAY_TIMEOUT)
def test_s3_round_trip(ray_local, s3_env, tmp_path):
    import boto3

    root, tree = inshop_tree(tmp_path)
    out = f"s3://{s3_env['bucket']}/catalog"
    prepare.main(["inshop", "--root", root, "--out", out, "--max-pixels", "10000", "--shard-mb", "0.001"])
    manifest = check_inshop(out, root, tree)
    # A reader outside our code (delta-rs, endpoint from storage_options) sees the same commit.
    from deltalake import DeltaTable

    from pipelines.tables import storage_options

    outside = DeltaTable(out, storage_options=storage_options(storage.resolve(out)))
    assert outside.version() == manifest["version"] == 0
    assert outside.history(1)[0]["mga"] == {key: value for key, value in manifest.items() if key != "version"}
    assert sorted(outside.to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()) == sorted(EXPECTED_INSHOP)
    per_file = check_shards(out, manifest)
    assert len(per_file) == 4  # 4 items, one per shard at this size

    # A manifest CSV in the bucket naming images in the bucket, one of them missing.
    client = boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1")
    bucket = s3_env["bucket"]
    images = {f"photos/a/{n}.jpg": jpeg(500 + n) for n in range(3)}
    for key, data in images.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    csv_text = (
        "path,item_id,split,domain\n"
        "a/0.jpg,A,query,consumer\n"  # relative to the CSV's prefix
        f"s3://{bucket}/photos/a/1.jpg,A,gallery,shop\n"
        "a/2.jpg,A,gallery,shop\n"
        "a/9.jpg,A,gallery,shop\n"
        "../x.jpg,A,gallery,shop\n"
    )
    client.put_object(Bucket=bucket, Key="photos/list.csv", Body=csv_text.encode())
    out2 = f"s3://{bucket}/shop-catalog"
    result = prepare.run("manifest", out2, manifest=f"s3://{bucket}/photos/list.csv")
    rows = read_catalog(out2)
    assert set(rows) == {"a/0.jpg", f"s3://{bucket}/photos/a/1.jpg", "a/2.jpg"}
    assert rows["a/0.jpg"]["image"] == images["photos/a/0.jpg"] and rows["a/0.jpg"]["split"] == "query"
    assert rows["a/0.jpg"]["source_path"] == f"s3://{bucket}/photos/a/0.jpg"
    rejects = read_rejects(out2)
    assert rejects[f"s3://{bucket}/photos/a/9.jpg"] == "missing file"
    assert rejects[f"s3://{bucket}/x.jpg"].startswith("outside the root")
    assert result["input"] == 5 == result["rows"] + result["rejected"]


def _keys_table(uri: str, rows: list[dict], files: int) -> None:
    """A table of key rows (image_id and merge.CHANGE_KEY, and model_id where given) in `files` files."""
    with TableWriter(storage.resolve(uri)) as writer:
        table = pa.Table.from_pylist(rows)
        for number in range(files):
            storage.write_parquet(writer.file(f"part-{number}.parquet"), table.slice(number * -(-len(rows) // files), -(-len(rows) // files)))
        writer.commit(table.schema, {"table": "keys"})


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_the_merge_plan_is_the_same_in_one_bucket_or_many(ray_local, tmp_path, monkeypatch):
    """embed --incremental's plan joins the catalog's and the stored keys a hash bucket at a time
    in Ray tasks (no node holds them all): one bucket or thirteen, the same rows to embed and drop."""
    def row(number: int, **changes) -> dict:
        return {"image_id": f"img-{number:02d}", "sha256": f"s{number}", "item_id": None if number == 11 else f"item-{number // 3}",
                "split": "gallery", "domain": "shop", "category": "top", **changes}

    # The catalog: img-05 new, img-03 re-hashed, img-07 relabelled; img-30 and img-31 gone from it.
    catalog = [row(n, **({"sha256": "new"} if n == 3 else {"item_id": "other"} if n == 7 else {})) for n in range(30)]
    # The store: img-09 from another model (to embed again), img-11 with a null item (unchanged).
    stored = [row(n, model_id="old" if n == 9 else "m") for n in [*range(30), 30, 31] if n != 5]
    _keys_table(str(tmp_path / "catalog"), catalog, 3)
    _keys_table(str(tmp_path / "features"), stored, 4)
    features, catalog_table = open_table(storage.resolve(str(tmp_path / "features"))), open_table(storage.resolve(str(tmp_path / "catalog")))
    holder = {image_id: path for path in features.files.column("path").to_pylist() for image_id in pq.read_table(path).column("image_id").to_pylist()}
    plans = []
    for join_rows in (merge.JOIN_ROWS, 5):
        monkeypatch.setattr(merge, "JOIN_ROWS", join_rows)
        plans.append(plan_incremental(features, catalog_table, "m"))
    for plan in plans:
        assert plan.counts == {"new": 1, "changed": 3, "unchanged": 26, "deleted": 2}
        assert sorted(plan.embed_ids.to_pylist()) == ["img-03", "img-05", "img-07", "img-09"]
        stale = ["img-03", "img-07", "img-09", "img-30", "img-31"]
        assert plan.rewrite == {path: sorted(i for i in stale if holder[i] == path) for path in {holder[i] for i in stale}}
        assert plan.embed_files == [path for path in catalog_table.files.column("path").to_pylist() if path.endswith("part-0.parquet")]  # img-00..09


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_the_exactly_once_check_is_the_same_in_one_bucket_or_many(ray_local, tmp_path, monkeypatch):
    """Every embed checks its written files against the images it was asked for (the whole
    catalog's files, or the plan's ids) a hash bucket at a time in Ray tasks: the same count,
    the same problems found, one bucket or many."""
    ids = [f"img-{number:02d}" for number in range(20)]
    _keys_table(str(tmp_path / "catalog"), [{"image_id": image_id} for image_id in ids], 3)
    catalog = open_table(storage.resolve(str(tmp_path / "catalog")))
    written = storage.resolve(str(tmp_path / "written"))

    def files(name: str, *parts: list[str]) -> list[str]:
        os.makedirs(written.path, exist_ok=True)
        paths = [os.path.join(written.path, f"{name}-{number}.parquet") for number in range(len(parts))]
        for path, part in zip(paths, parts):
            pq.write_table(pa.table({"image_id": pa.array(part, pa.string())}), path)
        return paths

    good = files("good", ids[:9], ids[9:18])
    # img-03 written twice, img-18 written and rejected, img-19 lost, img-99 never asked for.
    bad = files("bad", ids[:10], [ids[3], *ids[10:19], "img-99"])
    for join_rows in (merge.JOIN_ROWS, 5):
        monkeypatch.setattr(merge, "JOIN_ROWS", join_rows)
        for expected in (catalog, pa.array(ids)):
            assert merge.check_exactly_once(written, good, pa.array(ids[18:]), expected) == 18
            with pytest.raises(RuntimeError, match=r"\(1 duplicate rows; 1 images both written and rejected; 1 images missing, 1 unexpected\); nothing was committed"):
                merge.check_exactly_once(written, bad, pa.array([ids[18]]), expected)
