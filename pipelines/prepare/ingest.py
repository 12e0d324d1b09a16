"""Reading, validating and writing: the Ray tasks that turn entries into catalog shards."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from itertools import groupby
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mga.transforms import ImageDecodeError, decode_image
from pipelines.prepare.listing import Entry
from pipelines.prepare.merge import unchanged_ids
from pipelines.schemas import CATALOG
from pipelines.storage import Location, StorageError, resolve, s3_filesystem

ROW_GROUP_BYTES = 2 * 2**20  # small row groups: a read of a few ids skips the rest of a shard
# JPEG bytes do not compress; statistics on ids and keys let filtered reads skip files.
CATALOG_PARQUET: dict[str, Any] = {
    "compression": {name: ("none" if name == "image" else "zstd") for name in CATALOG.names},
    "use_dictionary": ["item_id", "split", "domain", "category"],
    "write_statistics": [name for name in CATALOG.names if name != "image"],
}
ROW_OVERHEAD_BYTES = 256  # the non-image columns of one row, for shard sizing


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


class ImageReader:
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


class ShardWriter:
    """Streams item-aligned row groups into part files of at most `target` bytes."""

    def __init__(self, directory: Location, task: int, target: int) -> None:
        self.directory, self.task, self.target = directory, task, target
        if not directory.is_s3:  # the job's run directory, inside the table
            directory.fs.create_dir(directory.path, recursive=True)
        # At least ~16 row groups a shard, so a read of a few ids skips most of even a small shard.
        self.row_group = min(ROW_GROUP_BYTES, max(1, target // 16))
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
        if rows[0]["item_id"] is not None:
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
                **CATALOG_PARQUET,
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


def write_task(directory_uri: str, task: int, entries: list[Entry], target_bytes: int, max_pixels: int, stored: pa.Table | None = None) -> dict[str, Any]:
    """Read, validate and write `entries` (sorted by item, image) as part files of one task.

    With `stored` (a merge: the stored catalog's rows of these images), an image whose row
    is unchanged is read and checked but not written; its id is returned under "kept".
    """
    reader = ImageReader()
    writer = ShardWriter(resolve(directory_uri), task, target_bytes)
    rejects: list[tuple[str, str]] = []
    written: list[tuple[str, str, str, str, str]] = []  # (item, split, domain, sha256, image_id) of every catalog row
    kept: list[str] = []
    bbox_states: Counter[str] = Counter()
    for _, group in groupby(entries, key=lambda e: e.unit):
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
        unchanged = unchanged_ids(stored, rows)
        kept.extend(sorted(unchanged))
        rows = [row for row in rows if row["image_id"] not in unchanged]
        if rows:
            writer.add_item(rows)
    writer.close()
    return {"files": writer.files, "rejects": rejects, "written": written, "kept": kept, "bbox": dict(bbox_states), "listed": len(entries)}


def estimate_sizes(entries: list[Entry]) -> None:
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


def split_group(split: str) -> str:
    """train | val | test (query and gallery): the reads that filter on split want one of these."""
    return "test" if split in ("query", "gallery") else split


def plan_tasks(entries: list[Entry], target_bytes: int, min_tasks: int) -> list[list[Entry]]:
    """Contiguous runs of whole items, about balanced in bytes, sorted by the item's split
    group (train, test, val; "mixed" for an item with images in more than one), item and
    image, and never mixing groups: files of one group let the training stream's
    `split = train` read skip every other file by its statistics.

    At least ceil(total / target) runs, and `min_tasks` runs when there are that many
    items, so every CPU has work even when the catalog fits in one shard.
    """
    groups_of: dict[tuple[bool, str], set[str]] = {}
    for entry in entries:
        groups_of.setdefault(entry.unit, set()).add(split_group(entry.split))
    group = {unit: next(iter(groups)) if len(groups) == 1 else "mixed" for unit, groups in groups_of.items()}
    entries = sorted(entries, key=lambda e: (group[e.unit], e.unit, e.image_id))
    estimate_sizes(entries)
    items = [list(rows) for _, rows in groupby(entries, key=lambda e: e.unit)]
    sizes = [sum((e.size or 0) + ROW_OVERHEAD_BYTES for e in item) for item in items]
    total = sum(sizes)
    count = max(math.ceil(total / target_bytes), min(len(items), max(1, min_tasks)))
    share = total / count if count else 0
    tasks: list[list[Entry]] = []
    current: list[Entry] = []
    current_bytes = 0
    for item, size in zip(items, sizes):
        if current and (current_bytes + size > target_bytes or group[current[0].unit] != group[item[0].unit]):
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


def run_tasks(directory: Location, tasks: list[list[Entry]], target_bytes: int, max_pixels: int, stored: list[pa.Table] | None = None) -> list[dict[str, Any]]:
    import ray

    remote = ray.remote(num_cpus=1)(write_task)
    pending = {
        remote.remote(directory.uri, index, entries, target_bytes, max_pixels, None if stored is None else stored[index]): len(entries)
        for index, entries in enumerate(tasks)
    }
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


def combine_task(directory_uri: str, number: int, sources: list[str]) -> dict[str, Any]:
    """Concatenate part files (in order: still sorted by item) into one, row groups as they were; delete the parts."""
    directory = resolve(directory_uri)
    target = directory.join(f"combined-{number:05d}.parquet")
    rows, items = 0, set()
    with pq.ParquetWriter(target.path, CATALOG, filesystem=directory.fs, **CATALOG_PARQUET) as writer:
        for source in sources:
            part = pq.ParquetFile(source, filesystem=directory.fs)
            for index in range(part.num_row_groups):
                group = part.read_row_group(index)
                writer.write_table(group, row_group_size=group.num_rows)
                rows += group.num_rows
                items.update(group.column("item_id").drop_null().to_pylist())
    for source in sources:
        directory.fs.delete_file(source)
    return {"path": target.path, "rows": rows, "items": len(items), "bytes": directory.fs.get_file_info(target.path).size}


def combine_small_files(directory: Location, files: list[dict[str, Any]], target_bytes: int) -> list[dict[str, Any]]:
    """Runs of consecutive small part files combined into files of up to `target_bytes`.

    A merge writes only the new and changed rows of each task: a few rows a task, in files
    whose footers would cost a reader more than their images. One Ray task per combined file.
    """
    import ray

    bins: list[list[dict[str, Any]]] = [[]]
    for part in files:
        if bins[-1] and sum(f["bytes"] for f in bins[-1]) + part["bytes"] > target_bytes:
            bins.append([])
        bins[-1].append(part)
    combine = ray.remote(num_cpus=1)(combine_task)
    singles = [group[0] for group in bins if len(group) == 1]
    combined = ray.get([combine.remote(directory.uri, number, [f["path"] for f in group]) for number, group in enumerate(bins) if len(group) > 1])
    return sorted(singles + combined, key=lambda f: f["path"])
