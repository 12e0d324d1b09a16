"""The synthetic catalog: deterministic, split by item, fine-grained by construction."""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.synthetic import DETAIL_OPTIONS, MAX_ITEMS_PER_GROUP, PlannedImage, SynthSpec, item_details, plan_catalog, render_image
from pipelines.synthetic.drawing import _garment, _ViewParams

REPO = Path(__file__).resolve().parents[1]
SMALL = SynthSpec(seed=3, groups=4, items_per_group=3, train_views=3, gallery_views=2, query_views=2, image_size=64)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def _digests(spec: SynthSpec, planned: list[PlannedImage]) -> list[str]:
    return [hashlib.sha256(render_image(spec, p)[0]).hexdigest() for p in planned]


def test_same_spec_gives_identical_bytes_in_any_order_and_process():
    planned = plan_catalog(SMALL)
    forward = _digests(SMALL, planned)
    backward = _digests(SynthSpec(**vars(SMALL)), planned[::-1])[::-1]
    assert forward == backward
    # A fresh interpreter has empty caches, so each image depends on nothing but (spec,
    # planned). Drawing needs neither torch nor Ray.
    script = (
        "import hashlib, sys\n"
        "from pipelines import synthetic\n"
        f"spec = synthetic.SynthSpec(**{vars(SMALL)!r})\n"
        "for p in synthetic.plan_catalog(spec)[::5]:\n"
        "    print(hashlib.sha256(synthetic.render_image(spec, p)[0]).hexdigest())\n"
        "assert not {'torch', 'ray'} & set(sys.modules), 'synthetic imported torch or ray'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == forward[::5]


def test_different_seed_gives_different_images():
    other = SynthSpec(**{**vars(SMALL), "seed": 4})
    planned = plan_catalog(SMALL)[:6]
    assert all(a != b for a, b in zip(_digests(SMALL, planned), _digests(other, planned)))


def test_plan_is_deterministic_and_image_ids_unique():
    planned = plan_catalog(SMALL)
    assert planned == plan_catalog(SynthSpec(**vars(SMALL)))
    assert len({p.image_id for p in planned}) == len(planned)


@pytest.mark.parametrize("query_domain", ["consumer", "shop"])
def test_splits_are_disjoint_by_item_and_group(query_domain):
    spec = SynthSpec(seed=1, groups=10, items_per_group=3, test_fraction=0.3, query_domain=query_domain)
    planned = plan_catalog(spec)
    train = [p for p in planned if p.split == "train"]
    test = [p for p in planned if p.split in ("query", "gallery")]
    assert {p.split for p in planned} == {"train", "query", "gallery"}
    assert not {p.item_id for p in train} & {p.item_id for p in test}
    assert not {p.group_id for p in train} & {p.group_id for p in test}
    assert len({p.group_id for p in test}) == 3
    # Every test item is findable: it has both queries and gallery images.
    for item in {p.item_id for p in test}:
        assert {p.split for p in test if p.item_id == item} == {"query", "gallery"}
    # A group is one silhouette family.
    for group in {p.group_id for p in planned}:
        assert len({p.category for p in planned if p.group_id == group}) == 1


@pytest.mark.parametrize("query_domain", ["consumer", "shop"])
def test_counts_per_split_and_domain_match_the_spec(query_domain):
    spec = SynthSpec(
        groups=6, items_per_group=4, train_views=5, gallery_views=2, query_views=3, query_domain=query_domain
    )
    planned = plan_catalog(spec)
    items_per_side = 3 * 4
    counts = Counter((p.split, p.domain) for p in planned)
    assert counts == {
        ("train", "shop"): items_per_side * 3,
        ("train", "consumer"): items_per_side * 2,
        ("gallery", "shop"): items_per_side * 2,
        ("query", query_domain): items_per_side * 3,
    }
    for item in {p.item_id for p in planned if p.split == "query"}:
        gallery_views = {p.view_index for p in planned if p.item_id == item and p.split == "gallery"}
        query_views = {p.view_index for p in planned if p.item_id == item and p.split == "query"}
        assert len(gallery_views) == 2 and len(query_views) == 3
        if query_domain == "shop":  # extra shop views, not the gallery's pictures again
            assert not gallery_views & query_views


def test_jpeg_size_and_bbox():
    spec = SynthSpec(seed=5, groups=4, items_per_group=2, train_views=4, image_size=96)
    for planned in plan_catalog(spec):
        data, bbox = render_image(spec, planned)
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 96)
        x1, y1, x2, y2 = bbox
        assert all(isinstance(v, int) for v in bbox)
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        assert (x2 - x1) * (y2 - y1) >= 0.12 * 96 * 96, planned.image_id
        if planned.domain == "shop":  # on a plain background the garment can be found back
            pixels = _decode(data)
            garment = np.abs(pixels - pixels[0, 0]).max(axis=2) > 40
            rows, cols = np.flatnonzero(garment.any(axis=1)), np.flatnonzero(garment.any(axis=0))
            found = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert np.abs(np.array(found) - bbox).max() <= 2, (planned.image_id, found, bbox)


def _border(pixels: np.ndarray, width: int = 3) -> np.ndarray:
    edges = (pixels[:width], pixels[-width:], pixels[:, :width], pixels[:, -width:])
    return np.concatenate([edge.reshape(-1, 3) for edge in edges])


def test_shop_views_are_plain_and_consumer_views_cluttered():
    spec = SynthSpec(seed=2, groups=4, items_per_group=2, train_views=4, image_size=64)
    border_std = {"shop": [], "consumer": []}
    for planned in plan_catalog(spec):
        border = _border(_decode(render_image(spec, planned)[0]))
        border_std[planned.domain].append(border.std(axis=0).mean())
        if planned.domain == "shop":
            assert border.mean() > 200
    assert max(border_std["shop"]) < 8 < min(border_std["consumer"])


def test_items_of_a_group_differ_in_at_least_two_details():
    spec = SynthSpec(seed=7, groups=3, items_per_group=MAX_ITEMS_PER_GROUP)
    for group in range(spec.groups):
        details = [item_details(spec, group * spec.items_per_group + i) for i in range(spec.items_per_group)]
        for d in details:
            assert set(d) == set(DETAIL_OPTIONS) and all(d[slot] in DETAIL_OPTIONS[slot] for slot in d)
        for a, b in itertools.combinations(details, 2):
            assert sum(a[slot] != b[slot] for slot in DETAIL_OPTIONS) >= 2
    with pytest.raises(ValueError, match="item_index"):
        item_details(spec, spec.groups * spec.items_per_group)


# Upright, facing the camera, evenly lit, print unshifted.
CANONICAL = _ViewParams(1.0, 1.0, 0.0, (0.0, 0.0), False, 1.0, 1.0, (1.0, 1.0, 1.0), 0.0, (0.0, 0.0), 0.0, 0.0)


def _changed_share(spec: SynthSpec, a: int, b: int) -> float:
    """Share of the two items' garment pixels that differ visibly in the canonical pose."""
    layers = [np.asarray(_garment(spec, i, CANONICAL), np.float32) for i in (a, b)]
    colours = [rgba[..., :3] * rgba[..., 3:] / 255 for rgba in layers]
    garment = (layers[0][..., 3] > 127) | (layers[1][..., 3] > 127)
    changed = np.abs(colours[0] - colours[1]).max(axis=2) > 24
    return float((changed & garment).sum() / garment.sum())


def test_canonical_garments_of_a_group_differ_only_locally():
    spec = SynthSpec(seed=0, groups=8, items_per_group=3)
    within = [_changed_share(spec, 3 * g, 3 * g + i) for g in range(spec.groups) for i in (1, 2)]
    across = [_changed_share(spec, 3 * g, 3 * ((g + 1) % spec.groups)) for g in range(spec.groups)]
    assert min(within) > 0.01  # never identical: the details show
    assert max(within) < 0.3  # but they are local: most of the garment is the same
    assert min(across) > 2 * max(within)


def test_items_of_a_group_look_globally_alike_in_shop_views():
    spec = SynthSpec(seed=0, groups=12, items_per_group=2)
    shop_front = {}
    for planned in plan_catalog(spec):
        if planned.domain == "shop" and planned.view_index == 0:
            shop_front[planned.item_index] = Image.open(io.BytesIO(render_image(spec, planned)[0])).convert("RGB")

    def mean_abs_difference(a: int, b: int, pool: int = 1) -> float:
        first, second = (np.asarray(shop_front[i].reduce(pool), np.float32) for i in (a, b))
        return float(np.abs(first - second).mean())

    groups = range(spec.groups)
    within = [mean_abs_difference(2 * g, 2 * g + 1) for g in groups]
    across = [mean_abs_difference(2 * g, 2 * ((g + 1) % spec.groups)) for g in groups]
    assert min(within) > 1.0  # not the same picture
    assert np.mean(within) < 0.8 * np.mean(across)
    # Pooled to 16 x 16 only the global look is left: silhouette, colour, texture.
    pooled_within = [mean_abs_difference(2 * g, 2 * g + 1, pool=8) for g in groups]
    pooled_across = [mean_abs_difference(2 * g, 2 * ((g + 1) % spec.groups), pool=8) for g in groups]
    assert np.mean(pooled_within) < 0.6 * np.mean(pooled_across)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("groups", 0),
        ("items_per_group", 0),
        ("items_per_group", MAX_ITEMS_PER_GROUP + 1),
        ("train_views", 0),
        ("gallery_views", -2),
        ("query_views", 0),
        ("test_fraction", 0.0),
        ("test_fraction", 1.0),
        ("test_fraction", 0.01),  # rounds to zero test groups out of 24
        ("test_fraction", math.nan),
        ("query_domain", "street"),
        ("image_size", 31),
        ("jpeg_quality", 0),
    ],
)
def test_validation_names_the_field_and_value(field, value):
    shown = repr(value) if isinstance(value, str) else str(value)
    with pytest.raises(ValueError, match=rf"SynthSpec\.{field}\b.*{shown}"):
        SynthSpec(**{field: value})


def test_validation_needs_a_group_on_each_side():
    with pytest.raises(ValueError, match="test_fraction"):
        SynthSpec(groups=1)
