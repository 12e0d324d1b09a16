"""DeepFashion In-Shop: Eval/list_eval_partition.txt and Anno/list_bbox_inshop.txt as entries."""

from __future__ import annotations

import os
import posixpath

from mga.errors import InputError
from pipelines.prepare.listing import LAYOUTS, Collector, Listing, category_of, image_prefix, local_root, parse_bbox_file, parse_table, read_path

INSHOP_FRAME = 256  # In-Shop's img/ images: "centered and resized to 256*256"
INSHOP_FULL = {"images": 52_712, "items": 7_982, "train": 25_882, "query": 14_218, "gallery": 12_612}

INSHOP_PARTITION = ("image_name", "item_id", "evaluation_status")
INSHOP_BBOX = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")


def list_inshop(root: str, layout: str = "auto", bbox: bool = True) -> Listing:
    """DeepFashion In-Shop under `root` as planned entries (no image is read here)."""
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    base = local_root(root)
    prefix = image_prefix(base, layout, allow_highres=True)
    partition_path = os.path.join(base.path, "Eval", "list_eval_partition.txt")
    rows = parse_table(partition_path, INSHOP_PARTITION)
    boxes = parse_bbox_file(os.path.join(base.path, "Anno", "list_bbox_inshop.txt"), INSHOP_BBOX) if bbox else {}
    highres = prefix.endswith("img_highres")
    listing = Listing("inshop", {"kind": "inshop", "root": base.path, "images": prefix, "bbox": bbox})
    collector = Collector(listing, base)
    listed_names = set()
    for number, (name, item_id, status) in rows:
        if status not in ("train", "query", "gallery"):
            raise InputError(f"{partition_path}:{number}: unknown evaluation_status {status!r}: expected train, query or gallery")
        image_id = posixpath.normpath(name)
        listed_names.add(image_id)
        box = boxes.get(image_id)
        collector.add(
            f"{partition_path}:{number}",
            read_path(name, prefix),
            image_id,
            item_id=item_id,
            split=status,
            domain="shop",
            category=category_of(name),
            bbox=box[1] if box else None,
            bbox_frame=INSHOP_FRAME if highres and box else None,
        )
    listing.stats["bbox_unlisted"] = len(set(boxes) - listed_names)
    if listing.stats["bbox_unlisted"]:
        listing.notes.append(f"{listing.stats['bbox_unlisted']} boxes in list_bbox_inshop.txt name images the partition does not list")
    if highres:
        listing.notes.append(f"images read from {prefix}/: boxes mapped from the 256x256 frame of img/")
    return listing
