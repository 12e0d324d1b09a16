"""A retailer's CSV manifest (path,item_id[,split,domain,category,x1,y1,x2,y2]) as entries."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import posixpath
from collections import defaultdict

from mga.errors import InputError
from pipelines.prepare.listing import Collector, Entry, Listing, LocalRoot, S3Root, read_lines
from pipelines.storage import resolve

MANIFEST_COLUMNS = ("path", "item_id", "split", "domain", "category", "x1", "y1", "x2", "y2")
BBOX_COLUMNS = ("x1", "y1", "x2", "y2")


def is_test_item(seed: int, item_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def manifest_box(path: str, number: int, record: dict[str, str]) -> tuple[int, int, int, int] | None:
    cells = [(record.get(name) or "").strip() for name in BBOX_COLUMNS]
    if not any(cells):
        return None
    if not all(cells):
        missing = [name for name, cell in zip(BBOX_COLUMNS, cells) if not cell]
        raise InputError(f"{path}:{number}: a box needs all of x1,y1,x2,y2 or none; {','.join(missing)} empty")
    values = []
    for name, cell in zip(BBOX_COLUMNS, cells):
        try:
            value = float(cell)
        except ValueError:
            raise InputError(f"{path}:{number}: expected a number in column {name}, found {cell!r}") from None
        if not math.isfinite(value):
            raise InputError(f"{path}:{number}: expected a finite number in column {name}, found {cell!r}")
        values.append(int(round(value)))
    return values[0], values[1], values[2], values[3]


def list_manifest(manifest: str, root: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> Listing:
    """A retailer's CSV (local or s3://) as planned entries; see the module docstring for the split rule."""
    if not 0.0 <= test_fraction <= 1.0:
        raise InputError(f"--test-fraction {test_fraction}: expected a fraction between 0 and 1")
    location = resolve(manifest)
    root_uri = root or (posixpath.dirname(location.uri) if location.is_s3 else os.path.dirname(location.path))
    root_location = resolve(root_uri)
    base: LocalRoot | S3Root = S3Root(root_location) if root_location.is_s3 else LocalRoot(root_location.path)
    text = "\n".join(read_lines(manifest))
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in (reader.fieldnames or [])]
    reader.fieldnames = columns
    missing = [name for name in ("path", "item_id") if name not in columns]
    if missing:
        raise InputError(f"{location.uri}:1: missing column {', '.join(missing)}: expected a header with path,item_id[,split,domain,category,x1,y1,x2,y2], found {','.join(columns)!r}")
    boxes_given = [name for name in BBOX_COLUMNS if name in columns]
    if boxes_given and len(boxes_given) != 4:
        raise InputError(f"{location.uri}:1: box columns need all of x1,y1,x2,y2; found only {','.join(boxes_given)}")
    listing = Listing("manifest", {"kind": "manifest", "manifest": location.uri, "root": base.uri, "seed": seed, "test_fraction": test_fraction})
    ignored = [name for name in columns if name not in MANIFEST_COLUMNS]
    if ignored:
        listing.notes.append(f"columns ignored: {', '.join(ignored)}")
    has_split, has_domain = "split" in columns, "domain" in columns
    collector = Collector(listing, base)
    pending_test: list[Entry] = []  # entries whose split depends on their item being test
    for record in reader:
        number = reader.line_num
        if None in record:
            raise InputError(f"{location.uri}:{number}: expected {len(columns)} columns, found more")
        path = (record.get("path") or "").strip()
        item_id = (record.get("item_id") or "").strip()
        if not path:
            raise InputError(f"{location.uri}:{number}: empty path")
        split = (record.get("split") or "").strip().lower() if has_split else ""
        if has_split and split not in ("train", "query", "gallery", "val", "test"):
            raise InputError(f"{location.uri}:{number}: unknown split {split!r}: expected train, query, gallery, val or test")
        if not item_id and split != "query":
            raise InputError(f"{location.uri}:{number}: empty item_id: only split=query rows (unlabelled photos to match) may leave it empty")
        domain = (record.get("domain") or "").strip().lower() if has_domain else "shop"
        if domain not in ("shop", "consumer"):
            raise InputError(f"{location.uri}:{number}: unknown domain {domain!r}: expected shop or consumer")
        box = manifest_box(location.uri, number, record) if boxes_given else None
        entry = collector.add(
            f"{location.uri}:{number}", path, None, item_id=item_id or None, split=split or "test", domain=domain,
            category=(record.get("category") or "").strip(), bbox=box,
        )
        if entry is not None and (not has_split):
            entry.split = "train" if not is_test_item(seed, item_id, test_fraction) else "test"
        if entry is not None and entry.split == "test":
            pending_test.append(entry)
    # Test items: consumer -> query, shop -> gallery; with no domain column, first image -> query.
    by_item: dict[str, list[Entry]] = defaultdict(list)
    for entry in pending_test:
        by_item[entry.item_id].append(entry)
    for entries in by_item.values():
        entries.sort(key=lambda e: e.image_id)
        for index, entry in enumerate(entries):
            if has_domain:
                entry.split = "query" if entry.domain == "consumer" else "gallery"
            else:
                entry.split = "query" if index == 0 else "gallery"
    splits_of: dict[str, set[str]] = defaultdict(set)
    for entry in listing.entries:
        if entry.item_id is None:
            continue
        splits_of[entry.item_id].add("train" if entry.split == "train" else "val" if entry.split == "val" else "test")
    mixed = sorted(item for item, splits in splits_of.items() if len(splits) > 1)
    if mixed:
        listing.notes.append(f"{len(mixed)} items have images in more than one of train/val/test, e.g. {', '.join(mixed[:3])}")
    if not has_split:
        items = {e.item_id for e in listing.entries if e.item_id is not None}
        listing.stats["test_items"] = len(by_item)
        listing.notes.append(f"no split column: {len(by_item)} of {len(items)} items are test items (seed {seed}, fraction {test_fraction})")
        if items and not by_item and test_fraction > 0:
            listing.notes.append("no test item was drawn: raise --test-fraction or give a split column")
    unlabelled = sum(entry.item_id is None for entry in listing.entries)
    if unlabelled:
        listing.notes.append(f"{unlabelled} unlabelled query rows (empty item_id): searched like any query, left out of R@K/mAP")
    return listing
