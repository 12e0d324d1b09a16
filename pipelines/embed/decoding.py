"""The decoding side of `mga embed`: Ray Data tasks that decode, crop and resize, and set aside
the rows they cannot use. Kept free of torch: every decoding worker process imports this
module, and torch would add seconds and hundreds of MB to each of them.

Rows set aside are staged by the task itself as a small Parquet file beside the job's other
output (no actor to funnel them through, nothing per row on the driver): one file per batch,
named by the batch's image ids, so a retried task rewrites its file rather than adding one.
The job reads the staged files once the stream is done (`staged_rejects`): until it writes
the rejects table's own file, they are all the Parquet its run directory holds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mga.transforms import ImageDecodeError, preprocess
from pipelines.schemas import IDENTITY_COLUMNS
from pipelines.storage import Location, StorageError, credentials_hint, resolve, write_parquet

STAGED_REJECTS = pa.schema([("image_id", pa.string()), ("source_path", pa.string()), ("reason", pa.string())])


def prepare_batch(batch: pa.Table, image_size: int, max_pixels: int, rejects_uri: str) -> dict[str, np.ndarray]:
    """Ray Data task: decode, crop and resize; rows that cannot be decoded are staged under `rejects_uri`."""
    images, bboxes = batch.column("image").to_pylist(), batch.column("bbox").to_pylist()
    pixels, rejected = cpu_pixels(images, bboxes, range(batch.num_rows), image_size, max_pixels)
    stage_rejects(batch, rejected, rejects_uri)
    output = identity_columns(batch, list(pixels))
    output["pixels"] = np.stack(list(pixels.values())) if pixels else np.zeros((0, 3, image_size, image_size), np.uint8)
    return output


def cpu_pixels(images: list[bytes | None], bboxes: list[list[int] | None], rows: Iterable[int], size: int, max_pixels: int
               ) -> tuple[dict[int, np.ndarray], list[tuple[int, str]]]:
    """The CPU path (mga.transforms.preprocess) for `rows` of a batch: uint8 [3, size, size] by
    row, in the rows' order, and (row, reason) for each row set aside."""
    pixels, rejected = {}, []
    for row in rows:
        try:
            pixels[row] = preprocess(images[row], bboxes[row], size, None, max_pixels)
        except Exception as error:  # noqa: BLE001 - one odd file must not fail the job; it is reported
            rejected.append((row, reject_reason(error)))
    return pixels, rejected


def reject_reason(error: Exception) -> str:
    """Why an image was set aside: an ImageDecodeError says it; anything else is named as unexpected."""
    if isinstance(error, ImageDecodeError):
        return str(error)
    return f"cannot decode: unexpected {type(error).__name__}: {error}"


def stage_rejects(batch: pa.Table, rejected: list[tuple[int, str]], rejects_uri: str) -> None:
    """Stage the batch's `rejected` (row, reason) as one file under `rejects_uri`, named by the
    batch's image ids (a retried batch rewrites its file)."""
    if not rejected:
        return
    rows = pa.array([row for row, _ in rejected], pa.int64())
    staged = pa.table({"image_id": batch.column("image_id").take(rows), "source_path": batch.column("source_path").take(rows),
                       "reason": pa.array([reason for _, reason in rejected], pa.string())}, schema=STAGED_REJECTS)
    name = hashlib.sha256("\n".join(batch.column("image_id").to_pylist()).encode()).hexdigest()[:32]
    write_parquet(resolve(rejects_uri).join(f"{name}.parquet"), staged)


def identity_columns(batch: pa.Table, kept: list[int]) -> dict[str, np.ndarray]:
    """The identity columns of the batch's `kept` rows, as the model actors take them."""
    rows = pa.array(kept, pa.int64())  # typed: a batch whose rows were all rejected takes nothing
    return {name: np.array(batch.column(name).take(rows).to_pylist(), dtype=object) for name in IDENTITY_COLUMNS}


def staged_rejects(location: Location, paths: list[str]) -> pa.Table:
    """The rows staged in the files `paths` of `location`'s filesystem (STAGED_REJECTS), one per image, sorted by image_id."""
    try:  # one dataset: a bad corpus stages a file per batch, read here on parallel threads
        staged = pads.dataset(paths, schema=STAGED_REJECTS, format="parquet", filesystem=location.fs).to_table()
    except OSError as error:
        raise StorageError(f"cannot read the staged rejects in {location.uri}: {error}{credentials_hint(location.uri)}") from error
    staged = staged.sort_by("image_id").combine_chunks()
    if staged.num_rows < 2:
        return staged
    # A batch retried with other rows around it would stage its rejects twice: keep one row per image.
    ids = staged.column("image_id")
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1]).combine_chunks()])
    return staged.filter(first)
