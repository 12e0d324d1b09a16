"""`mga prepare`: DeepFashion In-Shop, Consumer-to-Shop or a retailer's CSV to catalog shards.

    mga prepare inshop        --root DIR --out URI   DeepFashion In-Shop
    mga prepare consumer2shop --root DIR --out URI   DeepFashion Consumer-to-Shop
    mga prepare manifest  --manifest CSV --out URI   path,item_id[,split,domain,category,x1,y1,x2,y2]

The driver parses the annotation files (a malformed one fails with file, line and what
was expected), resolves every listed image and plans shards; Ray tasks then read and
decode every image once, and stream the rows into Parquet shards of at most `--shard-mb`
(an item larger than that gets a shard of its own). Each task owns a contiguous range
of items sorted by `item_id`: every item's rows sit together in ONE shard, sorted by
(item_id, image_id), which is what the training stream's item grouping relies on. The
catalog is committed to its Delta table in one transaction only after every shard is
written; the rejected rows go to their own Delta table beside it (`<out>_rejects`), which
the catalog's commit metadata names with its version.

Rules (what a user of the table can rely on):
- `image` holds the original encoded bytes, `sha256` their hash; `width`/`height` are the
  decoded image's after the EXIF orientation is applied (the frame `bbox` is in).
- Rejected, with `source_path` and `reason` in the rejects table: a missing file, an
  unreadable one, a 0-byte file, a file that is not an image, a truncated or otherwise
  undecodable image, one above `--max-pixels`, a path outside the root (checked on the
  real path, so symlinks cannot escape), and a path listed a second time (the first
  listing is kept; the second is rejected as "duplicate"). The summary reconciles
  `input = written + rejected`.
- Identical bytes under two different paths are NOT rejected: both rows are kept (the
  same garment photographed twice, or a re-upload, is a legitimate image of its item).
  The summary counts such copies within one item and across different items; the latter
  are worth a look because they make two items indistinguishable.
- `bbox` is [x1, y1, x2, y2] int32 in the decoded image, clipped to it; a box that has
  no area once clipped becomes null (counted as "degenerate"); no annotation -> null.
- `image_id` is the path relative to the root, as the annotation lists it
  (`img/WOMEN/Dresses/id_00000002/02_1_front.jpg`): stable and known to DeepFashion users.
  For a manifest, relative to `--root` (default: the CSV's directory); an image named by
  an absolute `s3://` URI has the URI as its id.

In-Shop: `split` is the evaluation status (train|query|gallery), `domain` is shop,
`category` comes from the path (`WOMEN/Dresses`). With `--layout img_highres` (or when
only `img_highres/` exists) the listed `img/...` paths are read from `img_highres/...`;
the annotated boxes are in the 256x256 frame of `img/` ("centered and resized, aspect
kept"), so they are mapped back to the high-resolution image.

Consumer-to-Shop: each image becomes one row however many pairs name it (input counts
distinct images). Test items: consumer images -> query, shop images -> gallery; train
items -> train; val items per `--val-as`: `val` (default, kept as split=val), `skip`
(not written, counted as skipped, not input), `query` (a second test set: consumer ->
query, shop -> gallery) or `gallery` (shop images join the gallery as distractors, as
in the dataset's own protocol "the gallery set are all the shop images in val + test";
consumer images stay split=val). Domain comes from the pair column (1 = consumer,
2 = shop); the bbox file's source_type is cross-checked and disagreements are counted.
If an image is named by pairs that disagree (other item, status or side), the first
pair wins and the conflict is counted and shown.

Manifest CSV: `path,item_id` required; optional `split` (train|query|gallery|val, or
`test` to apply the test rule below to that row's item), `domain` (shop|consumer,
default shop), `category` (default empty), and `x1,y1,x2,y2` (all four or none; empty
cells -> no box). Paths are local or `s3://`; a relative path resolves against the root.
Without a split column, items are split by a seeded hash of the item id: an item is a
test item when hash(seed, item_id) < `--test-fraction`, so the assignment of an item
never changes when the catalog grows (the fraction is met on average, not exactly).
Test items' images: shop -> gallery, consumer -> query. With no domain column every
image is shop and, for each test item, its first image by image_id (the path) is the
query and the rest are gallery.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mga.errors import InputError, MissingInput
from mga.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from pipelines.console import print_summary
from pipelines.schemas import CATALOG, REJECTS
from pipelines.storage import Location, StorageError, resolve, s3_filesystem, write_parquet
from pipelines.tables import TableWriter, companion

DEFAULT_SHARD_MB = 256.0
ROW_GROUP_BYTES = 2 * 2**20  # small row groups: a read of a few ids skips the rest of a shard
ROW_OVERHEAD_BYTES = 256  # the non-image columns of one row, for shard sizing
INSHOP_FRAME = 256  # In-Shop's img/ images: "centered and resized to 256*256"
INSHOP_FULL = {"images": 52_712, "items": 7_982, "train": 25_882, "query": 14_218, "gallery": 12_612}

INSHOP_PARTITION = ("image_name", "item_id", "evaluation_status")
INSHOP_BBOX = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")
C2S_PARTITION = ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status")
C2S_BBOX = ("image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2")
MANIFEST_COLUMNS = ("path", "item_id", "split", "domain", "category", "x1", "y1", "x2", "y2")
BBOX_COLUMNS = ("x1", "y1", "x2", "y2")
VAL_AS = ("val", "skip", "query", "gallery")
LAYOUTS = ("auto", "img", "img_highres")


# ---------------------------------------------------------------------------------------
# What the driver plans: one Entry per listed image that survived the path checks.


@dataclass
class Entry:
    image_id: str
    source: str  # absolute local path or s3:// URI: what is read, and `source_path`
    item_id: str
    split: str
    domain: str
    category: str
    bbox: tuple[int, int, int, int] | None = None
    bbox_frame: int | None = None  # boxes annotated in a square frame of this size (In-Shop img/)
    size: int | None = None  # bytes on disk when known (for shard planning)


@dataclass
class Listing:
    """A source parsed into entries, plus what was rejected before reading anything."""

    kind: str
    source: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)
    input: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class _LocalRoot:
    """A local directory that listed paths must stay inside (checked on real paths)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.real = os.path.realpath(self.path)
        self._real_dirs: dict[str, str] = {}

    @property
    def uri(self) -> str:
        return self.path

    def exists(self, relative: str) -> bool:
        return os.path.exists(os.path.join(self.path, relative))

    def locate(self, listed: str) -> tuple[str, str | None, int | None]:
        """(path to read, reject reason or None, size in bytes or None)."""
        candidate = os.path.normpath(os.path.join(self.path, listed))
        directory, name = os.path.split(candidate)
        real_dir = self._real_dirs.get(directory)
        if real_dir is None:
            real_dir = self._real_dirs[directory] = os.path.realpath(directory)
        real = os.path.join(real_dir, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not real.startswith(self.real + os.sep):
            return candidate, f"outside the root: listed as {listed!r}, real path {real} is not under {self.real}", None
        try:
            size = os.stat(real).st_size
        except OSError:
            size = None
        return candidate, None, size

    def image_id(self, source: str) -> str:
        return os.path.relpath(source, self.path).replace(os.sep, "/")


class _S3Root:
    """An s3://bucket/prefix that relative paths resolve against (no symlinks on S3)."""

    def __init__(self, location: Location) -> None:
        self.path = location.path.rstrip("/")

    @property
    def uri(self) -> str:
        return "s3://" + self.path

    def locate(self, listed: str) -> tuple[str, str | None, int | None]:
        if os.path.isabs(listed):
            return listed, f"outside the root: listed as {listed!r}, a local path, the root is {self.uri}", None
        key = posixpath.normpath(posixpath.join(self.path, listed))
        if not key.startswith(self.path + "/"):
            return "s3://" + key, f"outside the root: listed as {listed!r}, not under {self.uri}", None
        return "s3://" + key, None, None

    def image_id(self, source: str) -> str:
        return posixpath.relpath(source[len("s3://"):], self.path)


class _Collector:
    """Adds listed images to a Listing: root check, then duplicate check on the image id."""

    def __init__(self, listing: Listing, root: _LocalRoot | _S3Root) -> None:
        self.listing = listing
        self.root = root
        self.first_seen: dict[str, str] = {}

    def add(self, where: str, listed: str, image_id: str | None, **fields: Any) -> Entry | None:
        self.listing.input += 1
        if listed.startswith("s3://"):
            source, reason, size = listed, None, None
        else:
            source, reason, size = self.root.locate(listed)
        if reason:
            self.listing.rejects.append((source, reason))
            return None
        image_id = image_id or (source if listed.startswith("s3://") else self.root.image_id(source))
        if image_id in self.first_seen:
            self.listing.rejects.append((source, f"duplicate: {image_id} listed again at {where} (first at {self.first_seen[image_id]})"))
            return None
        self.first_seen[image_id] = where
        entry = Entry(image_id=image_id, source=source, size=size, **fields)
        self.listing.entries.append(entry)
        return entry


# ---------------------------------------------------------------------------------------
# Annotation files


def _read_lines(path: str) -> list[str]:
    location = resolve(path)
    if not location.exists():
        raise MissingInput(f"{location.uri}: no such file")
    try:
        return location.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise InputError(f"{location.uri}: not UTF-8 text ({error})") from None


def parse_table(path: str, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """A DeepFashion list file: a count, a header, then rows of space-separated columns.

    Returns (line number, columns) per row; blank lines are skipped. Raises ValueError
    naming the file and line on a bad count, header or number of columns.
    """
    lines = _read_lines(path)
    if not lines or not lines[0].strip():
        raise InputError(f"{path}:1: expected the number of rows, found {'an empty file' if not lines else 'an empty line'}")
    first = lines[0].split()
    if len(first) != 1 or not first[0].isdigit():
        raise InputError(f"{path}:1: expected the number of rows (one integer), found {lines[0].strip()!r}")
    count = int(first[0])
    expected_header = " ".join(header)
    if len(lines) < 2:
        raise InputError(f"{path}:2: expected the header {expected_header!r}, found the end of the file")
    if lines[1].split() != list(header):
        raise InputError(f"{path}:2: expected the header {expected_header!r}, found {lines[1].strip()!r}")
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        columns = line.split()
        if not columns:
            continue
        if len(columns) != len(header):
            raise InputError(
                f"{path}:{number}: expected {len(header)} columns ({expected_header}), found {len(columns)}: {line.strip()!r}"
            )
        rows.append((number, columns))
    if count != len(rows):
        raise InputError(f"{path}:1: the count line says {count} rows but the file has {len(rows)} rows")
    return rows


def _integer(path: str, number: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}:{number}: expected an integer in column {column}, found {value!r}") from None


def parse_bbox_file(path: str, header: tuple[str, ...], type_column_values: set[int] | None = None) -> dict[str, tuple[int, tuple[int, int, int, int], int]]:
    """image_name -> (line, (x1, y1, x2, y2), value of the third column) of a DeepFashion bbox file."""
    boxes: dict[str, tuple[int, tuple[int, int, int, int], int]] = {}
    for number, columns in parse_table(path, header):
        name = posixpath.normpath(columns[0])
        values = [_integer(path, number, header[i], columns[i]) for i in range(1, 7)]
        if type_column_values is not None and values[1] not in type_column_values:
            raise InputError(
                f"{path}:{number}: unknown {header[2]} {columns[2]!r}: expected one of {', '.join(map(str, sorted(type_column_values)))}"
            )
        if name in boxes:
            raise InputError(f"{path}:{number}: {name} already has a box at line {boxes[name][0]}")
        boxes[name] = (number, (values[2], values[3], values[4], values[5]), values[1])
    return boxes


def _category(listed: str) -> str:
    """`img/WOMEN/Dresses/id_00000002/02_1_front.jpg` -> `WOMEN/Dresses`."""
    parts = posixpath.normpath(listed).split("/")
    if len(parts) >= 5:
        return "/".join(parts[1:3])
    return "/".join(parts[1:-2]) if len(parts) > 3 else ""


def _local_root(root: str) -> _LocalRoot:
    if root.startswith("s3://") or "://" in root:
        raise InputError(f"--root {root}: DeepFashion roots must be a local directory (for images in a bucket use `mga prepare manifest`)")
    if not os.path.isdir(root):
        raise MissingInput(f"--root {root}: no such directory")
    return _LocalRoot(root)


def _image_prefix(root: _LocalRoot, layout: str, allow_highres: bool) -> str:
    """The directory (relative to the root) that listed `img/...` paths are read from."""
    names = ("img", "img_highres") if allow_highres else ("img",)
    if layout != "auto":
        names = (layout,)
    for name in names:
        for parent in ("", "Img/"):
            if root.exists(parent + name):
                return parent + name
    if layout != "auto":
        raise MissingInput(f"--layout {layout}: neither {root.path}/{layout} nor {root.path}/Img/{layout} exists")
    return "img"  # nothing there: every image will be rejected as missing, and say so


def _read_path(listed: str, prefix: str) -> str:
    if prefix != "img" and (listed == "img" or listed.startswith("img/")):
        return prefix + listed[len("img"):]
    return listed


def list_inshop(root: str, layout: str = "auto", bbox: bool = True) -> Listing:
    """DeepFashion In-Shop under `root` as planned entries (no image is read here)."""
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    base = _local_root(root)
    prefix = _image_prefix(base, layout, allow_highres=True)
    partition_path = os.path.join(base.path, "Eval", "list_eval_partition.txt")
    rows = parse_table(partition_path, INSHOP_PARTITION)
    boxes = parse_bbox_file(os.path.join(base.path, "Anno", "list_bbox_inshop.txt"), INSHOP_BBOX) if bbox else {}
    highres = prefix.endswith("img_highres")
    listing = Listing("inshop", {"kind": "inshop", "root": base.path, "images": prefix, "bbox": bbox})
    collector = _Collector(listing, base)
    listed_names = set()
    for number, (name, item_id, status) in rows:
        if status not in ("train", "query", "gallery"):
            raise InputError(f"{partition_path}:{number}: unknown evaluation_status {status!r}: expected train, query or gallery")
        image_id = posixpath.normpath(name)
        listed_names.add(image_id)
        box = boxes.get(image_id)
        collector.add(
            f"{partition_path}:{number}",
            _read_path(name, prefix),
            image_id,
            item_id=item_id,
            split=status,
            domain="shop",
            category=_category(name),
            bbox=box[1] if box else None,
            bbox_frame=INSHOP_FRAME if highres and box else None,
        )
    listing.stats["bbox_unlisted"] = len(set(boxes) - listed_names)
    if listing.stats["bbox_unlisted"]:
        listing.notes.append(f"{listing.stats['bbox_unlisted']} boxes in list_bbox_inshop.txt name images the partition does not list")
    if highres:
        listing.notes.append(f"images read from {prefix}/: boxes mapped from the 256x256 frame of img/")
    return listing


def list_consumer2shop(root: str, val_as: str = "val", bbox: bool = True) -> Listing:
    """DeepFashion Consumer-to-Shop under `root`: one entry per distinct image of the pairs."""
    if val_as not in VAL_AS:
        raise InputError(f"--val-as {val_as!r}: expected one of {', '.join(VAL_AS)}")
    base = _local_root(root)
    prefix = _image_prefix(base, "auto", allow_highres=False)
    partition_path = os.path.join(base.path, "Eval", "list_eval_partition.txt")
    rows = parse_table(partition_path, C2S_PARTITION)
    bbox_path = os.path.join(base.path, "Anno", "list_bbox_consumer2shop.txt")
    boxes = parse_bbox_file(bbox_path, C2S_BBOX, {1, 2}) if bbox else {}
    listing = Listing("consumer2shop", {"kind": "consumer2shop", "root": base.path, "images": prefix, "bbox": bbox, "val_as": val_as})
    # image -> (where, item, status, domain): the first pair naming an image wins.
    images: dict[str, tuple[str, str, str, str]] = {}
    conflicts: list[str] = []
    for number, (consumer, shop, item_id, status) in rows:
        if status not in ("train", "val", "test"):
            raise InputError(f"{partition_path}:{number}: unknown evaluation_status {status!r}: expected train, val or test")
        for name, domain in ((consumer, "consumer"), (shop, "shop")):
            image_id = posixpath.normpath(name)
            where = f"{partition_path}:{number}"
            seen = images.get(image_id)
            if seen is None:
                images[image_id] = (where, item_id, status, domain)
            elif seen[1:] != (item_id, status, domain):
                conflicts.append(f"{image_id} is ({item_id}, {status}, {domain}) at {where} but ({seen[1]}, {seen[2]}, {seen[3]}) at {seen[0]}")
    collector = _Collector(listing, base)
    source_mismatch = 0
    for image_id, (where, item_id, status, domain) in images.items():
        if status == "val" and val_as == "skip":
            listing.skipped += 1
            continue
        if status == "train":
            split = "train"
        elif status == "test" or val_as == "query":
            split = "query" if domain == "consumer" else "gallery"
        elif val_as == "gallery" and domain == "shop":
            split = "gallery"
        else:
            split = "val"
        box = boxes.get(image_id)
        if box and box[2] != (1 if domain == "shop" else 2):
            source_mismatch += 1
        collector.add(where, _read_path(image_id, prefix), image_id, item_id=item_id, split=split, domain=domain, category=_category(image_id), bbox=box[1] if box else None)
    listing.stats.update(pairs=len(rows), annotation_conflicts=len(conflicts), source_type_mismatches=source_mismatch, bbox_unlisted=len(set(boxes) - set(images)))
    if conflicts:
        listing.notes.append(f"{len(conflicts)} pairs disagree with an earlier pair about an image (the first wins), e.g. " + "; ".join(conflicts[:3]))
    if source_mismatch:
        listing.notes.append(f"{source_mismatch} images: source_type in {bbox_path} disagrees with the pair column (the pair column wins)")
    if listing.skipped:
        listing.notes.append(f"{listing.skipped} val images skipped (--val-as skip): not input, not written")
    return listing


def _test_item(seed: int, item_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _manifest_box(path: str, number: int, record: dict[str, str]) -> tuple[int, int, int, int] | None:
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
    base: _LocalRoot | _S3Root = _S3Root(root_location) if root_location.is_s3 else _LocalRoot(root_location.path)
    text = "\n".join(_read_lines(manifest))
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
    collector = _Collector(listing, base)
    pending_test: list[Entry] = []  # entries whose split depends on their item being test
    for record in reader:
        number = reader.line_num
        if None in record:
            raise InputError(f"{location.uri}:{number}: expected {len(columns)} columns, found more")
        path = (record.get("path") or "").strip()
        item_id = (record.get("item_id") or "").strip()
        if not path:
            raise InputError(f"{location.uri}:{number}: empty path")
        if not item_id:
            raise InputError(f"{location.uri}:{number}: empty item_id")
        split = (record.get("split") or "").strip().lower() if has_split else ""
        if has_split and split not in ("train", "query", "gallery", "val", "test"):
            raise InputError(f"{location.uri}:{number}: unknown split {split!r}: expected train, query, gallery, val or test")
        domain = (record.get("domain") or "").strip().lower() if has_domain else "shop"
        if domain not in ("shop", "consumer"):
            raise InputError(f"{location.uri}:{number}: unknown domain {domain!r}: expected shop or consumer")
        box = _manifest_box(location.uri, number, record) if boxes_given else None
        entry = collector.add(
            f"{location.uri}:{number}", path, None, item_id=item_id, split=split or "test", domain=domain,
            category=(record.get("category") or "").strip(), bbox=box,
        )
        if entry is not None and (not has_split):
            entry.split = "train" if not _test_item(seed, item_id, test_fraction) else "test"
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
        splits_of[entry.item_id].add("train" if entry.split == "train" else "val" if entry.split == "val" else "test")
    mixed = sorted(item for item, splits in splits_of.items() if len(splits) > 1)
    if mixed:
        listing.notes.append(f"{len(mixed)} items have images in more than one of train/val/test, e.g. {', '.join(mixed[:3])}")
    if not has_split:
        items = {e.item_id for e in listing.entries}
        listing.stats["test_items"] = len(by_item)
        listing.notes.append(f"no split column: {len(by_item)} of {len(items)} items are test items (seed {seed}, fraction {test_fraction})")
        if items and not by_item and test_fraction > 0:
            listing.notes.append("no test item was drawn: raise --test-fraction or give a split column")
    return listing


# ---------------------------------------------------------------------------------------
# Reading, validating and writing: the Ray tasks


def fit_bbox(bbox: tuple[int, int, int, int] | None, width: int, height: int, frame: int | None = None) -> tuple[list[int] | None, str]:
    """A box in the decoded image: (box or None, state), state in none|kept|clipped|degenerate.

    `frame`: the box was annotated on a copy of the image centered and resized (aspect
    kept) into a frame x frame square; it is mapped back to width x height first.
    """
    if bbox is None:
        return None, "none"
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if frame:
        scale = frame / max(width, height)
        off_x, off_y = (frame - width * scale) / 2, (frame - height * scale) / 2
        x1, x2 = (x1 - off_x) / scale, (x2 - off_x) / scale
        y1, y2 = (y1 - off_y) / scale, (y2 - off_y) / scale
    box = [int(round(v)) for v in (x1, y1, x2, y2)]
    clipped = [min(max(box[0], 0), width), min(max(box[1], 0), height), min(max(box[2], 0), width), min(max(box[3], 0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "degenerate"
    return clipped, ("kept" if clipped == box else "clipped")


class _Reader:
    """Reads local paths and s3:// URIs; one S3 client per task."""

    def __init__(self) -> None:
        self._s3: pafs.S3FileSystem | None = None

    def read(self, source: str) -> tuple[bytes | None, str | None]:
        try:
            if source.startswith("s3://"):
                if self._s3 is None:
                    self._s3 = s3_filesystem()
                info = self._s3.get_file_info(source[len("s3://"):])
                if info.type == pafs.FileType.NotFound:
                    return None, "missing file"
                if info.type != pafs.FileType.File:
                    return None, "not a file"
                with self._s3.open_input_stream(source[len("s3://"):]) as stream:
                    return stream.read(), None
            with open(source, "rb") as handle:
                return handle.read(), None
        except FileNotFoundError:
            return None, "missing file"
        except IsADirectoryError:
            return None, "not a file (a directory)"
        except PermissionError:
            return None, "unreadable: permission denied"
        except OSError as error:
            return None, f"unreadable: {error}"


class _ShardWriter:
    """Streams item-aligned row groups into part files of at most `target` bytes."""

    def __init__(self, directory: Location, task: int, target: int) -> None:
        self.directory, self.task, self.target = directory, task, target
        if not directory.is_s3:  # the job's run directory, inside the table
            directory.fs.create_dir(directory.path, recursive=True)
        self.row_group = min(ROW_GROUP_BYTES, target)
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.shard_bytes = 0
        self.shard_items: set[str] = set()
        self.shard_rows = 0
        self.files: list[dict[str, Any]] = []

    def add_item(self, rows: list[dict[str, Any]]) -> None:
        size = sum(len(row["image"]) + ROW_OVERHEAD_BYTES for row in rows)
        if self.shard_rows + len(self.pending) and self.shard_bytes + self.pending_bytes + size > self.target:
            self.close()
        self.pending.extend(rows)
        self.pending_bytes += size
        self.shard_items.add(rows[0]["item_id"])
        if self.pending_bytes >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            name = f"part-{self.task:05d}-{len(self.files):04d}.parquet"
            self.path = self.directory.join(name).path
            self.writer = pq.ParquetWriter(
                self.path,
                CATALOG,
                filesystem=self.directory.fs,
                compression={name: ("none" if name == "image" else "zstd") for name in CATALOG.names},
                use_dictionary=["item_id", "split", "domain", "category"],
                write_statistics=[name for name in CATALOG.names if name != "image"],
            )
        self.writer.write_table(pa.Table.from_pylist(self.pending, schema=CATALOG), row_group_size=len(self.pending))
        self.shard_rows += len(self.pending)
        self.shard_bytes += self.pending_bytes
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self._flush()
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        size = self.directory.fs.get_file_info(self.path).size
        self.files.append({"path": self.path, "rows": self.shard_rows, "items": len(self.shard_items), "bytes": size})
        self.shard_bytes, self.shard_rows, self.shard_items = 0, 0, set()


def write_task(directory_uri: str, task: int, entries: list[Entry], target_bytes: int, max_pixels: int) -> dict[str, Any]:
    """Read, validate and write `entries` (sorted by item, image) as part files of one task."""
    reader = _Reader()
    writer = _ShardWriter(resolve(directory_uri), task, target_bytes)
    rejects: list[tuple[str, str]] = []
    written: list[tuple[str, str, str, str, str]] = []  # (item, split, domain, sha256, image_id)
    bbox_states: Counter[str] = Counter()
    for _, group in groupby(entries, key=lambda e: e.item_id):
        rows = []
        for entry in group:
            data, reason = reader.read(entry.source)
            if reason is None:
                try:
                    image = decode_image(data, max_pixels)
                except ImageDecodeError as error:
                    reason = str(error)
            if reason is not None:
                rejects.append((entry.source, reason))
                continue
            width, height = image.size
            del image
            bbox, state = fit_bbox(entry.bbox, width, height, entry.bbox_frame)
            bbox_states[state] += 1
            digest = hashlib.sha256(data).hexdigest()
            rows.append(
                {
                    "image_id": entry.image_id,
                    "item_id": entry.item_id,
                    "split": entry.split,
                    "domain": entry.domain,
                    "category": entry.category,
                    "bbox": bbox,
                    "image": data,
                    "sha256": digest,
                    "width": width,
                    "height": height,
                    "source_path": entry.source,
                }
            )
            written.append((entry.item_id, entry.split, entry.domain, digest, entry.image_id))
        if rows:
            writer.add_item(rows)
    writer.close()
    return {"files": writer.files, "rejects": rejects, "written": written, "bbox": dict(bbox_states), "listed": len(entries)}


def _estimate_sizes(entries: list[Entry]) -> None:
    """Fill unknown sizes (S3 objects) with the mean of a small sample of HEAD requests."""
    unknown = [e for e in entries if e.size is None]
    if not unknown:
        return
    known = [e.size for e in entries if e.size is not None]
    sample = [e for e in unknown if e.source.startswith("s3://")][:16]
    if sample:
        try:
            infos = s3_filesystem().get_file_info([e.source[len("s3://"):] for e in sample])
            known += [info.size for info in infos if info.type == pafs.FileType.File and info.size is not None]
        except OSError:
            pass
    mean = int(sum(known) / len(known)) if known else 256 * 1024
    for entry in unknown:
        entry.size = mean


def plan_tasks(entries: list[Entry], target_bytes: int, min_tasks: int) -> list[list[Entry]]:
    """Contiguous runs of whole items (sorted by item, image), about balanced in bytes.

    At least ceil(total / target) runs, and `min_tasks` runs when there are that many
    items, so every CPU has work even when the catalog fits in one shard.
    """
    entries = sorted(entries, key=lambda e: (e.item_id, e.image_id))
    _estimate_sizes(entries)
    items = [list(group) for _, group in groupby(entries, key=lambda e: e.item_id)]
    sizes = [sum((e.size or 0) + ROW_OVERHEAD_BYTES for e in item) for item in items]
    total = sum(sizes)
    count = max(math.ceil(total / target_bytes), min(len(items), max(1, min_tasks)))
    share = total / count if count else 0
    tasks: list[list[Entry]] = []
    current: list[Entry] = []
    current_bytes = 0
    for item, size in zip(items, sizes):
        if current and current_bytes + size > target_bytes:
            tasks.append(current)
            current, current_bytes = [], 0
        current.extend(item)
        current_bytes += size
        if current_bytes >= share:
            tasks.append(current)
            current, current_bytes = [], 0
    if current:
        tasks.append(current)
    return tasks


def _run_tasks(directory: Location, tasks: list[list[Entry]], target_bytes: int, max_pixels: int) -> list[dict[str, Any]]:
    import ray

    remote = ray.remote(num_cpus=1)(write_task)
    pending = {remote.remote(directory.uri, index, entries, target_bytes, max_pixels): len(entries) for index, entries in enumerate(tasks)}
    total = sum(pending.values())
    results, done, started, last = [], 0, time.time(), 0.0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        done += pending.pop(ready[0])
        try:
            results.append(ray.get(ready[0]))
        except ray.exceptions.RayTaskError as error:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(error, "cause", None)
            if isinstance(cause, (OSError, StorageError)):
                raise StorageError(f"writing shards into {directory.uri}: {cause}") from error
            raise
        now = time.time()
        if now - last >= 5 or not pending:
            last = now
            rate = done / max(now - started, 1e-9)
            print(f"prepare: {len(results)}/{len(tasks)} tasks, {done:,}/{total:,} images ({rate:,.0f} images/s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------
# The command


def _counts(values: Iterable[str], order: tuple[str, ...]) -> dict[str, int]:
    counter = Counter(values)
    ordered = {name: counter[name] for name in order if counter[name]}
    ordered.update({name: n for name, n in sorted(counter.items()) if name not in ordered})
    return ordered


def reason_kind(reason: str) -> str:
    """`cannot decode: image file is truncated` -> `cannot decode`; groups rejects in the summary."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()


def _fmt(counts: dict[str, int]) -> str:
    return " · ".join(f"{name} {n:,}" for name, n in counts.items()) or "none"


def run(
    source: str,
    out: str,
    *,
    root: str | None = None,
    manifest: str | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_shards: int | None = None,
    layout: str = "auto",
    bbox: bool = True,
    val_as: str = "val",
    seed: int = 0,
    test_fraction: float = 0.2,
) -> dict[str, Any]:
    """Prepare `source` (inshop | consumer2shop | manifest) into the catalog table at `out`.

    Returns the published manifest (see `mga prepare --help` and the module docstring).
    """
    from pipelines.runtime import init_ray

    started = time.time()
    if shard_mb <= 0:
        raise InputError(f"--shard-mb {shard_mb}: expected a positive size in MB")
    if max_pixels < 1:
        raise InputError(f"--max-pixels {max_pixels}: expected a positive number of pixels")
    if source in ("inshop", "consumer2shop") and not root:
        raise InputError(f"mga prepare {source} needs --root DIR")
    if source == "inshop":
        listing = list_inshop(root, layout=layout, bbox=bbox)
    elif source == "consumer2shop":
        listing = list_consumer2shop(root, val_as=val_as, bbox=bbox)
    elif source == "manifest":
        if not manifest:
            raise InputError("mga prepare manifest needs --manifest CSV")
        listing = list_manifest(manifest, root=root, seed=seed, test_fraction=test_fraction)
    else:
        raise InputError(f"unknown source {source!r}: expected inshop, consumer2shop or manifest")
    if listing.input == 0:
        raise InputError(f"{listing.source.get('manifest') or listing.source.get('root')}: lists no images")

    table = resolve(out)
    target_bytes = max(1, int(shard_mb * 2**20))
    init_ray()
    if min_shards is None:
        import ray

        min_shards = int(ray.cluster_resources().get("CPU", 1))
    tasks = plan_tasks(listing.entries, target_bytes, min_shards)
    print(f"prepare: {listing.input:,} images listed, {len(listing.rejects):,} rejected before reading; {len(tasks)} tasks -> {table.uri}", flush=True)
    with TableWriter(table) as writer, TableWriter(companion(table, "rejects")) as rejects_writer:
        results = _run_tasks(writer.run, tasks, target_bytes, max_pixels) if tasks else []
        rejects = list(listing.rejects) + [reject for result in results for reject in result["rejects"]]
        files = sorted((f for result in results for f in result["files"]), key=lambda f: f["path"])
        write_parquet(
            rejects_writer.file("rejects.parquet"),
            pa.table({"source_path": [r[0] for r in rejects], "reason": [r[1] for r in rejects]}, schema=REJECTS),
        )
        written = [row for result in results for row in result["written"]]
        rejects_table = rejects_writer.commit(REJECTS, {"table": "rejects", "of": table.uri, "rows": len(rejects)})
        info = _summary(listing, table, rejects_table, rejects, written, results, files, shard_mb, max_pixels)
        snapshot = writer.commit(CATALOG, info, files=[f["path"] for f in files])
    seconds = time.time() - started
    info = {**snapshot.info, "version": snapshot.version}
    _print(listing, table, info, files, seconds)
    if info["rows"] == 0:
        raise InputError(f"no image of {listing.input:,} could be read: see the rejects table {rejects_table.uri}")
    return info


def _summary(listing, table, rejects_table, rejects, written, results, files, shard_mb, max_pixels) -> dict[str, Any]:
    items_per_split: dict[str, set[str]] = defaultdict(set)
    for item, split, *_ in written:
        items_per_split[split].add(item)
    seen: dict[str, tuple[str, str]] = {}
    copies_within, copies_across, examples = 0, 0, []
    for item, _, _, digest, image_id in written:
        first = seen.setdefault(digest, (item, image_id))
        if first[1] == image_id:
            continue
        if first[0] == item:
            copies_within += 1
        else:
            copies_across += 1
            if len(examples) < 3:
                examples.append(f"{image_id} ({item}) = {first[1]} ({first[0]})")
    if copies_across:
        listing.notes.append(f"{copies_across} images have the same bytes as an image of another item, e.g. " + "; ".join(examples))
    bbox = Counter()
    for result in results:
        bbox.update(result["bbox"])
    ordered_splits = ("train", "query", "gallery", "val")
    return {
        "table": "catalog",
        "source": listing.source,
        "input": listing.input,
        "rows": len(written),
        "rejected": len(rejects),
        "skipped": listing.skipped,
        "items": len({row[0] for row in written}),
        "rows_per_split": _counts((row[1] for row in written), ordered_splits),
        "rows_per_domain": _counts((row[2] for row in written), ("shop", "consumer")),
        "items_per_split": {split: len(items_per_split[split]) for split in _counts((row[1] for row in written), ordered_splits)},
        "rejects_by_reason": _counts((reason_kind(r[1]) for r in rejects), ()),
        "rejects": {"table": rejects_table.uri, "version": rejects_table.version},
        "bbox": {"kept": bbox["kept"], "clipped": bbox["clipped"], "degenerate": bbox["degenerate"], "none": bbox["none"]},
        "identical_bytes": {"within_item": copies_within, "across_items": copies_across},
        "shards": [{"file": posixpath.relpath(f["path"], table.path), "rows": f["rows"], "items": f["items"], "bytes": f["bytes"]} for f in files],
        "shard_mb": shard_mb,
        "max_pixels": max_pixels,
        "notes": listing.notes,
        **({"stats": listing.stats} if listing.stats else {}),
    }


def _print(listing: Listing, table: Location, body: dict[str, Any], files: list[dict[str, Any]], seconds: float) -> None:
    source = body["source"]
    rows = {
        "source": f"{listing.kind}: {source.get('manifest') or source.get('root')}" + (f" (images in {source['images']}/)" if source.get("images") else ""),
        "output": f"{table.uri} (version {body['version']})",
        "input = written + rejected": f"{body['input']:,} = {body['rows']:,} + {body['rejected']:,}",
    }
    if body["skipped"]:
        rows["skipped (not input)"] = f"{body['skipped']:,}"
    rows["rows per split"] = _fmt(body["rows_per_split"])
    rows["items per split"] = _fmt(body["items_per_split"]) + f" (items {body['items']:,})"
    rows["rows per domain"] = _fmt(body["rows_per_domain"])
    if listing.kind == "inshop":
        full = INSHOP_FULL
        rows["full In-Shop has"] = f"{full['images']:,} images of {full['items']:,} items: train {full['train']:,} · query {full['query']:,} · gallery {full['gallery']:,}"
    rows["rejected"] = _fmt(body["rejects_by_reason"]) + (f" (see the table {body['rejects']['table']})" if body["rejected"] else "")
    box = body["bbox"]
    rows["bbox"] = f"kept {box['kept']:,} · clipped {box['clipped']:,} · degenerate -> null {box['degenerate']:,} · none {box['none']:,}"
    copies = body["identical_bytes"]
    if copies["within_item"] or copies["across_items"]:
        rows["identical bytes"] = f"{copies['within_item']:,} within an item · {copies['across_items']:,} across items (kept)"
    largest = max((f["bytes"] for f in files), default=0)
    rows["shards"] = f"{len(files)} Parquet files, largest {largest / 2**20:,.1f} MB (target {body['shard_mb']:g} MB)"
    rows["time"] = f"{seconds:,.1f} s ({body['input'] / max(seconds, 1e-9):,.0f} images/s)"
    for index, note in enumerate(body["notes"]):
        rows[f"note {index + 1}"] = note
    print_summary(f"mga prepare {listing.kind}", rows)


# ---------------------------------------------------------------------------------------
# CLI


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="catalog table URI: a local directory or s3://bucket/prefix")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="largest Parquet shard in MB (an item bigger than this gets its own shard); default %(default)s")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images with more pixels than this; default %(default)s")
    parser.add_argument("--min-shards", type=int, default=None, help="write at least this many shards when there are enough items, so every CPU works (default: the cluster's CPUs)")
    # Also accepted after the source name (the parent `prepare` parser has them too).
    parser.add_argument("--s3-endpoint", default=argparse.SUPPRESS, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", default=argparse.SUPPRESS, help="S3 region (default: $AWS_REGION)")


def build_parser(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest="source", required=True, metavar="{inshop,consumer2shop,manifest}")
    inshop = sources.add_parser("inshop", help="DeepFashion In-Shop: Eval/list_eval_partition.txt, Anno/list_bbox_inshop.txt")
    inshop.add_argument("--root", required=True, help="the In-Shop directory (with Eval/, Anno/ and img/ or img_highres/)")
    inshop.add_argument("--layout", choices=LAYOUTS, default="auto", help="image directory: img, img_highres, or auto (img if present); default %(default)s")
    inshop.add_argument("--no-bbox", dest="bbox", action="store_false", help="ignore Anno/list_bbox_inshop.txt (every bbox null)")
    _add_common(inshop)
    c2s = sources.add_parser("consumer2shop", help="DeepFashion Consumer-to-Shop: Eval/list_eval_partition.txt, Anno/list_bbox_consumer2shop.txt")
    c2s.add_argument("--root", required=True, help="the Consumer-to-Shop directory (with Eval/, Anno/ and img/)")
    c2s.add_argument("--val-as", choices=VAL_AS, default="val", help="val items: keep as split=val, skip, treat as query/gallery like test, or add their shop images to the gallery; default %(default)s")
    c2s.add_argument("--no-bbox", dest="bbox", action="store_false", help="ignore Anno/list_bbox_consumer2shop.txt (every bbox null)")
    _add_common(c2s)
    man = sources.add_parser("manifest", help="a CSV of path,item_id[,split,domain,category,x1,y1,x2,y2] (local or s3://)")
    man.add_argument("--manifest", required=True, help="the CSV (local path or s3://)")
    man.add_argument("--root", default=None, help="relative paths resolve against this directory and local paths must stay inside it (default: the CSV's directory)")
    man.add_argument("--seed", type=int, default=0, help="seed of the item split when the CSV has no split column; default %(default)s")
    man.add_argument("--test-fraction", type=float, default=0.2, help="share of items drawn as test items when the CSV has no split column; default %(default)s")
    _add_common(man)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.source,
        args.out,
        root=getattr(args, "root", None),
        manifest=getattr(args, "manifest", None),
        shard_mb=args.shard_mb,
        max_pixels=args.max_pixels,
        min_shards=args.min_shards,
        layout=getattr(args, "layout", "auto"),
        bbox=getattr(args, "bbox", True),
        val_as=getattr(args, "val_as", "val"),
        seed=getattr(args, "seed", 0),
        test_fraction=getattr(args, "test_fraction", 0.2),
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.command import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
