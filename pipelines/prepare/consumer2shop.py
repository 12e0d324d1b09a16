"""DeepFashion Consumer-to-Shop: the pair list and Anno/list_bbox_consumer2shop.txt as entries."""

from __future__ import annotations

import os
import posixpath

from mga.errors import InputError
from pipelines.prepare.listing import Collector, Listing, category_of, image_prefix, local_root, parse_bbox_file, parse_table, read_path

C2S_PARTITION = ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status")
C2S_BBOX = ("image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2")
VAL_AS = ("val", "skip", "query", "gallery")


def list_consumer2shop(root: str, val_as: str = "val", bbox: bool = True) -> Listing:
    """DeepFashion Consumer-to-Shop under `root`: one entry per distinct image of the pairs."""
    if val_as not in VAL_AS:
        raise InputError(f"--val-as {val_as!r}: expected one of {', '.join(VAL_AS)}")
    base = local_root(root)
    prefix = image_prefix(base, "auto", allow_highres=False)
    partition_path = os.path.join(base.path, "Eval", "list_eval_partition.txt")
    rows = parse_table(partition_path, C2S_PARTITION)
    bbox_path = os.path.join(base.path, "Anno", "list_bbox_consumer2shop.txt")
    boxes = parse_bbox_file(bbox_path, C2S_BBOX, {1, 2}) if bbox else {}
    listing = Listing("consumer2shop", {"kind": "consumer2shop", "root": base.path, "images": prefix, "bbox": bbox, "val_as": val_as})
    # image -> (where, item, status, domain): the first pair naming an image wins.
    images: dict[str, tuple[str, str, str, str]] = {}
    conflicts: list[str] = []
    for number, (consumer, shop, item_id, status) in rows:
        if status not in ("train", "val", "test"):
            raise InputError(f"{partition_path}:{number}: unknown evaluation_status {status!r}: expected train, val or test")
        for name, domain in ((consumer, "consumer"), (shop, "shop")):
            image_id = posixpath.normpath(name)
            where = f"{partition_path}:{number}"
            seen = images.get(image_id)
            if seen is None:
                images[image_id] = (where, item_id, status, domain)
            elif seen[1:] != (item_id, status, domain):
                conflicts.append(f"{image_id} is ({item_id}, {status}, {domain}) at {where} but ({seen[1]}, {seen[2]}, {seen[3]}) at {seen[0]}")
    collector = Collector(listing, base)
    source_mismatch = 0
    for image_id, (where, item_id, status, domain) in images.items():
        if status == "val" and val_as == "skip":
            listing.skipped += 1
            continue
        if status == "train":
            split = "train"
        elif status == "test" or val_as == "query":
            split = "query" if domain == "consumer" else "gallery"
        elif val_as == "gallery" and domain == "shop":
            split = "gallery"
        else:
            split = "val"
        box = boxes.get(image_id)
        if box and box[2] != (1 if domain == "shop" else 2):
            source_mismatch += 1
        collector.add(where, read_path(image_id, prefix), image_id, item_id=item_id, split=split, domain=domain, category=category_of(image_id), bbox=box[1] if box else None)
    listing.stats.update(pairs=len(rows), annotation_conflicts=len(conflicts), source_type_mismatches=source_mismatch, bbox_unlisted=len(set(boxes) - set(images)))
    if conflicts:
        listing.notes.append(f"{len(conflicts)} pairs disagree with an earlier pair about an image (the first wins), e.g. " + "; ".join(conflicts[:3]))
    if source_mismatch:
        listing.notes.append(f"{source_mismatch} images: source_type in {bbox_path} disagrees with the pair column (the pair column wins)")
    if listing.skipped:
        listing.notes.append(f"{listing.skipped} val images skipped (--val-as skip): not input, not written")
    return listing
