"""How a Parquet file written into a Delta table is described in the table's log: its Add
action, with the statistics (rows, min/max/nulls of string and integer columns) that let
readers skip files, read from the file's footer (pipelines.tables' writer commits these).
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import Location


def file_statistics(metadata: pq.FileMetaData) -> str:
    """Delta file statistics from a Parquet footer: rows, and min/max/nulls of string and integer columns."""
    schema = metadata.schema.to_arrow_schema()
    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for index, arrow_field in enumerate(schema):
        if not (pa.types.is_string(arrow_field.type) or pa.types.is_integer(arrow_field.type)):
            continue
        lows, highs, null_count = [], [], 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(index).statistics
            if statistics is None or not statistics.has_min_max:
                if metadata.row_group(group).num_rows:
                    lows = highs = []
                    break
                continue
            lows.append(statistics.min)
            highs.append(statistics.max)
            null_count += statistics.null_count or 0
        else:
            nulls[arrow_field.name] = null_count
        if lows:
            minimum[arrow_field.name], maximum[arrow_field.name] = min(lows), max(highs)
    return json.dumps({"numRecords": metadata.num_rows, "minValues": minimum, "maxValues": maximum, "nullCount": nulls})


def add_action(location: Location, path: str):
    """The Delta Add action of a Parquet file written inside the table at `location`."""
    from deltalake.transaction import AddAction

    info = location.fs.get_file_info(path)
    metadata = pq.read_metadata(path, filesystem=location.fs)
    relative = posixpath.relpath(path, location.path)
    return AddAction(relative, int(info.size), {}, int(time.time() * 1000), True, file_statistics(metadata))
