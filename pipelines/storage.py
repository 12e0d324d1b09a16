"""URIs, filesystems and published tables.

Every table the pipeline writes (catalog, features, rankings) is a directory holding
immutable snapshots and one `_manifest.json`:

    URI/_manifest.json          written last; names the current snapshot and its files
    URI/v-<utc time>-<id>/...   the Parquet files of one snapshot

A writer fills a fresh snapshot directory and then publishes the manifest with a single
atomic operation (a rename on local disk, one PUT on S3), so a reader that goes through
the manifest never sees a half-written table. The previous snapshot is kept for readers
still holding the old manifest; older ones are deleted (see _delete_old_snapshots).

A failed writer deletes its own snapshot (discard_snapshot); a killed one leaves it, unlisted
in any manifest, for a later publish to remove.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
SNAPSHOT_PREFIX = "v-"
TABLE_FORMAT = "mga-table/1"

# S3 settings a local Ray instance forwards to its workers in their runtime env
# (pipelines.runtime.init_ray). Credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN) are deliberately NOT listed: Ray writes a runtime env verbatim into its
# logs (runtime_env_agent.log), and a local instance's workers inherit the driver's
# environment anyway, credentials included. On a cluster, credentials come from the pods'
# secrets or roles (cluster/README.md), never from this list.
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    # Retry and timeout settings of pyarrow's S3 client (see s3_filesystem).
    "MGA_S3_MAX_ATTEMPTS",
    "MGA_S3_CONNECT_TIMEOUT",
    "MGA_S3_REQUEST_TIMEOUT",
)

# Where the AWS SDK's default chain finds credentials without asking a metadata service.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


class StorageError(RuntimeError):
    """A URI that cannot be read or written, with the URI in the message."""


class TableNotFound(StorageError):
    """A table URI without a published manifest."""


@dataclass(frozen=True)
class Location:
    """A directory or file on a filesystem: `path` has no scheme, `uri` is what the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri.rstrip("/"), *parts)
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        try:
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound
        except OSError as error:
            raise StorageError(f"cannot read {self.uri}: {error}{credentials_hint(self.uri)}") from error

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as error:
            raise StorageError(f"cannot read {self.uri}: {error}{credentials_hint(self.uri)}") from error

    def write_bytes(self, data: bytes) -> None:
        try:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {self.uri}: {error}{credentials_hint(self.uri)}") from error


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def credentials_hint(uri: str) -> str:
    """For errors on s3:// URIs: a note when no AWS credentials are configured, else ""."""
    if not uri.startswith("s3://") or any(os.environ.get(name) for name in _CREDENTIAL_VARS):
        return ""
    if os.path.exists(os.path.expanduser("~/.aws/credentials")) or os.path.exists(os.path.expanduser("~/.aws/config")):
        return ""
    return (
        " (no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
        "or run where an instance or pod role provides them)"
    )


def _env_number(name: str, default: float, kind: type = float) -> Any:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise StorageError(f"${name}={text!r}: expected a positive number") from None
    if value <= 0:
        raise StorageError(f"${name}={text!r}: expected a positive number")
    return value


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from the usual AWS variables.

    pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly. Every request
    is retried (AWS "standard" strategy, exponential backoff) up to $MGA_S3_MAX_ATTEMPTS
    times (default 5), connecting gives up after $MGA_S3_CONNECT_TIMEOUT seconds (10) and
    a request after $MGA_S3_REQUEST_TIMEOUT seconds (60): an endpoint that stops answering
    for less than that is waited out; one that stays down fails the job with an error
    naming the URI, and nothing is published.
    """
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_env_number("MGA_S3_MAX_ATTEMPTS", 5, int)),
        "connect_timeout": _env_number("MGA_S3_CONNECT_TIMEOUT", 10.0),
        "request_timeout": _env_number("MGA_S3_REQUEST_TIMEOUT", 60.0),
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        if parsed.scheme == "http":
            kwargs["allow_bucket_creation"] = True
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Location:
    """A local path or `s3://bucket/prefix` as a filesystem and a path on it."""
    if not uri:
        raise StorageError("empty URI")
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
        return Location(s3_filesystem(), path, "s3://" + path)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)


def list_files(location: Location, suffix: str = "") -> list[str]:
    """Paths of the files below `location`, sorted, hidden (`_` or `.`) names skipped."""
    try:
        infos = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"cannot list {location.uri}: {error}{credentials_hint(location.uri)}") from error
    files = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(suffix):
            continue
        relative = posixpath.relpath(info.path, location.path)
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        files.append(info.path)
    return sorted(files)


def new_snapshot(table: Location) -> Location:
    """A fresh, empty snapshot directory under `table` to write a new version into."""
    name = f"{SNAPSHOT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    snapshot = table.join(name)
    try:
        table.fs.create_dir(snapshot.path, recursive=True)
    except OSError as error:
        raise StorageError(f"cannot write {table.uri}: {error}{credentials_hint(table.uri)}") from error
    return snapshot


def discard_snapshot(snapshot: Location) -> None:
    """Delete an unpublished snapshot (a failed job's); readers never saw it. Best effort."""
    try:
        snapshot.fs.delete_dir(snapshot.path)
    except OSError:
        pass


def read_manifest(table: Location) -> dict[str, Any]:
    manifest = table.join(MANIFEST)
    if not manifest.exists():
        raise TableNotFound(
            f"{table.uri} has no {MANIFEST}: it is not a published table "
            f"(wrong path, or the job that writes it has not finished){credentials_hint(table.uri)}"
        )
    try:
        return json.loads(manifest.read_bytes())
    except json.JSONDecodeError as error:
        raise StorageError(f"{manifest.uri} is not valid JSON: {error}") from error


def publish(table: Location, snapshot: Location, manifest: dict[str, Any], files: Iterable[str] | None = None) -> dict[str, Any]:
    """Make `snapshot` the table's current version: write the manifest last, atomically.

    `files` defaults to every Parquet file in the snapshot; they are recorded relative to
    the table so the table can be moved or copied as a whole.
    """
    paths = list(files) if files is not None else list_files(snapshot, ".parquet")
    previous = read_manifest(table).get("snapshot") if table.join(MANIFEST).exists() else None
    body = {
        "format": TABLE_FORMAT,
        "snapshot": posixpath.basename(snapshot.path),
        "files": [posixpath.relpath(path, table.path) for path in paths],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **manifest,
    }
    data = json.dumps(body, indent=2, sort_keys=True, default=str).encode()
    target = table.join(MANIFEST)
    if isinstance(table.fs, pafs.LocalFileSystem):
        staging = table.join(f"_manifest.{uuid.uuid4().hex}.tmp")
        staging.write_bytes(data)
        os.replace(staging.path, target.path)
    else:
        target.write_bytes(data)
    _delete_old_snapshots(table, keep={body["snapshot"], previous})
    return body


def _delete_old_snapshots(table: Location, keep: set[str | None]) -> None:
    """Delete snapshots older than the oldest one kept (the previous published one).

    Snapshot names sort by the time their writer started, so a snapshot younger than the
    previous published one may belong to a writer still at work (a second job on the same
    table) and is left alone; a killed job's leftover is removed by a later publish.
    """
    oldest_kept = min(name for name in keep if name)
    infos = table.fs.get_file_info(pafs.FileSelector(table.path, recursive=False, allow_not_found=True))
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and name.startswith(SNAPSHOT_PREFIX) and name not in keep and name < oldest_kept:
            table.fs.delete_dir(info.path)


def table_files(table: Location, key: str = "files") -> list[str]:
    """Absolute paths (on `table.fs`) of the current snapshot's files listed under `key`."""
    manifest = read_manifest(table)
    return [posixpath.join(table.path, name) for name in manifest.get(key, [])]


def read_table(table: Location, columns: list[str] | None = None, key: str = "files", filter=None) -> pa.Table:
    """The current snapshot as one Arrow table (for small tables and column subsets)."""
    files = table_files(table, key)
    if not files:
        raise StorageError(f"{table.uri}: the published snapshot lists no files under {key!r}")
    try:
        dataset = pads.dataset(files, filesystem=table.fs, format="parquet")
        return dataset.to_table(columns=columns, filter=filter)
    except OSError as error:  # e.g. a snapshot deleted under an old manifest, an S3 outage
        raise StorageError(f"cannot read {table.uri}: {error}{credentials_hint(table.uri)}") from error


def write_parquet(location: Location, table: pa.Table, row_group_size: int | None = None) -> None:
    """Write one Parquet file (creating parent directories)."""
    try:
        parent = posixpath.dirname(location.path)
        if parent:
            location.fs.create_dir(parent, recursive=True)
        pq.write_table(table, location.path, filesystem=location.fs, row_group_size=row_group_size, compression="zstd")
    except OSError as error:
        raise StorageError(f"cannot write {location.uri}: {error}{credentials_hint(location.uri)}") from error


def write_json(location: Location, payload: dict[str, Any]) -> None:
    location.write_bytes(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
