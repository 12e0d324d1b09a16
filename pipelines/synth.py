"""`mga synth`: write the synthetic fine-grained fashion catalog (DESIGN.md) as a catalog table.

Images are rendered in parallel Ray tasks, one shard per task; every item's images stay
together in one shard, sorted by item, as the training stream expects.
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
import ray
from PIL import Image

from mga.synthetic import PlannedImage, SynthSpec, plan_catalog, render_image
from pipelines.console import print_summary
from pipelines.runtime import init_ray
from pipelines.schemas import CATALOG
from pipelines.storage import Location, new_snapshot, publish, resolve, write_parquet


@ray.remote(num_cpus=1)
def render_shard(spec: SynthSpec, planned: list[PlannedImage], shard: Location) -> int:
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
    write_parquet(shard, pa.table(rows, schema=CATALOG), row_group_size=256)
    return len(planned)


def _item_chunks(planned: list[PlannedImage], images_per_shard: int) -> list[list[PlannedImage]]:
    """Consecutive chunks of about `images_per_shard` images that never split an item."""
    ordered = sorted(planned, key=lambda image: (image.item_id, image.domain, image.view_index))
    chunks: list[list[PlannedImage]] = [[]]
    for image in ordered:
        if len(chunks[-1]) >= images_per_shard and chunks[-1][-1].item_id != image.item_id:
            chunks.append([])
        chunks[-1].append(image)
    return chunks


def run(out: str, spec: SynthSpec, images_per_shard: int = 500) -> dict[str, Any]:
    if images_per_shard < 1:
        raise ValueError(f"--images-per-shard must be positive, got {images_per_shard}")
    started = time.time()
    table = resolve(out)
    planned = plan_catalog(spec)
    init_ray()
    snapshot = new_snapshot(table)
    chunks = _item_chunks(planned, images_per_shard)
    written = sum(ray.get([render_shard.remote(spec, chunk, snapshot.join(f"part-{index:05d}.parquet")) for index, chunk in enumerate(chunks)]))
    by_split = Counter(image.split for image in planned)
    by_domain = Counter(image.domain for image in planned)
    items_by_split = {split: len({image.item_id for image in planned if image.split == split}) for split in by_split}
    manifest = publish(
        table,
        snapshot,
        {
            "table": "catalog",
            "source": {"kind": "synth", **dataclasses.asdict(spec)},
            "input": len(planned),
            "rows": written,
            "rejected": 0,
            "rows_by_split": dict(by_split),
            "rows_by_domain": dict(by_domain),
            "items_by_split": items_by_split,
            "rejects_files": [],
        },
    )
    print_summary(
        "mga synth",
        {
            "wrote": f"{table.uri} (snapshot {manifest['snapshot']}, {len(manifest['files'])} shards)",
            "images": f"{written} = " + ", ".join(f"{split} {count}" for split, count in sorted(by_split.items())),
            "items": ", ".join(f"{split} {count}" for split, count in sorted(items_by_split.items())),
            "domains": ", ".join(f"{domain} {count}" for domain, count in sorted(by_domain.items())),
            "input = written + rejected": f"{len(planned)} = {written} + 0",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return manifest


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
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
