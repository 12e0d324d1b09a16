"""The Arrow schemas of the tables the pipeline publishes (DESIGN.md, "Tables")."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mga.tie_keys import utf8_tie_keys

SPLITS = ("train", "query", "gallery", "val")
DOMAINS = ("shop", "consumer")

CATALOG = pa.schema(
    [
        ("image_id", pa.string()),
        ("item_id", pa.string()),
        ("split", pa.string()),
        ("domain", pa.string()),
        ("category", pa.string()),
        ("bbox", pa.list_(pa.int32(), 4)),
        ("image", pa.binary()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_path", pa.string()),
    ]
)

REJECTS = pa.schema([("source_path", pa.string()), ("reason", pa.string())])

# The catalog columns that identify an image and travel into the features table.
IDENTITY_COLUMNS = ("image_id", "item_id", "split", "domain", "category", "sha256")


def same_values(first: pa.Array | pa.ChunkedArray, second: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whether two aligned identity columns agree row by row, null equal to null (an unlabelled
    photo's null item is part of its identity); never null."""
    return pc.or_(pc.fill_null(pc.equal(first, second), False), pc.and_(pc.is_null(first), pc.is_null(second)))


# Token columns: float32 as a list of M*d floats; float16 as binary holding the M*d values as
# little-endian IEEE halves (Delta Lake has no half-precision type; 2*M*d bytes per row).
TOKEN_DTYPES = ("float32", "float16")


def token_type(token_dtype: str, size: int) -> pa.DataType:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    return pa.list_(pa.float32(), size) if token_dtype == "float32" else pa.binary()


def vector_column(values: np.ndarray, data_type: pa.DataType) -> pa.Array:
    """Rows of `values` [rows, ...] as a column of `data_type` (a fixed-size float list, or binary halves)."""
    flat = np.ascontiguousarray(values.reshape(values.shape[0], -1))
    if pa.types.is_binary(data_type):
        halves = flat.astype("<f2")
        offsets = np.arange(flat.shape[0] + 1, dtype=np.int32) * halves.shape[1] * 2
        return pa.BinaryArray.from_buffers(pa.binary(), flat.shape[0], [None, pa.py_buffer(offsets), pa.py_buffer(halves.tobytes())])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32).reshape(-1), pa.float32()), flat.shape[1])


def arrow_tie_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The tie keys (mga.tie_keys) of a column of image ids, read from Arrow's own buffers."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = ids.cast(pa.string())
    if ids.null_count:
        raise ValueError(f"{ids.null_count} null image ids have no tie key")
    _, offsets_buffer, data_buffer = ids.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64 if pa.types.is_large_string(ids.type) else np.int32)[ids.offset:ids.offset + len(ids) + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return utf8_tie_keys(data, offsets[:-1], np.diff(offsets))


def column_matrix(table: pa.Table, name: str, rows_shape: tuple[int, ...] = (), stored: bool = False) -> np.ndarray:
    """A vector column (float list, or binary halves) as an array [rows, *rows_shape or width]:
    float32 and writable, or with `stored` in the precision the table keeps (float16 for halves),
    without a copy where it can (then read-only)."""
    column = table.column(name).combine_chunks()
    rows = len(column)
    if pa.types.is_binary(column.type):
        _, offsets, data = column.buffers()
        bounds = np.frombuffer(offsets, np.int32, rows + 1, column.offset * 4)
        flat = np.frombuffer(data, "<f2", (bounds[-1] - bounds[0]) // 2, bounds[0]).astype(np.float16 if stored else np.float32, copy=not stored)
    else:
        values = column.flatten().to_numpy(zero_copy_only=False)
        flat = values if stored and values.dtype == np.float32 else np.array(values, dtype=np.float32)  # a copy, writable: torch owns what it wraps
    return flat.reshape(rows, *(rows_shape or (-1,)))


def features_schema(global_dim: int, token_dims: list[int], token_dtype: str = "float32") -> pa.Schema:
    """Features table: identity columns, model_id, `global` [D], `tokens_<l>` [M*d] per layer."""
    fields = [(name, pa.string()) for name in IDENTITY_COLUMNS]
    fields.append(("model_id", pa.string()))
    fields.append(("global", pa.list_(pa.float32(), global_dim)))
    fields += [(f"tokens_{layer}", token_type(token_dtype, size)) for layer, size in enumerate(token_dims)]
    fields.append(("embedded_at", pa.timestamp("us", tz="UTC")))
    return pa.schema(fields)


def token_columns(info: dict) -> list[str]:
    """The token column names of a features table, from its metadata (one per layer)."""
    return [f"tokens_{layer}" for layer in range(len(info["layers"]))]


RANKINGS = pa.schema(
    [
        ("query_id", pa.string()),
        ("query_item_id", pa.string()),  # null: an unlabelled query
        ("rank", pa.int32()),
        ("gallery_id", pa.string()),
        ("gallery_item_id", pa.string()),
        ("score_global", pa.float32()),
        ("score_token", pa.float32()),
        ("score", pa.float32()),
        ("is_match", pa.bool_()),  # null for an unlabelled query
        # |P|: gallery images of the query's item, so mAP needs nothing but this table (null when unlabelled).
        ("query_positives", pa.int32()),
    ]
)

# Beside the rankings: every gallery image of each query's item with its full-gallery ranks
# (1 + the gallery images before it), so metrics over the whole gallery need no more rows.
POSITIVES = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("rank_global", pa.int64()),
        ("rank_reranked", pa.int64()),
        ("score_global", pa.float32()),  # exact S_global: `mga search --incremental` moves the ranks by it
    ]
)

# Beside the rankings too: each query's shortlist in global order, deeper than the rankings (a
# reserve for rows the gallery loses), with S_token where it was computed: what
# `mga search --incremental` updates exactly instead of searching the query again.
SHORTLISTS = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("gallery_item_id", pa.string()),
        ("score_global", pa.float32()),
        ("score_token", pa.float32()),  # null where not computed
    ]
)
