"""`mga synth`: write the synthetic fine-grained fashion catalog (DESIGN.md) as a catalog table.

Images are rendered in parallel Ray tasks, one shard per task; every item's images of a
split stay together in one shard, sorted by split and item, as the training stream expects. The shards are
committed to the catalog's Delta table in one transaction (pipelines.tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import time
from collections import Counter
from typing import Any

import pyarrow as pa
from PIL import Image

from mga.errors import InputError
from pipelines.synthetic import PlannedImage, SynthSpec, plan_catalog, render_image
from pipelines.console import print_summary
from pipelines.schemas import CATALOG
from pipelines.storage import Location, resolve, write_parquet
from pipelines.tables import TableWriter

# Small row groups: a filtered read (validation, the report's pictures, an incremental embed)
# reads the row groups holding its ids, not whole shards.
ROW_GROUP_ROWS = 64


def render_shard(spec: SynthSpec, planned: list[PlannedImage], shard: Location) -> int:
    """Ray task: draw one shard's images and write them as one Parquet file; returns the rows written."""
    rows: dict[str, list[Any]] = {name: [] for name in CATALOG.names}
    for image in planned:
        data, bbox = render_image(spec, image)
        width, height = Image.open(io.BytesIO(data)).size
        for name, value in (
            ("image_id", image.image_id),
            ("item_id", image.item_id),
            ("split", image.split),
            ("domain", image.domain),
            ("category", image.category),
            ("bbox", list(bbox)),
            ("image", data),
            ("sha256", hashlib.sha256(data).hexdigest()),
            ("width", width),
            ("height", height),
            ("source_path", f"synth://seed-{spec.seed}/{image.image_id}.jpg"),
        ):
            rows[name].append(value)
    write_parquet(shard, pa.table(rows, schema=CATALOG), row_group_size=ROW_GROUP_ROWS)
    return len(planned)


def _item_chunks(planned: list[PlannedImage], images_per_shard: int) -> list[list[PlannedImage]]:
    """Consecutive chunks of about `images_per_shard` images of one split, sorted by item, that
    never split an item: a read of one split (the training stream's `train`, search's
    `query`) skips the other splits' files by their statistics alone."""
    ordered = sorted(planned, key=lambda image: (image.split, image.item_id, image.domain, image.view_index))
    chunks: list[list[PlannedImage]] = [[]]
    for image in ordered:
        previous = chunks[-1][-1] if chunks[-1] else None
        if previous and (previous.split != image.split or (len(chunks[-1]) >= images_per_shard and previous.item_id != image.item_id)):
            chunks.append([])
        chunks[-1].append(image)
    return chunks


def run(out: str, spec: SynthSpec, images_per_shard: int = 500) -> dict[str, Any]:
    if images_per_shard < 1:
        raise InputError(f"--images-per-shard must be positive, got {images_per_shard}")
    # Here, not at the top: `mga synth --help` and a usage error must not wait for Ray.
    import ray

    from pipelines.runtime import init_ray

    started = time.time()
    table = resolve(out)
    planned = plan_catalog(spec)
    init_ray(storage=[table.uri])
    render = ray.remote(num_cpus=1)(render_shard)
    chunks = _item_chunks(planned, images_per_shard)
    by_split = Counter(image.split for image in planned)
    by_domain = Counter(image.domain for image in planned)
    items_by_split = {split: len({image.item_id for image in planned if image.split == split}) for split in by_split}
    with TableWriter(table) as writer:
        written = sum(ray.get([render.remote(spec, chunk, writer.file(f"part-{index:05d}.parquet")) for index, chunk in enumerate(chunks)]))
        info = {
            "table": "catalog",
            "source": {"kind": "synth", **dataclasses.asdict(spec)},
            "input": len(planned),
            "rows": written,
            "rejected": 0,
            "rows_by_split": dict(by_split),
            "rows_by_domain": dict(by_domain),
            "items_by_split": items_by_split,
        }
        snapshot = writer.commit(CATALOG, info)
    print_summary(
        "mga synth",
        {
            "wrote": f"{table.uri} (version {snapshot.version}, {snapshot.files.num_rows} files)",
            "images": f"{written} = " + ", ".join(f"{split} {count}" for split, count in sorted(by_split.items())),
            "items": ", ".join(f"{split} {count}" for split, count in sorted(items_by_split.items())),
            "domains": ", ".join(f"{domain} {count}" for domain, count in sorted(by_domain.items())),
            "input = written + rejected": f"{len(planned)} = {written} + 0",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return {**snapshot.info, "version": snapshot.version}


def build_parser(parser: argparse.ArgumentParser) -> None:
    defaults = SynthSpec()
    parser.add_argument("--out", required=True, help="catalog URI to write (local path or s3://bucket/prefix)")
    for field in dataclasses.fields(SynthSpec):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
    parser.add_argument("--images-per-shard", type=int, default=500)


def spec_from_args(args: argparse.Namespace) -> SynthSpec:
    return SynthSpec(**{field.name: getattr(args, field.name) for field in dataclasses.fields(SynthSpec)})


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.out, spec_from_args(args), args.images_per_shard)


def main(argv: list[str] | None = None) -> None:
    from pipelines.command import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
