"""Where a search's queries and gallery come from: the rows of features tables that pass a filter.

- `Gallery`: the rows of a features table that pass `--gallery-where` (default
  `split = 'gallery'`): the (file, row group) pieces the scans read, and the positives of a
  chunk's labelled queries.
- `QuerySource`: the rows of a features table (`--queries`, default the gallery's own) that
  pass `--queries-where` (default `split = 'query'`), streamed a chunk at a time in the
  table's file order: the driver holds one chunk (its global features, tokens and
  positives), never the queries as a whole, so its memory does not grow with them.
- `QueryChunk`: one chunk as the scans need it, built from feature rows; `mga query` builds
  one from the photos it has just embedded.

A query is labelled when its `item_id` is set: its positives are the gallery rows of its item,
found per chunk by a filtered read (file and row-group statistics on `item_id`, so the
gallery's other rows are not read). An unlabelled query (null `item_id`, a photo nobody has
matched yet) is ranked like any other and has no positives.

Filters (pipelines.filters) are pushed into every read: files and row groups whose statistics
exclude them are not read, and rows are filtered as they are read.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from mga.errors import InputError
from mga.global_scores import pair_scores
from pipelines.filters import RowFilter, parse_filter
from pipelines.schemas import arrow_tie_keys, column_matrix, token_columns
from pipelines.storage import StorageError, credentials_hint
from pipelines.tables import Snapshot
from pipelines.token_ranges import fragment_rows, ranged_file

# A piece of a table: consecutive row groups of one data file, read by one scanner call.
Piece = tuple[str, tuple[int, ...]]
PIECE_ROWS = 65536  # rows a piece holds at most (unless one row group is larger): 128 MB of D=512 features
MIN_PIECE_ROWS = 4096  # ... and at least, where a smaller gallery is cut finer to share it among the actors
READ_ROWS = 4096  # query rows decoded ahead of the chunk being filled (a fragment: whole row groups)
PAIR_BATCH = 8192  # (query, positive) pairs scored in float64 at a time: bounds the driver's memory


def piece_fragment(fs: Any, piece: Piece) -> pads.ParquetFileFragment:
    """The Parquet fragment of a piece: its file, only its row groups."""
    path, groups = piece
    return pads.ParquetFileFormat().make_fragment(path, filesystem=fs, row_groups=list(groups))


def features_table(snapshot: Snapshot) -> Snapshot:
    """`snapshot`, refused in one line unless `mga embed` wrote it."""
    if snapshot.info.get("table") != "features":
        raise InputError(f"{snapshot.uri} (version {snapshot.version}) was not written by `mga embed`: its commits carry no features metadata")
    return snapshot


@dataclass(frozen=True)
class Selection:
    """The rows of one version of a features table that pass a filter."""

    table: Snapshot
    where: RowFilter

    @functools.cached_property
    def key(self) -> str:
        """A short name of the selection, the same in every process (a scanner keeps the rows it
        read of it under this name)."""
        return hashlib.sha256(repr((self.table.uri, self.table.version, self.where.text, self.where.pruning)).encode()).hexdigest()[:16]

    def pieces(self, *more: tuple[str, list[str]], max_rows: int = PIECE_ROWS) -> list[Piece]:
        """The row groups that may hold selected rows (and rows with `column in values` for each of
        `more`), by the files' and row groups' statistics, in pieces of about `max_rows` rows."""
        try:
            return self.table.runs(*self.where.pruning, *more, max_rows=max_rows)
        except OSError as error:  # a footer that cannot be read: an S3 outage, a vacuumed file
            raise StorageError(f"cannot read {self.table.uri} (version {self.table.version}): {error}{credentials_hint(self.table.uri)}") from error

    def dataset(self, *more: tuple[str, list[str]], max_rows: int = PIECE_ROWS) -> pads.Dataset:
        """The files and row groups that may hold selected rows (and `more`, as `pieces`), as one
        dataset (filter it with `where.expression`) of fragments of about `max_rows` rows: a scan
        with `fragment_readahead=1` decodes about that many rows ahead (a whole file otherwise)."""
        fs = self.table.location.fs
        fragments = [piece_fragment(fs, piece) for piece in self.pieces(*more, max_rows=max_rows)]
        schema = pq.read_schema(self.table.files.column("path")[0].as_py(), filesystem=fs)
        return pads.FileSystemDataset(fragments, schema, pads.ParquetFileFormat(), fs)

    def restricted(self, ids: pa.Array, table: Snapshot | None = None) -> "Selection":
        """The selected rows whose `image_id` is in `ids` (of `table`: this version or another
        of the same table, e.g. restricted to some of its files), as a selection of this kind."""
        where = RowFilter(
            f"({self.where.text}) AND image_id IN <{len(ids)} ids>",
            self.where.expression & pc.field("image_id").isin(ids),
            (*self.where.pruning, ("image_id", tuple(ids.to_pylist()))),
        )
        return type(self)(table or self.table, where)

    def count(self) -> int:
        """How many rows are selected (reads only the filter's columns)."""
        try:
            return self.dataset().count_rows(filter=self.where.expression)
        except OSError as error:
            raise StorageError(f"cannot read {self.table.uri} (version {self.table.version}): {error}{credentials_hint(self.table.uri)}") from error

    def require_rows(self, option: str) -> None:
        """Refuse, in one line naming `option` and the filter, a selection that holds no row."""
        try:
            found = self.table.files.num_rows and self.dataset().head(1, columns=["image_id"], filter=self.where.expression).num_rows
        except OSError as error:
            raise StorageError(f"cannot read {self.table.uri} (version {self.table.version}): {error}{credentials_hint(self.table.uri)}") from error
        if not found:
            raise InputError(f"{self.table.uri} (version {self.table.version}): no row matches {option} {self.where.text!r}")


@dataclass
class Positives:
    """Every (query, gallery image of its item) pair of a chunk, sorted by query then gallery id:
    the query's row in the chunk, the pair's exact S_global (eq. 3), the image's tie key and id."""

    query: np.ndarray
    score: np.ndarray
    key: np.ndarray
    gallery_id: pa.Array

    @classmethod
    def empty(cls) -> "Positives":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), pa.array([], pa.string()))


class Gallery(Selection):
    """The gallery: the rows of a features table that pass `--gallery-where`."""

    def positives(self, items: pa.Array, query_global: np.ndarray) -> Positives:
        """For queries of `items` (null: unlabelled) with global features `query_global`, every
        selected gallery row of their item. Reads the identity columns of the pieces that may
        hold them (file and row-group statistics on `item_id`), then only the matching rows'
        global features, by byte ranges where the layout allows."""
        labelled = pc.unique(items.drop_null())
        if len(labelled) == 0:
            return Positives.empty()
        of_items = self.where.expression & pc.field("item_id").isin(labelled)
        try:
            found = [selected_rows(self.table.location.fs, piece, of_items) for piece in self.pieces(("item_id", labelled.to_pylist()))]
        except OSError as error:
            raise StorageError(f"cannot read {self.table.uri} (version {self.table.version}): {error}{credentials_hint(self.table.uri)}") from error
        found = [rows for rows in found if len(rows[0])]
        if not found:  # items with no image in the gallery
            return Positives.empty()
        gallery_ids, gallery_items = (pa.concat_arrays([rows[column] for rows in found]) for column in (0, 1))
        left = pa.table({"query": pa.array(np.arange(len(items))), "item_id": items})
        right = pa.table({"row": pa.array(np.arange(len(gallery_ids))), "item_id": gallery_items, "gallery_id": gallery_ids})
        pairs = left.join(right, "item_id", join_type="inner").sort_by([("query", "ascending"), ("gallery_id", "ascending")])
        query, row = (pairs.column(name).to_numpy().astype(np.int64) for name in ("query", "row"))  # copies torch may index with
        query_tensor, gallery_global = torch.from_numpy(query_global), torch.from_numpy(np.concatenate([rows[2] for rows in found]))
        # Exact scores in float64, a bounded number of pairs at a time.
        score = np.concatenate([
            pair_scores(query_tensor[query[start:start + PAIR_BATCH]], gallery_global[row[start:start + PAIR_BATCH]]).numpy()
            for start in range(0, len(query), PAIR_BATCH)
        ] or [np.zeros(0, np.float32)])
        ids = pairs.column("gallery_id").combine_chunks()
        return Positives(query, score, arrow_tie_keys(ids), ids)


def selected_rows(fs: Any, piece: Piece, row_filter: pc.Expression) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """A piece's rows that pass `row_filter`: their image ids, item ids and global features
    [rows, D] (float32, writable). The filter is read as a mask on its own columns, and the
    features of the selected rows only, by byte ranges where the layout allows
    (pipelines.token_ranges; filtering while decoding copied every selected feature)."""
    fragment = piece_fragment(fs, piece)
    keep = pc.fill_null(fragment.to_table(columns={"keep": row_filter}).column("keep"), False)
    rows = fragment.to_table(columns=["image_id", "item_id"])
    wanted = None if pc.all(keep).as_py() else keep.to_numpy(zero_copy_only=False)
    if wanted is not None:
        rows = rows.filter(keep)
    with ranged_file(fs, piece[0]) as file:
        (features,), _ = fragment_rows(file, fragment, wanted, ["global"], fragment.physical_schema.field("global").type.list_size)
    return rows.column("image_id").combine_chunks(), rows.column("item_id").combine_chunks(), features


@dataclass
class QueryChunk:
    """Queries as the scans need them: ids, items (null where unlabelled), global features
    [Q, D] (float32), the token columns as the table stores them (`token_rows`; the scanners
    get them as [Q, M, d] arrays in that precision, float16 or float32, and compute in
    float32) and their positives in the gallery."""

    ids: pa.Array
    items: pa.Array
    global_features: np.ndarray
    token_rows: pa.Table
    token_shape: tuple[int, int]
    positives: Positives

    @classmethod
    def from_rows(cls, rows: pa.Table, info: dict[str, Any], gallery: Gallery | None) -> "QueryChunk":
        """A chunk from features-table rows (`image_id`, `item_id`, `global`, `tokens_*`), with
        token shapes from the table's metadata `info` and positives from `gallery` (none without)."""
        items = rows.column("item_id").combine_chunks()
        global_features = np.ascontiguousarray(column_matrix(rows, "global"))
        tokens = rows.select(token_columns(info)).combine_chunks()
        positives = gallery.positives(items, global_features) if gallery is not None else Positives.empty()
        return cls(rows.column("image_id").combine_chunks(), items, global_features, tokens, (info["num_tokens"], info["token_dim"]), positives)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def unlabelled(self) -> int:
        return self.items.null_count

    def scan_arrays(self) -> dict[str, Any]:
        """What the scanners read (GalleryScanner): numbers only, shared once per chunk."""
        return {
            "global": self.global_features,
            "tokens": [column_matrix(self.token_rows, name, self.token_shape, stored=True) for name in self.token_rows.column_names],
            "positive_query": self.positives.query, "positive_score": self.positives.score, "positive_key": self.positives.key,
        }


class QuerySource(Selection):
    """The queries: the rows of a features table that pass `--queries-where`, a chunk at a time."""

    def chunks(self, size: int, gallery: Gallery | None) -> Iterator[QueryChunk]:
        """The selected rows in chunks of `size` (the last may be smaller), in the table's file
        order, each with its positives in `gallery` (none without). One chunk is held at a
        time, plus at most READ_ROWS rows (whole row groups) decoded ahead of it."""
        columns = ["image_id", "item_id", "global", *token_columns(self.table.info)]
        # One thread: Arrow's threaded scan reads ahead of a slow consumer up to the whole table
        # (measured: all of 20,000 queries decoded while the first chunk was searched).
        scanner = self.dataset(max_rows=READ_ROWS).scanner(columns=columns, filter=self.where.expression, batch_readahead=1, fragment_readahead=1, use_threads=False)
        pending: list[pa.RecordBatch] = []
        held = 0
        try:
            for batch in scanner.to_batches():
                pending.append(batch)
                held += batch.num_rows
                while held >= size:
                    rows = pa.Table.from_batches(pending)
                    yield QueryChunk.from_rows(rows.slice(0, size), self.table.info, gallery)
                    rest = rows.slice(size)
                    pending, held = rest.to_batches(), rest.num_rows
            if held:
                yield QueryChunk.from_rows(pa.Table.from_batches(pending), self.table.info, gallery)
        except OSError as error:
            raise StorageError(f"cannot read {self.table.uri} (version {self.table.version}): {error}{credentials_hint(self.table.uri)}") from error


def selections(gallery_table: Snapshot, queries_table: Snapshot, gallery_where: str, queries_where: str) -> tuple[Gallery, QuerySource]:
    """The gallery and the queries of a search, checked before any work starts: both tables are
    features tables of one model, each filter parses and selects at least one row."""
    gallery = Gallery(features_table(gallery_table), parse_filter(gallery_where, "--gallery-where"))
    queries = QuerySource(features_table(queries_table), parse_filter(queries_where, "--queries-where"))
    if queries_table.info.get("model_id") != gallery_table.info.get("model_id"):
        raise InputError(
            f"the queries {queries_table.uri} were embedded with model_id {queries_table.info.get('model_id')}, the gallery "
            f"{gallery_table.uri} with {gallery_table.info.get('model_id')}: embed both with one model"
        )
    gallery.require_rows("--gallery-where")
    queries.require_rows("--queries-where")
    return gallery, queries
