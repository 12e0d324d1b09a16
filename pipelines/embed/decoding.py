"""The decoding side of `mga embed`: Ray Data tasks that decode, crop and resize, and the log of
the rows they set aside. Kept free of torch: every decoding worker process imports this
module, and torch would add seconds and hundreds of MB to each of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from mga.transforms import ImageDecodeError, preprocess
from pipelines.schemas import IDENTITY_COLUMNS


@ray.remote(num_cpus=0)
class RejectLog:
    """Collects rows set aside by preprocessing tasks, keyed by image_id so a retried task adds nothing twice."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str]] = {}

    def add(self, rows: list[tuple[str, str, str]]) -> None:
        for image_id, source_path, reason in rows:
            self.rows[image_id] = (source_path, reason)

    def all(self) -> list[tuple[str, str, str]]:
        return [(image_id, path, reason) for image_id, (path, reason) in sorted(self.rows.items())]


def prepare_batch(batch: pa.Table, image_size: int, max_pixels: int, reject_log: Any) -> dict[str, np.ndarray]:
    """Ray Data task: decode, crop and resize; undecodable rows go to the reject log."""
    images, bboxes = batch.column("image"), batch.column("bbox").to_pylist()
    kept, pixels, rejected = [], [], []
    for row in range(batch.num_rows):
        try:
            pixels.append(preprocess(images[row].as_py(), bboxes[row], image_size, None, max_pixels))
            kept.append(row)
        except ImageDecodeError as error:
            rejected.append((batch.column("image_id")[row].as_py(), batch.column("source_path")[row].as_py(), str(error)))
        except Exception as error:  # noqa: BLE001 - one odd file must not fail the job; it is reported
            reason = f"cannot decode: unexpected {type(error).__name__}: {error}"
            rejected.append((batch.column("image_id")[row].as_py(), batch.column("source_path")[row].as_py(), reason))
    if rejected:
        ray.get(reject_log.add.remote(rejected))
    rows = pa.array(kept, pa.int64())  # typed: a batch whose rows were all rejected takes nothing
    output = {name: np.array(batch.column(name).take(rows).to_pylist(), dtype=object) for name in IDENTITY_COLUMNS}
    output["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 3, image_size, image_size), np.uint8)
    return output
