"""URIs and filesystems: local paths and s3:// prefixes, with the errors that name them.

Tables themselves are Delta Lake tables (pipelines.tables); this module is what they and
the reports stand on: resolving a URI to a pyarrow filesystem, S3 settings, and small
file helpers.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mga.errors import MGAError

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


class StorageError(MGAError):
    """A URI that cannot be read or written, with the URI in the message."""


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


def credentials_configured() -> bool:
    """Whether this process has AWS credentials the SDK finds without a metadata service."""
    return any(os.environ.get(name) for name in _CREDENTIAL_VARS) or any(
        os.path.exists(os.path.expanduser(path)) for path in ("~/.aws/credentials", "~/.aws/config")
    )


def credentials_hint(uri: str) -> str:
    """For errors on s3:// URIs: a note when no AWS credentials are configured, else ""."""
    if not uri.startswith("s3://") or credentials_configured():
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


def write_parquet(location: Location, table: pa.Table, row_group_size: int | None = None, **parquet_options: Any) -> None:
    """Write one Parquet file (creating parent directories), zstd unless `parquet_options` say otherwise."""
    try:
        parent = posixpath.dirname(location.path)
        if parent and not location.is_s3:  # no directory marker objects inside tables on S3
            location.fs.create_dir(parent, recursive=True)
        pq.write_table(table, location.path, filesystem=location.fs, row_group_size=row_group_size, **{"compression": "zstd", **parquet_options})
    except OSError as error:
        raise StorageError(f"cannot write {location.uri}: {error}{credentials_hint(location.uri)}") from error


def write_json(location: Location, payload: dict[str, Any]) -> None:
    location.write_bytes(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
