"""Delta Lake tables: every job reads one version and publishes its output in one commit.

A writer (Ray tasks or the driver) writes Parquet files into a run directory inside the
table (`<table>/run-<time>-<id>/...`); the driver then commits them in one Delta
transaction whose Add actions come from the files' footers: row counts and the min/max of
every string and integer column, which readers (ours, DuckDB, Spark) use to skip files.
Nothing is visible until the commit; a failed job deletes its run directory, a killed one
leaves files no version lists, which `vacuum` removes once they are older than its horizon.

Concurrency: every commit of ours carries a Delta application transaction (`txn`, app id
"mga") one above the version the job started from, so of two jobs racing on one table one
commits and the other fails with `TableConflict` naming the version that beat it — never a
lost or doubled row, even for two merges that would each append the same new image.

What ties tables together (model, catalog and version, counts, config) is stored as the
commit's custom metadata under "mga"; `Snapshot.info` is that of the newest such commit at
or below the version read, so engines that write their own commits (OPTIMIZE) do not hide it.
A merge's commit also names, under "mga_copies", the retired file each rewritten one copies
(pipelines.rewrites), which readers of two versions use to compare only what changed.

Why not Ray's `Dataset.write_delta` (a prototype in Ray 2.60): it has no commit metadata,
no Remove actions (a merge must retire the files it rewrites) and no conflict guard beyond
retrying the commit; Ray tasks here write plain Parquet and the driver commits with
`deltalake` directly.
"""

from __future__ import annotations

import bisect
import json
import os
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mga.errors import InputError
from pipelines.delta_files import add_action
from pipelines.storage import Location, StorageError, credentials_hint, s3_endpoint, write_parquet

APP_ID = "mga"
INFO_KEY = "mga"
COPIES_KEY = "mga_copies"  # a commit's copies of retired files (pipelines.rewrites), beside INFO_KEY
HISTORY_SCAN = 100  # commits searched for our metadata below foreign ones (OPTIMIZE, VACUUM)


class TableNotFound(StorageError):
    """A URI that holds no Delta table."""


class TableConflict(StorageError):
    """Another writer committed to the table while this job ran; nothing of this job was committed."""


def storage_options(location: Location) -> dict[str, str]:
    """deltalake's options for `location`: the S3 endpoint and region from the usual AWS variables.

    delta-rs >= 1.0 commits to S3 with conditional writes (If-None-Match), so concurrent
    writers are safe without a locking service; credentials come from the environment.
    """
    if not location.is_s3:
        return {}
    options: dict[str, str] = {}
    endpoint = s3_endpoint()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"https://{endpoint}"
        if options["AWS_ENDPOINT_URL"].startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return options


def _first_line(error: Exception) -> str:
    """deltalake's messages run over many lines (and colour codes); the first says what failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _delta_error(location: Location, error: Exception) -> StorageError:
    return StorageError(f"cannot read {location.uri}: {_first_line(error)}{credentials_hint(location.uri)}")


def _delta_table(location: Location, version: int | None = None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(location.uri, version=version, storage_options=storage_options(location))
    except TableNotFoundError:
        raise TableNotFound(
            f"{location.uri} is not a Delta table (wrong path, or the job that writes it has not committed){credentials_hint(location.uri)}"
        ) from None
    except OSError as error:
        raise _delta_error(location, error) from error
    except Exception as error:  # deltalake raises its own DeltaError for a version that does not exist
        if "version" in str(error).lower() and version is not None:
            raise StorageError(f"{location.uri} has no version {version}: {_first_line(error)}") from None
        raise _delta_error(location, error) from error


def _file_path(location: Location, path: str) -> str:
    """An Add action's path (relative and URL-encoded, or an absolute URI) as a path on `location.fs`."""
    if "://" in path:
        parsed = urlparse(path)
        return unquote(parsed.path) if parsed.scheme == "file" else unquote(parsed.netloc + parsed.path)
    return posixpath.join(location.path, unquote(path))


class _SortedValues(tuple):
    """A condition's values, sorted and unique: sorted once for every file and row group a
    listing prunes (216k candidate ids sorted again for each file cost a search 0.65 s)."""


def _sorted_conditions(where: Iterable[tuple[str, Iterable[str]]]) -> list[tuple[str, _SortedValues]]:
    return [(column, values if isinstance(values, _SortedValues) else _SortedValues(sorted(set(values)))) for column, values in where]


def _may_hold(wanted: Sequence[Any], low: Any, high: Any) -> bool:
    """Whether sorted `wanted` has a value in [low, high] (unknown bounds: maybe)."""
    if low is None or high is None:
        return True
    first = bisect.bisect_left(wanted, low)
    return first < len(wanted) and wanted[first] <= high


@dataclass(frozen=True)
class Snapshot:
    """One version of a Delta table: its files (with the stats readers prune on) and our metadata."""

    location: Location
    version: int
    info: dict[str, Any]
    files: pa.Table = field(repr=False)  # path (on location.fs), size_bytes, num_records, min.<col>, max.<col>

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def rows(self) -> int:
        return int(pc.sum(self.files.column("num_records")).as_py() or 0) if self.files.num_rows else 0

    def paths(self, *where: tuple[str, Iterable[str]]) -> list[str]:
        """The data files that may hold rows with `column in values` for every condition.

        A file is skipped when its min/max statistics of a column leave out every value (one
        binary search per file); files without statistics are always read.
        """
        keep = [True] * self.files.num_rows
        for column, wanted in _sorted_conditions(where):
            if f"min.{column}" not in self.files.column_names:
                continue
            lows, highs = self.files.column(f"min.{column}").to_pylist(), self.files.column(f"max.{column}").to_pylist()
            keep = [kept and _may_hold(wanted, low, high) for kept, low, high in zip(keep, lows, highs)]
        return [path for path, kept in zip(self.files.column("path").to_pylist(), keep) if kept]

    def pieces(self, *where: tuple[str, Iterable[str]]) -> list[tuple[str, list[int]]]:
        """(path, row groups) of the data files that may hold rows with `column in values` for
        every condition: the files by `paths`, then their row groups by their footers'
        statistics (`row_groups`); a file with no such row group is left out."""
        where = _sorted_conditions(where)
        return [(path, groups) for path in self.paths(*where) if (groups := row_groups(self.location, path, where))]

    def runs(self, *where: tuple[str, Iterable[str]], max_rows: int) -> list[tuple[str, tuple[int, ...]]]:
        """(path, row groups) pieces of at most `max_rows` rows (`row_group_runs`) that may hold
        rows with `column in values` for every condition, by file and row-group statistics."""
        where = _sorted_conditions(where)
        return [(path, run) for path in self.paths(*where) for run in row_group_runs(self.location, path, where, max_rows)]

    def only(self, paths: Iterable[str]) -> "Snapshot":
        """This version restricted to the data files `paths` (a reader that knows where its rows are)."""
        keep = pc.is_in(self.files.column("path"), value_set=pa.array(sorted(set(paths)), pa.string()))
        return Snapshot(self.location, self.version, self.info, self.files.filter(keep))

    def bytes(self, paths: Iterable[str]) -> int:
        sizes = dict(zip(self.files.column("path").to_pylist(), self.files.column("size_bytes").to_pylist()))
        return sum(sizes[path] for path in paths)


def open_table(location: Location, version: int | None = None) -> Snapshot:
    """The current (or the given) version of the Delta table at `location`."""
    table = _delta_table(location)
    try:
        latest = table.version()
        # History from the latest version: deltalake 1.6 numbers the history of a table
        # loaded at an older version wrongly (counting down from that version).
        history = table.history(latest - (latest if version is None else version) + HISTORY_SCAN)
        if version is not None and version != latest:
            del table
            table = _delta_table(location, version)
        protocol = table.protocol()
        if "deletionVectors" in (protocol.reader_features or []):
            raise StorageError(f"{location.uri} uses deletion vectors, which this pipeline does not read: run OPTIMIZE/REORG PURGE on it first")
        files = pa.table(table.get_add_actions(flatten=True))
        resolved = table.version()
        history = [entry for entry in history if entry.get("version", resolved) <= resolved]
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - deltalake's errors carry the cause; name the table
        raise _delta_error(location, error) from error
    del table
    info = next((entry[INFO_KEY] for entry in history if isinstance(entry.get(INFO_KEY), dict)), {})
    paths = pa.array([_file_path(location, path) for path in files.column("path").to_pylist()], pa.string())
    files = files.set_column(files.column_names.index("path"), "path", paths)
    return Snapshot(location, resolved, info, files)


def commit_history(location: Location, after: int, upto: int) -> list[dict[str, Any]]:
    """The log's commit entries (commitInfo, with our custom metadata) of the versions after
    `after` up to `upto`, newest first; the entries of a log cleaned up since are missing."""
    table = _delta_table(location)
    try:
        entries = table.history(table.version() - after)
    except Exception as error:  # noqa: BLE001 - deltalake's errors carry the cause; name the table
        raise _delta_error(location, error) from error
    finally:
        del table
    return [entry for entry in entries if after < int(entry.get("version", -1)) <= upto]


def companion(location: Location, name: str) -> Location:
    """The table kept beside `location` for one of its parts (`<uri>_rejects`, `<uri>_positives`).

    A Delta table cannot hold another inside it, and a reader of the main table must never
    see the companion's rows; the main table's commit names the companion and its version.
    """
    return Location(location.fs, f"{location.path.rstrip('/')}_{name}", f"{location.uri.rstrip('/')}_{name}")


def table_exists(location: Location) -> bool:
    try:
        return location.join("_delta_log").exists() and bool(location.fs.get_file_info(pafs.FileSelector(location.join("_delta_log").path)))
    except (OSError, StorageError):
        return False


def row_groups(location: Location, path: str, where: Iterable[tuple[str, Iterable[str]]]) -> list[int]:
    """The row groups of one Parquet file whose min/max statistics may hold every `column in values`."""
    return [group for group, _ in _kept_row_groups(pq.read_metadata(path, filesystem=location.fs), where)]


def row_group_runs(location: Location, path: str, where: Iterable[tuple[str, Iterable[str]]], max_rows: int) -> list[tuple[int, ...]]:
    """`row_groups` of one file, in order, in runs of at most `max_rows` rows (a larger group is
    a run of its own): what one reader call takes, whatever the writer's row group size
    (`mga embed` writes a group per batch of 64 rows)."""
    runs: list[list[int]] = []
    rows = 0
    for group, count in _kept_row_groups(pq.read_metadata(path, filesystem=location.fs), where):
        if not runs or rows + count > max_rows:
            runs.append([])
            rows = 0
        runs[-1].append(group)
        rows += count
    return [tuple(run) for run in runs]


def _kept_row_groups(metadata: pq.FileMetaData, where: Iterable[tuple[str, Iterable[str]]]) -> list[tuple[int, int]]:
    """(row group, rows) of the groups whose statistics may hold every `column in values`."""
    names = metadata.schema.to_arrow_schema().names
    conditions = [(names.index(column), values) for column, values in _sorted_conditions(where) if column in names]
    kept = []
    for group in range(metadata.num_row_groups):
        chunks = metadata.row_group(group)
        if all(_may_hold(wanted, *_bounds(chunks.column(index).statistics)) for index, wanted in conditions):
            kept.append((group, chunks.num_rows))
    return kept


def _bounds(statistics) -> tuple[Any, Any]:
    return (statistics.min, statistics.max) if statistics is not None and statistics.has_min_max else (None, None)


def read_table(snapshot: Snapshot, columns: list[str] | None = None, filter: pads.Expression | None = None, *where: tuple[str, Iterable[str]]) -> pa.Table:
    """Rows of `snapshot` as one Arrow table (small tables and column subsets).

    With `where`, only the files and then the row groups whose statistics may hold the
    values are read (pyarrow's own pushdown does not prune row groups on a long `is_in`).
    """
    paths = snapshot.paths(*where)
    fs = snapshot.location.fs
    try:
        if not paths:
            schema = pq.read_schema(snapshot.files.column("path")[0].as_py(), filesystem=fs) if snapshot.files.num_rows else None
            if schema is None:
                raise StorageError(f"{snapshot.uri} (version {snapshot.version}) has no data files")
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        if not where:
            return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)
        parquet = pads.ParquetFileFormat()
        fragments = [parquet.make_fragment(path, filesystem=fs, row_groups=groups) for path, groups in snapshot.pieces(*where)]
        schema = pq.read_schema(paths[0], filesystem=fs)
        return pads.FileSystemDataset(fragments, schema, parquet, fs).to_table(columns=columns, filter=filter)
    except OSError as error:  # a file vacuumed under an old version, an S3 outage
        raise StorageError(f"cannot read {snapshot.uri} (version {snapshot.version}): {error}{credentials_hint(snapshot.uri)}") from error


def read_files(snapshot: Snapshot, columns: list[str]) -> pa.Table:
    """Every row of `snapshot`, `columns` only, whole files read side by side: on files of many
    small row groups (embed's 64 rows: a dataset scan pays per group) ~2.5x read_table's speed."""
    def read(path: str) -> pa.Table:
        with pq.ParquetFile(path, filesystem=snapshot.location.fs) as file:
            return file.read(columns=columns, use_threads=False)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return pa.concat_tables(pool.map(read, snapshot.files.column("path").to_pylist()))
    except OSError as error:  # a file vacuumed under an old version, an S3 outage
        raise StorageError(f"cannot read {snapshot.uri} (version {snapshot.version}): {error}{credentials_hint(snapshot.uri)}") from error


class TableWriter:
    """Writes one job's output into a table: files in a run directory, then one commit.

    Used as a context manager: a job that raises (or is interrupted) deletes its run's files.
    """

    def __init__(self, location: Location) -> None:
        self.location = location
        self.base = open_table(location) if table_exists(location) else None
        self.run = location.join(f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.abort()

    def file(self, name: str) -> Location:
        """Where to write the run's file (or directory) `name`; its parent exists."""
        location = self.run.join(name)
        if location.is_s3:  # object stores need no directories (pyarrow would write marker objects)
            return location
        try:
            self.location.fs.create_dir(posixpath.dirname(location.path), recursive=True)
        except OSError as error:
            raise StorageError(f"cannot write {self.run.uri}: {error}{credentials_hint(self.run.uri)}") from error
        return location

    def discard(self, name: str) -> None:
        """Delete the run's directory `name` (staging the job has gathered), so no commit takes it."""
        location = self.run.join(name)
        try:
            if self.location.fs.get_file_info(location.path).type != pafs.FileType.NotFound:
                self.location.fs.delete_dir(location.path)
        except OSError as error:
            raise StorageError(f"cannot delete {location.uri}: {error}{credentials_hint(location.uri)}") from error

    def written(self) -> list[str]:
        """The Parquet files below the run directory (on the table's filesystem), sorted."""
        try:
            infos = self.location.fs.get_file_info(pafs.FileSelector(self.run.path, recursive=True, allow_not_found=True))
        except OSError as error:
            raise StorageError(f"cannot list {self.run.uri}: {error}{credentials_hint(self.run.uri)}") from error
        return sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet"))

    def commit(self, schema: pa.Schema, info: dict[str, Any], files: list[str] | None = None, remove: Iterable[str] | None = None,
               copies: dict[str, str] | None = None) -> Snapshot:
        """Commit `files` (default: everything written) as the table's next version.

        With `remove` None the new files replace the table's content (overwrite); otherwise
        they are added and the files in `remove` retired (a merge: the rest stays as it is).
        `copies` maps written files to the retired files they copy less some rows (their
        lineage, pipelines.rewrites). Raises TableConflict when another job committed since
        this writer opened the table.
        """
        from deltalake import DeltaTable
        from deltalake.schema import Schema
        from deltalake.transaction import CommitProperties, RemoveAction, Transaction, create_table_with_add_actions

        paths = self.written() if files is None else files
        if remove is not None and not paths and not list(remove) and self.base is not None:
            return self.base  # a merge that changes nothing makes no version
        if not paths and remove is None:  # an empty but readable table: readers still get the schema
            empty = self.file("part-empty.parquet")
            write_parquet(empty, schema.empty_table())
            paths = [empty.path]
        with ThreadPoolExecutor(max_workers=8) as pool:
            adds = list(pool.map(lambda path: add_action(self.location, path), paths))
        read_version = self.base.version if self.base else -1
        properties = CommitProperties(
            custom_metadata={
                INFO_KEY: json.loads(json.dumps(info, default=str)),
                **({COPIES_KEY: {self._relative(copy): self._relative(source) for copy, source in copies.items()}} if copies else {}),
            },
            app_transactions=[Transaction(APP_ID, read_version + 1)],
        )
        try:
            if self.base is None:
                create_table_with_add_actions(
                    self.location.uri, Schema.from_arrow(schema), adds, mode="error",
                    storage_options=storage_options(self.location), commit_properties=properties,
                )
            else:
                table = DeltaTable(self.location.uri, version=self.base.version, storage_options=storage_options(self.location))
                if remove is not None:
                    now = int(time.time() * 1000)
                    retired = [RemoveAction(posixpath.relpath(path, self.location.path), True, now) for path in remove]
                    table.create_write_transaction([*retired, *adds], "append", schema, commit_properties=properties)
                else:
                    table.create_write_transaction(adds, "overwrite", schema, commit_properties=properties)
                del table
        except Exception as error:  # noqa: BLE001 - classified below; the message names the table
            raise self._commit_error(error) from error
        return open_table(self.location)

    def _relative(self, path: str) -> str:
        return posixpath.relpath(path, self.location.path)

    def _commit_error(self, error: Exception) -> StorageError:
        text = _first_line(error)
        conflict = type(error).__name__ == "CommitFailedError" or "already exists" in text or "concurrent" in text.lower()
        if not conflict:
            return StorageError(f"cannot commit to {self.location.uri}: {text}{credentials_hint(self.location.uri)}")
        try:
            latest = _delta_table(self.location).version()
        except StorageError:
            latest = None
        started = f"version {self.base.version}" if self.base else "no table"
        return TableConflict(
            f"{self.location.uri}: another job committed version {latest} while this one ran (it started from {started}); "
            f"nothing of this run was committed ({text}): run it again"
        )

    def abort(self) -> None:
        """Delete this run's files (a failed job's); no version lists them. Best effort."""
        try:
            self.location.fs.delete_dir(self.run.path)
        except OSError:
            pass


def vacuum(location: Location, retain_hours: float) -> list[str]:
    """Delete the files no version younger than `retain_hours` reads, and older orphans.

    The current version's files are never deleted. Orphans are files no version lists (a
    killed job's run directory): deleted once older than the horizon, so a horizon shorter
    than a running job would delete the files it has not committed yet.
    """
    from deltalake.transaction import CommitProperties

    if retain_hours < 0:
        raise InputError(f"--retain-hours must be non-negative, got {retain_hours}")
    info = open_table(location).info
    table = _delta_table(location)
    try:
        deleted = table.vacuum(
            retention_hours=int(retain_hours), dry_run=False, enforce_retention_duration=False, full=True,
            commit_properties=CommitProperties(custom_metadata={INFO_KEY: info}) if info else None,
        )
    except Exception as error:  # noqa: BLE001 - deltalake's own errors; name the table
        raise StorageError(f"cannot vacuum {location.uri}: {_first_line(error)}") from error
    finally:
        del table
    _remove_empty_run_dirs(location)
    return list(deleted)


def _remove_empty_run_dirs(location: Location) -> None:
    """Local disk keeps the directories vacuum emptied (object stores have none)."""
    if location.is_s3:
        return
    for info in location.fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("run-"):
            inside = location.fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
            if not any(entry.type == pafs.FileType.File for entry in inside):
                location.fs.delete_dir(info.path)
