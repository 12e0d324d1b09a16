"""pipelines.token_ranges: a few rows' tokens (or global features) read by byte ranges from the
layout embed writes equal the decoded rows, for both token dtypes; any other layout is recognised
and left to decoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.schemas import column_matrix, features_schema, vector_column
from pipelines.token_ranges import MERGE_GAP_BYTES, RowReads, fragment_rows, locate, parquet_options

WIDTHS = {"tokens_0": 64, "tokens_1": 96}
ROWS = 2500


def features(dtype: str, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    schema = features_schema(8, list(WIDTHS.values()), dtype)
    columns = {}
    for field in schema:
        if field.name in WIDTHS or field.name == "global":
            columns[field.name] = vector_column(rng.standard_normal((ROWS, WIDTHS.get(field.name, 8))).astype(np.float32), field.type)
        elif field.name == "embedded_at":
            columns[field.name] = pa.array([0] * ROWS, field.type)
        else:
            columns[field.name] = pa.array([f"{field.name}-{row}" for row in range(ROWS)])
    return pa.table(columns, schema=schema)


def chunks(path, table: pa.Table) -> list:
    metadata, file = pq.read_metadata(path), pa.OSFile(str(path))
    return [locate(file, metadata, group, name, table.schema.field(name).type, width)
            for group in range(metadata.num_row_groups) for name, width in WIDTHS.items()]


def read_rows(file: pa.NativeFile, chunk, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of one located chunk, its ranges read one after another (fragment_rows fetches them on threads)."""
    reads = RowReads.of(chunk, rows)
    return reads.values([file.read_at(*request) for request in reads.requests])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_read_by_ranges_equal_the_decoded_rows_and_cost_their_bytes(tmp_path, dtype):
    table = features(dtype)
    path = tmp_path / "features.parquet"
    pq.write_table(table, path, row_group_size=1000, **parquet_options(table.schema))
    metadata, file = pq.read_metadata(path), pa.OSFile(str(path))
    rng = np.random.default_rng(1)
    for group in range(metadata.num_row_groups):
        decoded = pq.ParquetFile(path).read_row_group(group)
        rows = np.sort(rng.choice(decoded.num_rows, 40, replace=False))
        for name, width in WIDTHS.items():
            chunk = locate(file, metadata, group, name, table.schema.field(name).type, width)
            assert chunk is not None
            values, read = read_rows(file, chunk, rows)
            np.testing.assert_array_equal(values.astype(np.float32), column_matrix(decoded, name)[rows])
            # Their own bytes, and at most the gaps of neighbours close enough to be read in one range.
            assert 40 * chunk.stride <= read <= 40 * (2 * chunk.stride + MERGE_GAP_BYTES)
    # DuckDB/pandas readers see the same table.
    assert pq.read_table(path).equals(table)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_layouts_are_left_to_decoding(tmp_path, dtype):
    table = features(dtype)
    compressed = tmp_path / "compressed.parquet"
    pq.write_table(table, compressed, row_group_size=1000)  # zstd/snappy, dictionary: pyarrow's defaults
    assert chunks(compressed, table) == [None] * 6
    pages = tmp_path / "pages.parquet"
    pq.write_table(table, pages, row_group_size=1000, **{**parquet_options(table.schema), "data_page_size": 8192, "write_batch_size": 64})  # many pages a chunk
    assert chunks(pages, table) == [None] * 6
    # A null token row would shift every later row's place in the page.
    holed = table.set_column(table.schema.get_field_index("tokens_0"), "tokens_0",
                             pa.array(table.column("tokens_0").to_pylist()[:5] + [None] + table.column("tokens_0").to_pylist()[6:], table.schema.field("tokens_0").type))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(holed, nulls, row_group_size=1000, **parquet_options(table.schema))
    found = chunks(nulls, holed)
    assert found[0] is None and all(chunk is not None for chunk in found[1:])


def test_a_row_whose_length_is_not_its_own_is_refused(tmp_path):
    """Binary halves carry each row's length: a file changed under the reader (or misread) is
    caught on the row, not returned as someone else's tokens."""
    table = features("float16")
    path = tmp_path / "features.parquet"
    pq.write_table(table, path, row_group_size=1000, **parquet_options(table.schema))
    metadata = pq.read_metadata(path)
    chunk = locate(pa.OSFile(str(path)), metadata, 1, "tokens_0", table.schema.field("tokens_0").type, WIDTHS["tokens_0"])
    raw = bytearray(path.read_bytes())
    raw[chunk.start + 700 * chunk.stride] ^= 0xFF  # row 700's length prefix
    path.write_bytes(bytes(raw))
    file = pa.OSFile(str(path))
    values, _ = read_rows(file, chunk, np.array([3, 699, 701, 990]))  # the rows around it still read
    assert values.shape == (4, WIDTHS["tokens_0"])
    with pytest.raises(ValueError, match="token row 700: its length is not"):
        read_rows(file, chunk, np.array([3, 699, 700, 990]))


@pytest.mark.parametrize("layout", ["embed", "compressed"])
def test_whole_and_selected_rows_of_a_fragment_equal_the_decoded_rows(tmp_path, layout):
    """fragment_rows (the global features of a scan piece, a chunk's positives, a piece's
    candidate tokens): by ranges in embed's layout, where the global column is one PLAIN page
    too; by decoding otherwise; the same values and the rows asked for, in order, either way."""
    table = features("float16")
    path = tmp_path / "features.parquet"
    options = parquet_options(table.schema) if layout == "embed" else {}
    pq.write_table(table, path, row_group_size=700, **options)
    metadata = pq.read_metadata(path)
    located = locate(pa.OSFile(str(path)), metadata, 1, "global", table.schema.field("global").type, 8)
    assert (located is not None) == (layout == "embed")
    fragment = pads.ParquetFileFormat().make_fragment(str(path), filesystem=pafs.LocalFileSystem(), row_groups=[1, 2, 3])  # rows 700..2499
    decoded = pq.ParquetFile(path).read_row_groups([1, 2, 3])
    wanted = np.random.default_rng(2).random(decoded.num_rows) < 0.1
    wanted[699:701] = True  # across a row-group boundary
    for mask, rows in ((None, np.arange(decoded.num_rows)), (wanted, np.flatnonzero(wanted))):
        with pa.OSFile(str(path)) as file:
            (global_features,), global_read = fragment_rows(file, fragment, mask, ["global"], 8)
            (tokens,), tokens_read = fragment_rows(file, fragment, mask, ["tokens_0"], WIDTHS["tokens_0"])
        np.testing.assert_array_equal(global_features, column_matrix(decoded, "global")[rows])
        np.testing.assert_array_equal(tokens.astype(np.float32), column_matrix(decoded, "tokens_0")[rows])
        assert global_features.dtype == np.float32 and global_features.flags.writeable
        if layout == "embed" and mask is None:  # the values alone: no levels, no other column
            assert (global_read, tokens_read) == (len(rows) * 8 * 4, len(rows) * (4 + WIDTHS["tokens_0"] * 2))


def test_rows_read_by_ranges_from_object_storage_equal_the_local_ones(tmp_path, s3_env):
    """fragment_rows keeps many range requests in flight at once (ranged_file on S3 gives the
    store's own file): from the moto endpoint, the same rows and bytes as from a local copy."""
    from pipelines.storage import resolve
    from pipelines.token_ranges import ranged_file

    table = features("float16")
    path = tmp_path / "features.parquet"
    pq.write_table(table, path, row_group_size=100, **parquet_options(table.schema))  # 25 row groups: requests from many threads
    remote = resolve(f"s3://{s3_env['bucket']}/features.parquet")
    with remote.fs.open_output_stream(remote.path) as out:
        out.write(path.read_bytes())
    wanted = np.random.default_rng(3).random(ROWS) < 0.05
    names = list(WIDTHS)
    for mask in (wanted, None):
        results = []
        for fs, file_path in ((pafs.LocalFileSystem(), str(path)), (remote.fs, remote.path)):
            fragment = pads.ParquetFileFormat().make_fragment(file_path, filesystem=fs)
            with ranged_file(fs, file_path) as file:
                results.append([fragment_rows(file, fragment, mask, [name], WIDTHS[name]) for name in names])
        for ((local,), local_read), ((stored,), stored_read) in zip(*results):
            np.testing.assert_array_equal(local, stored)
            assert local_read == stored_read and len(local) == (ROWS if mask is None else wanted.sum())
