"""What the driver plans: one Entry per listed image that survived the path checks, and the
helpers every source's parser shares (roots that paths must stay inside, DeepFashion list files)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from mga.errors import InputError, MissingInput
from pipelines.storage import Location, resolve

LAYOUTS = ("auto", "img", "img_highres")


@dataclass
class Entry:
    image_id: str
    source: str  # absolute local path or s3:// URI: what is read, and `source_path`
    item_id: str | None  # None: an unlabelled query photo (manifest rows with an empty item_id)
    split: str
    domain: str
    category: str
    bbox: tuple[int, int, int, int] | None = None
    bbox_frame: int | None = None  # boxes annotated in a square frame of this size (In-Shop img/)
    size: int | None = None  # bytes on disk when known (for shard planning)

    @property
    def unit(self) -> tuple[bool, str]:
        """What stays together in one shard, and its sort key: the item, or an unlabelled photo
        on its own (after the items: a run of unlabelled photos is not one huge item)."""
        return (self.item_id is None, self.image_id if self.item_id is None else self.item_id)


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


class LocalRoot:
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


class S3Root:
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


class Collector:
    """Adds listed images to a Listing: root check, then duplicate check on the image id."""

    def __init__(self, listing: Listing, root: LocalRoot | S3Root) -> None:
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



def read_lines(path: str) -> list[str]:
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
    lines = read_lines(path)
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


def parse_integer(path: str, number: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}:{number}: expected an integer in column {column}, found {value!r}") from None


def parse_bbox_file(path: str, header: tuple[str, ...], type_column_values: set[int] | None = None) -> dict[str, tuple[int, tuple[int, int, int, int], int]]:
    """image_name -> (line, (x1, y1, x2, y2), value of the third column) of a DeepFashion bbox file."""
    boxes: dict[str, tuple[int, tuple[int, int, int, int], int]] = {}
    for number, columns in parse_table(path, header):
        name = posixpath.normpath(columns[0])
        values = [parse_integer(path, number, header[i], columns[i]) for i in range(1, 7)]
        if type_column_values is not None and values[1] not in type_column_values:
            raise InputError(
                f"{path}:{number}: unknown {header[2]} {columns[2]!r}: expected one of {', '.join(map(str, sorted(type_column_values)))}"
            )
        if name in boxes:
            raise InputError(f"{path}:{number}: {name} already has a box at line {boxes[name][0]}")
        boxes[name] = (number, (values[2], values[3], values[4], values[5]), values[1])
    return boxes


def category_of(listed: str) -> str:
    """`img/WOMEN/Dresses/id_00000002/02_1_front.jpg` -> `WOMEN/Dresses`."""
    parts = posixpath.normpath(listed).split("/")
    if len(parts) >= 5:
        return "/".join(parts[1:3])
    return "/".join(parts[1:-2]) if len(parts) > 3 else ""


def local_root(root: str) -> LocalRoot:
    if root.startswith("s3://") or "://" in root:
        raise InputError(f"--root {root}: DeepFashion roots must be a local directory (for images in a bucket use `mga prepare manifest`)")
    if not os.path.isdir(root):
        raise MissingInput(f"--root {root}: no such directory")
    return LocalRoot(root)


def image_prefix(root: LocalRoot, layout: str, allow_highres: bool) -> str:
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


def read_path(listed: str, prefix: str) -> str:
    if prefix != "img" and (listed == "img" or listed.startswith("img/")):
        return prefix + listed[len("img"):]
    return listed
