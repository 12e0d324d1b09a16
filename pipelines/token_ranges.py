"""A few rows' vectors (tokens, global features) from a features file by byte ranges, without
decoding their row group.

The token scan of a search needs the tokens of its candidates only: at 1M gallery images and
1,000 queries reranking 50 each, at most 5% of the rows. Decoding whole row groups reads
nearly all of the tokens anyway (the candidates are spread over every row group), so the
features table's writers (`parquet_options`) store each `tokens_*` column chunk as one
uncompressed PLAIN data page. Its values then lie at the end of the page, row after row, at a
fixed stride: float32 tokens (a fixed-size list) `width` values a row, float16 tokens (binary
halves, schemas.token_type) a 4-byte length and `2 * width` bytes a row. So row `i` starts at
`end - (rows - i) * stride`. The file stays ordinary Parquet (DuckDB, Spark and pandas read it as
before); only the search uses the layout, and only where a column chunk's metadata and page
header prove it holds (`locate`; every length read is checked too): a file written otherwise
(compressed, dictionary-encoded, several pages, null tokens) is read as before, by row group.

The `global` column is laid out the same way, for speed rather than selectivity: a whole row
group's global features are one read at disk speed, where Arrow decodes a fixed-size list's
levels value by value (250,000 rows of D = 512 in row groups of 64: 1.25 s against 3.9 s), and
the positives of a chunk's queries are a few rows of it.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.schemas import column_matrix

# One page per token column chunk: larger than any row group's token column (a 2 GiB page is Parquet's limit).
SINGLE_PAGE_BYTES = 1 << 30
# A page header is tens of bytes (type, sizes, statistics of two float16 values): a larger gap
# between the page's size and the column chunk's means more pages.
MAX_HEADER_BYTES = 1024
# Candidate rows closer than this are read in one range: fewer requests for a few bytes more.
MERGE_GAP_BYTES = 4096
# Range requests of a fragment in flight at once (a local SSD's queue, an object store's connections).
RANGE_READS = 16


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """pyarrow Parquet writer options for a features table: the vector columns (`global`,
    `tokens_*`) uncompressed, PLAIN, one page per column chunk (the layout `locate` reads by
    ranges; random-looking floats gain nothing from compression), every other column zstd.
    Binary (float16) tokens get no statistics: a page header would carry two whole rows as min/max."""
    tokens = [name for name in schema.names if name.startswith("tokens_")]
    vectors = {"global", *tokens}
    # By leaf path: pyarrow matches per-column settings of a list against "global.list.element", not "global".
    leaves = {path: field.name for field in schema for path in _leaf_paths(field)}
    return {
        "compression": {path: "none" if name in vectors else "zstd" for path, name in leaves.items()},
        "use_dictionary": [path for path, name in leaves.items() if name not in vectors],
        "column_encoding": {path: "PLAIN" for path, name in leaves.items() if name in vectors},
        "write_statistics": [path for path, name in leaves.items() if not (name in tokens and pa.types.is_binary(schema.field(name).type))],
        "data_page_size": SINGLE_PAGE_BYTES,
    }


def _leaf_paths(field: pa.Field) -> list[str]:
    """The Parquet leaf column paths of an Arrow field (lists as written by pyarrow: `name.list.element`)."""
    if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type) or pa.types.is_large_list(field.type):
        return [f"{field.name}.list.{path}" for path in _leaf_paths(pa.field("element", field.type.value_type))]
    if pa.types.is_struct(field.type):
        return [f"{field.name}.{path}" for child in field.type for path in _leaf_paths(child)]
    return [field.name]


@dataclass(frozen=True)
class TokenChunk:
    """Where the rows of one row group's token column lie: row `i` at `start + i * stride`, a
    `prefix`-byte length (binary values: 4, fixed-size lists: 0) and then `width` values."""

    start: int
    stride: int
    prefix: int
    width: int
    dtype: np.dtype


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _first_page_size(header: bytes) -> int | None:
    """The compressed size of the data page whose Thrift (compact) header starts `header`:
    PageHeader fields 1 (type), 2 (uncompressed size) and 3 (compressed size), i32 each."""
    fields, field, at = {}, 0, 0
    try:
        for _ in range(3):
            kind = header[at]
            at += 1
            if kind & 0x0F != 5:  # compact type i32
                return None
            field += kind >> 4
            value, at = _varint(header, at)
            fields[field] = (value >> 1) ^ -(value & 1)
    except IndexError:
        return None
    if fields.get(1) not in (0, 3):  # DATA_PAGE or DATA_PAGE_V2
        return None
    return fields.get(3)


def locate(file: pa.NativeFile, metadata: pq.FileMetaData, group: int, column: str, column_type: pa.DataType, width: int) -> TokenChunk | None:
    """Where row group `group`'s token `column` (`column_type`: a fixed-size float list, or binary
    halves; `width` values a row) keeps its rows, or None unless it is one uncompressed PLAIN page
    without nulls (checked on the metadata and the page's header: one small read)."""
    row_group = metadata.row_group(group)
    chunk = next(iter(_column_chunks(row_group, [column])), None)
    if chunk is None or chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or not set(chunk.encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}:
        return None
    rows = row_group.num_rows
    if pa.types.is_binary(column_type):
        dtype, prefix, per_row = np.dtype("<f2"), 4, 1
    elif pa.types.is_fixed_size_list(column_type):
        dtype, prefix, per_row = np.dtype(column_type.value_type.to_pandas_dtype()), 0, width
        # A null list or element would leave its values out of the page.
        if not chunk.is_stats_set or chunk.statistics.null_count != 0:
            return None
    else:
        return None
    if chunk.num_values != rows * per_row:
        return None
    stride = prefix + width * dtype.itemsize
    page_size = _first_page_size(file.read_at(32, chunk.data_page_offset))
    if page_size is None or not 0 < chunk.total_compressed_size - page_size <= MAX_HEADER_BYTES:
        return None  # not one data page
    # The page is its levels, then the values: fewer bytes than `rows` rows means a row is missing.
    levels = page_size - rows * stride
    if levels < 0 or (prefix and levels > 64 + rows // 4):
        return None
    end = chunk.data_page_offset + chunk.total_compressed_size
    return TokenChunk(end - rows * stride, stride, prefix, width, dtype)


@dataclass(frozen=True)
class RowReads:
    """How some rows of a TokenChunk are read: neighbouring rows (closer than MERGE_GAP_BYTES)
    in one range. `requests` are the ranges' (bytes, offset); `values` cuts the rows out of what
    they returned."""

    chunk: TokenChunk
    rows: np.ndarray  # sorted row indices of the row group
    starts: np.ndarray  # position in `rows` of each range's first row
    firsts: np.ndarray  # each range's first and last row
    lasts: np.ndarray

    @classmethod
    def of(cls, chunk: TokenChunk, rows: np.ndarray) -> "RowReads":
        gap_rows = max(1, MERGE_GAP_BYTES // chunk.stride + 1)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) > gap_rows) + 1])
        return cls(chunk, rows, starts, rows[starts], rows[np.concatenate([starts[1:], [len(rows)]]) - 1])

    @property
    def requests(self) -> list[tuple[int, int]]:
        stride, start = self.chunk.stride, self.chunk.start
        return [(int(last - first + 1) * stride, start + int(first) * stride) for first, last in zip(self.firsts, self.lasts)]

    def values(self, buffers: list[Any]) -> tuple[np.ndarray, int]:
        """([rows, width] values, bytes read) from the buffers the requests returned, in order.
        A length that is not the row's (a file not laid out as `locate` found) raises ValueError."""
        chunk, rows, firsts = self.chunk, self.rows, self.firsts
        block = np.concatenate([np.frombuffer(buffer, np.uint8) for buffer in buffers]).reshape(-1, chunk.stride)
        if len(block) != len(rows):  # rows skipped inside the ranges: row r of run j is (r - firsts[j]) strides into it
            run_offsets = np.concatenate([[0], np.cumsum(self.lasts - firsts + 1)[:-1]])
            run_of_row = np.repeat(np.arange(len(self.starts)), np.diff(np.concatenate([self.starts, [len(rows)]])))
            block = block[run_offsets[run_of_row] + rows - firsts[run_of_row]]
        if chunk.prefix and not (block[:, :4].copy().view("<u4") == chunk.stride - 4).all():
            bad = int(rows[np.flatnonzero(block[:, :4].copy().view("<u4")[:, 0] != chunk.stride - 4)[0]])
            raise ValueError(f"token row {bad}: its length is not {chunk.stride - 4} bytes")
        values = block[:, chunk.prefix:].copy() if chunk.prefix else block  # (block is a new array already)
        return values.view(chunk.dtype), sum(len(buffer) for buffer in buffers)


@contextmanager
def ranged_file(fs: Any, path: str) -> Iterator[pa.NativeFile]:
    """`path` opened for reads by byte ranges. On a local disk the kernel is told the access is
    random: its sequential readahead (8 MB on the benches' disk) turned one column's ranges,
    row group after row group, into reads of the whole file (measured with the page cache: 99%
    of a features table's bytes for its global column alone, 26% without)."""
    if not isinstance(fs, pafs.LocalFileSystem):  # object storage reads what a range asks
        with fs.open_input_file(path) as file:
            yield file
        return
    with pa.OSFile(path) as file:  # (the filesystem's own files give no descriptor)
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        yield file


def fragment_rows(file: pa.NativeFile, fragment: pads.ParquetFileFragment, wanted: np.ndarray | None, names: list[str], width: int) -> tuple[list[np.ndarray], int]:
    """The `wanted` rows (a mask over the fragment's rows; None: every row) of its vector columns
    `names` (`width` values a row), one [rows, width] array per column as stored (float16 or
    float32), and the bytes read: by byte ranges where a row group's layout allows (`locate`),
    else by decoding the row group.

    The page headers, then the rows' ranges, are fetched RANGE_READS requests at a time: a few
    candidates a row group make thousands of small reads a piece, each paying the disk's (or an
    object store's) latency; one after another they were half the token scan's time at 1M
    gallery images (cold, 75 us a read)."""
    metadata, schema = fragment.metadata, fragment.physical_schema
    bounds = np.concatenate([[0], np.cumsum([group.num_rows for group in fragment.row_groups])])
    groups = [(group, rows) for index, group in enumerate(fragment.row_groups)
              if len(rows := np.arange(group.num_rows) if wanted is None else np.flatnonzero(wanted[bounds[index]:bounds[index + 1]]))]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    bytes_read = 0
    # The threads only fetch and parse page headers (Arrow's ReadAt is thread-safe, releases the
    # GIL and allocates from Arrow's pool); the rows are cut out here: numpy's copies made on 16
    # threads spread over 16 malloc arenas, +0.57 GiB of peak memory in a search of 10^4 queries
    # against 250k images.
    pool = _range_readers()
    located = list(pool.map(lambda job: [locate(file, metadata, job[0].id, name, schema.field(name).type, width) for name in names], groups))
    plans = [[RowReads.of(chunk, rows) for chunk in chunks] if all(chunk is not None for chunk in chunks) else None
             for (_, rows), chunks in zip(groups, located)]
    buffers = _fetched(pool, file, [request for reads in plans if reads is not None for read in reads for request in read.requests])
    for (group, rows), reads in zip(groups, plans):
        if reads is not None:
            for part, read in zip(parts, reads):
                values, count = read.values([next(buffers) for _ in read.firsts])  # a buffer a range
                part.append(values)
                bytes_read += count
            continue
        decoded = fragment.subset(row_group_ids=[group.id]).to_table(columns=names)
        if len(rows) < group.num_rows:
            decoded = decoded.take(pa.array(rows))
        for part, name in zip(parts, names):
            part.append(np.array(column_matrix(decoded, name, (width,), stored=True)))  # writable, as RowReads.values's
        bytes_read += column_bytes(metadata, group.id, names)
    empty = [np.zeros((0, width), np.float32)]
    return [np.concatenate(part or empty) if len(part) != 1 else part[0] for part in parts], bytes_read


@functools.cache
def _range_readers() -> ThreadPoolExecutor:
    """The process's RANGE_READS fetching threads, started at the first ranged read and shared
    by all (a pool a call cost 1.4 ms of thread starts, 6x a small fragment's read)."""
    return ThreadPoolExecutor(RANGE_READS, thread_name_prefix="ranged-reads")


def _fetched(pool: ThreadPoolExecutor, file: pa.NativeFile, requests: list[tuple[int, int]]) -> Iterator[Any]:
    """What each (bytes, offset) request reads, in order, with up to 8 x RANGE_READS requests in
    flight: the buffers waiting to be cut out stay at most 128 ranges (16 MB of whole 64-row
    global ranges), not a piece's whole tokens."""
    pending: deque[Future] = deque()
    for request in requests:
        pending.append(pool.submit(file.read_at, *request))
        if len(pending) >= 8 * RANGE_READS:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def column_bytes(metadata: pq.FileMetaData, group: int, names: list[str]) -> int:
    """The stored size of row group `group`'s columns `names` (all their leaves): what decoding them reads."""
    return sum(chunk.total_compressed_size for chunk in _column_chunks(metadata.row_group(group), names))


def _column_chunks(row_group: pq.RowGroupMetaData, names: list[str]) -> list[pq.ColumnChunkMetaData]:
    """The column chunks (every leaf) of the top-level columns `names` in a row group."""
    return [chunk for index in range(row_group.num_columns) if (chunk := row_group.column(index)).path_in_schema.split(".")[0] in names]


def stored_bytes(fs: Any, pieces: list[tuple[str, Any]], names: list[str]) -> int:
    """The stored size of the columns `names` in the row groups of `pieces` ((path, row groups));
    each file's footer is read once."""
    groups: dict[str, set[int]] = {}
    for path, piece_groups in pieces:
        groups.setdefault(path, set()).update(piece_groups)
    total = 0
    for path, kept in groups.items():
        metadata = pq.read_metadata(path, filesystem=fs)
        total += sum(column_bytes(metadata, group, names) for group in kept)
    return total
