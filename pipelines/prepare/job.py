"""The `mga prepare` command: list a source, write its shards, commit the catalog, print the summary."""

from __future__ import annotations

import argparse
import posixpath
import time
from collections import Counter, defaultdict
from typing import Any, Iterable

import pyarrow as pa

from mga.errors import InputError
from mga.transforms import DEFAULT_MAX_PIXELS
from pipelines.console import print_summary
from pipelines.prepare.consumer2shop import VAL_AS, list_consumer2shop
from pipelines.prepare.ingest import CATALOG_PARQUET, combine_small_files, plan_tasks, run_tasks
from pipelines.prepare.inshop import INSHOP_FULL, list_inshop
from pipelines.prepare.listing import LAYOUTS, Listing
from pipelines.prepare.manifest import list_manifest
from pipelines.prepare.merge import plan_merge, stored_per_task, stored_rows
from pipelines.schemas import CATALOG, REJECTS
from pipelines.storage import Location, resolve, write_parquet
from pipelines.tables import Snapshot, TableWriter, companion, read_table

DEFAULT_SHARD_MB = 256.0


def _counts(values: Iterable[str], order: tuple[str, ...]) -> dict[str, int]:
    counter = Counter(values)
    ordered = {name: counter[name] for name in order if counter[name]}
    ordered.update({name: n for name, n in sorted(counter.items()) if name not in ordered})
    return ordered


def reason_kind(reason: str) -> str:
    """`cannot decode: image file is truncated` -> `cannot decode`; groups rejects in the summary."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()


def _fmt(counts: dict[str, int]) -> str:
    return " · ".join(f"{name} {n:,}" for name, n in counts.items()) or "none"


def run(
    source: str,
    out: str,
    *,
    root: str | None = None,
    manifest: str | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_shards: int | None = None,
    layout: str = "auto",
    bbox: bool = True,
    val_as: str = "val",
    seed: int = 0,
    test_fraction: float = 0.2,
    incremental: bool = False,
) -> dict[str, Any]:
    """Prepare `source` (inshop | consumer2shop | manifest) into the catalog table at `out`.

    With `incremental`, merge into the catalog stored there (pipelines.prepare.merge)
    instead of replacing it. Returns the committed metadata (see `mga prepare --help` and
    the package docstring).
    """
    from pipelines.runtime import init_ray

    started = time.time()
    if shard_mb <= 0:
        raise InputError(f"--shard-mb {shard_mb}: expected a positive size in MB")
    if max_pixels < 1:
        raise InputError(f"--max-pixels {max_pixels}: expected a positive number of pixels")
    if source in ("inshop", "consumer2shop") and not root:
        raise InputError(f"mga prepare {source} needs --root DIR")
    if source == "inshop":
        listing = list_inshop(root, layout=layout, bbox=bbox)
    elif source == "consumer2shop":
        listing = list_consumer2shop(root, val_as=val_as, bbox=bbox)
    elif source == "manifest":
        if not manifest:
            raise InputError("mga prepare manifest needs --manifest CSV")
        listing = list_manifest(manifest, root=root, seed=seed, test_fraction=test_fraction)
    else:
        raise InputError(f"unknown source {source!r}: expected inshop, consumer2shop or manifest")
    if listing.input == 0:
        raise InputError(f"{listing.source.get('manifest') or listing.source.get('root')}: lists no images")

    table = resolve(out)
    target_bytes = max(1, int(shard_mb * 2**20))
    init_ray(storage=[table.uri])
    if min_shards is None:
        import ray

        min_shards = int(ray.cluster_resources().get("CPU", 1))
    tasks = plan_tasks(listing.entries, target_bytes, min_shards)
    print(f"prepare: {listing.input:,} images listed, {len(listing.rejects):,} rejected before reading; {len(tasks)} tasks -> {table.uri}", flush=True)
    with TableWriter(table) as writer, TableWriter(companion(table, "rejects")) as rejects_writer:
        stored = stored_rows(writer.base) if incremental and writer.base is not None else None
        per_task = None if stored is None else stored_per_task(stored, tasks)
        results = run_tasks(writer.run, tasks, target_bytes, max_pixels, per_task) if tasks else []
        rejects = list(listing.rejects) + [reject for result in results for reject in result["rejects"]]
        files = sorted((f for result in results for f in result["files"]), key=lambda f: f["path"])
        if stored is not None:
            files = combine_small_files(writer.run, files, target_bytes)
        written = [row for result in results for row in result["written"]]
        merge = _merge(writer, stored, written, results, files) if stored is not None else None
        paths = [f["path"] for f in files] + (merge[1] if merge else [])
        rejected = pa.table({"source_path": [r[0] for r in rejects], "reason": [r[1] for r in rejects]}, schema=REJECTS)
        rejects_table = _commit_rejects(rejects_writer, rejected, table, catalog_unchanged=merge is not None and not paths and not merge[2])
        info = _summary(listing, table, rejects_table, rejects, written, results, files, shard_mb, max_pixels)
        remove = None
        if merge is not None:
            info["incremental"], remove = merge[0], merge[2]
        snapshot = writer.commit(CATALOG, info, files=paths, remove=remove)
    seconds = time.time() - started
    info = {**info, "version": snapshot.version}  # a merge that changed nothing commits no version
    if incremental and stored is None:
        info["incremental"] = f"no catalog at {table.uri} yet: wrote everything"
    _print(listing, table, info, files, seconds)
    if info["rows"] == 0:
        raise InputError(f"no image of {listing.input:,} could be read: see the rejects table {rejects_table.uri}")
    return info


def _merge(writer: TableWriter, stored: pa.Table, written: list[tuple], results: list[dict[str, Any]], files: list[dict[str, Any]]) -> tuple[dict[str, int], list[str], list[str]]:
    """The merge's stored side: rewrite the stored files that hold stale rows; (counts, new files, retired files)."""
    from pipelines.catalog import rewrite_without  # imports Ray: not at the top, so that a usage error stays quick

    kept_ids = pa.array([image_id for result in results for image_id in result["kept"]], pa.string())
    plan = plan_merge(stored, pa.array([row[4] for row in written], pa.string()), kept_ids)
    copies, kept_rows, dropped = rewrite_without(writer, plan.stale, CATALOG, **CATALOG_PARQUET) if plan.stale else ({}, 0, 0)
    stale = sum(len(ids) for ids in plan.stale.values())
    if dropped != stale:
        raise RuntimeError(f"prepare: {stale} stale rows to drop from {writer.location.uri}, found {dropped}; nothing was committed")
    counts = {**plan.counts, "rows_written": sum(f["rows"] for f in files) + kept_rows, "files_rewritten": len(plan.stale)}
    return counts, list(copies), sorted(plan.stale)


def _commit_rejects(writer: TableWriter, rejects: pa.Table, catalog: Location, catalog_unchanged: bool) -> Snapshot:
    """The rejects table's new version, or its current one when the catalog does not change and
    the same images are rejected for the same reasons (a quiet incremental run commits nothing)."""
    order = [("source_path", "ascending"), ("reason", "ascending")]
    if catalog_unchanged and writer.base is not None and read_table(writer.base, REJECTS.names).sort_by(order).equals(rejects.sort_by(order)):
        return writer.base
    write_parquet(writer.file("rejects.parquet"), rejects)
    return writer.commit(REJECTS, {"table": "rejects", "of": catalog.uri, "rows": rejects.num_rows})


def _summary(listing, table, rejects_table, rejects, written, results, files, shard_mb, max_pixels) -> dict[str, Any]:
    items_per_split: dict[str, set[str]] = defaultdict(set)
    for item, split, *_ in written:
        if item is not None:  # None: an unlabelled query photo
            items_per_split[split].add(item)
    seen: dict[str, tuple[str, str]] = {}
    copies_within, copies_across, examples = 0, 0, []
    for item, _, _, digest, image_id in written:
        first = seen.setdefault(digest, (item, image_id))
        if first[1] == image_id:
            continue
        if first[0] == item:
            copies_within += 1
        else:
            copies_across += 1
            if len(examples) < 3:
                examples.append(f"{image_id} ({item}) = {first[1]} ({first[0]})")
    if copies_across:
        listing.notes.append(f"{copies_across} images have the same bytes as an image of another item, e.g. " + "; ".join(examples))
    bbox = Counter()
    for result in results:
        bbox.update(result["bbox"])
    ordered_splits = ("train", "query", "gallery", "val")
    return {
        "table": "catalog",
        "source": listing.source,
        "input": listing.input,
        "rows": len(written),
        "rejected": len(rejects),
        "skipped": listing.skipped,
        "items": len({row[0] for row in written if row[0] is not None}),
        "unlabelled": sum(row[0] is None for row in written),
        "rows_per_split": _counts((row[1] for row in written), ordered_splits),
        "rows_per_domain": _counts((row[2] for row in written), ("shop", "consumer")),
        "items_per_split": {split: len(items_per_split[split]) for split in _counts((row[1] for row in written), ordered_splits)},
        "rejects_by_reason": _counts((reason_kind(r[1]) for r in rejects), ()),
        "rejects": {"table": rejects_table.uri, "version": rejects_table.version},
        "bbox": {"kept": bbox["kept"], "clipped": bbox["clipped"], "degenerate": bbox["degenerate"], "none": bbox["none"]},
        "identical_bytes": {"within_item": copies_within, "across_items": copies_across},
        "shards": [{"file": posixpath.relpath(f["path"], table.path), "rows": f["rows"], "items": f["items"], "bytes": f["bytes"]} for f in files],
        "shard_mb": shard_mb,
        "max_pixels": max_pixels,
        "notes": listing.notes,
        **({"stats": listing.stats} if listing.stats else {}),
    }


def _print(listing: Listing, table: Location, body: dict[str, Any], files: list[dict[str, Any]], seconds: float) -> None:
    source = body["source"]
    rows = {
        "source": f"{listing.kind}: {source.get('manifest') or source.get('root')}" + (f" (images in {source['images']}/)" if source.get("images") else ""),
        "output": f"{table.uri} (version {body['version']})",
        "input = written + rejected": f"{body['input']:,} = {body['rows']:,} + {body['rejected']:,}",
    }
    if body["skipped"]:
        rows["skipped (not input)"] = f"{body['skipped']:,}"
    rows["rows per split"] = _fmt(body["rows_per_split"])
    rows["items per split"] = _fmt(body["items_per_split"]) + f" (items {body['items']:,})"
    if body["unlabelled"]:
        rows["unlabelled"] = f"{body['unlabelled']:,} query rows without an item (matched by search, left out of metrics)"
    rows["rows per domain"] = _fmt(body["rows_per_domain"])
    if listing.kind == "inshop":
        full = INSHOP_FULL
        rows["full In-Shop has"] = f"{full['images']:,} images of {full['items']:,} items: train {full['train']:,} · query {full['query']:,} · gallery {full['gallery']:,}"
    rows["rejected"] = _fmt(body["rejects_by_reason"]) + (f" (see the table {body['rejects']['table']})" if body["rejected"] else "")
    box = body["bbox"]
    rows["bbox"] = f"kept {box['kept']:,} · clipped {box['clipped']:,} · degenerate -> null {box['degenerate']:,} · none {box['none']:,}"
    copies = body["identical_bytes"]
    if copies["within_item"] or copies["across_items"]:
        rows["identical bytes"] = f"{copies['within_item']:,} within an item · {copies['across_items']:,} across items (kept)"
    largest = max((f["bytes"] for f in files), default=0)
    rows["shards"] = f"{len(files)} Parquet files, largest {largest / 2**20:,.1f} MB (target {body['shard_mb']:g} MB)"
    if isinstance(body.get("incremental"), dict):
        merge = body["incremental"]
        rows["incremental"] = (
            f"new {merge['new']:,} · changed {merge['changed']:,} · unchanged {merge['unchanged']:,} · deleted {merge['deleted']:,}; "
            f"rows written {merge['rows_written']:,} of {body['rows']:,} ({merge['files_rewritten']} stored files rewritten without stale rows)"
        )
    elif body.get("incremental"):
        rows["incremental"] = body["incremental"]
    rows["time"] = f"{seconds:,.1f} s ({body['input'] / max(seconds, 1e-9):,.0f} images/s)"
    for index, note in enumerate(body["notes"]):
        rows[f"note {index + 1}"] = note
    print_summary(f"mga prepare {listing.kind}", rows)


# ---------------------------------------------------------------------------------------
# CLI


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="catalog table URI: a local directory or s3://bucket/prefix")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="largest Parquet shard in MB (an item bigger than this gets its own shard); default %(default)s")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images with more pixels than this; default %(default)s")
    parser.add_argument("--incremental", action="store_true", help="merge into the catalog at --out: unchanged images stay as stored, new and changed ones are written, unlisted ones removed")
    parser.add_argument("--min-shards", type=int, default=None, help="write at least this many shards when there are enough items, so every CPU works (default: the cluster's CPUs)")
    # Also accepted after the source name (the parent `prepare` parser has them too).
    parser.add_argument("--s3-endpoint", default=argparse.SUPPRESS, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", default=argparse.SUPPRESS, help="S3 region (default: $AWS_REGION)")


def build_parser(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest="source", required=True, metavar="{inshop,consumer2shop,manifest}")
    inshop = sources.add_parser("inshop", help="DeepFashion In-Shop: Eval/list_eval_partition.txt, Anno/list_bbox_inshop.txt")
    inshop.add_argument("--root", required=True, help="the In-Shop directory (with Eval/, Anno/ and img/ or img_highres/)")
    inshop.add_argument("--layout", choices=LAYOUTS, default="auto", help="image directory: img, img_highres, or auto (img if present); default %(default)s")
    inshop.add_argument("--no-bbox", dest="bbox", action="store_false", help="ignore Anno/list_bbox_inshop.txt (every bbox null)")
    _add_common(inshop)
    c2s = sources.add_parser("consumer2shop", help="DeepFashion Consumer-to-Shop: Eval/list_eval_partition.txt, Anno/list_bbox_consumer2shop.txt")
    c2s.add_argument("--root", required=True, help="the Consumer-to-Shop directory (with Eval/, Anno/ and img/)")
    c2s.add_argument("--val-as", choices=VAL_AS, default="val", help="val items: keep as split=val, skip, treat as query/gallery like test, or add their shop images to the gallery; default %(default)s")
    c2s.add_argument("--no-bbox", dest="bbox", action="store_false", help="ignore Anno/list_bbox_consumer2shop.txt (every bbox null)")
    _add_common(c2s)
    man = sources.add_parser("manifest", help="a CSV of path,item_id[,split,domain,category,x1,y1,x2,y2] (local or s3://)")
    man.add_argument("--manifest", required=True, help="the CSV (local path or s3://)")
    man.add_argument("--root", default=None, help="relative paths resolve against this directory and local paths must stay inside it (default: the CSV's directory)")
    man.add_argument("--seed", type=int, default=0, help="seed of the item split when the CSV has no split column; default %(default)s")
    man.add_argument("--test-fraction", type=float, default=0.2, help="share of items drawn as test items when the CSV has no split column; default %(default)s")
    _add_common(man)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.source,
        args.out,
        root=getattr(args, "root", None),
        manifest=getattr(args, "manifest", None),
        shard_mb=args.shard_mb,
        max_pixels=args.max_pixels,
        min_shards=args.min_shards,
        layout=getattr(args, "layout", "auto"),
        bbox=getattr(args, "bbox", True),
        val_as=getattr(args, "val_as", "val"),
        seed=getattr(args, "seed", 0),
        test_fraction=getattr(args, "test_fraction", 0.2),
        incremental=args.incremental,
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.command import module_main

    module_main("pipelines.prepare", argv)

