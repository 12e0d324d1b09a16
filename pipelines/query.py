"""`mga query`: a few photos against a features table's gallery, no table written.

    mga query PHOTO... --features URI [--top 10] [--out DIR] [--index exact|ivf|hnsw|ivfpq]

Each PHOTO is an image file (a local path or `s3://`; a directory or prefix means the
images in it). The photos are embedded with the model the features table was embedded
with (its artifact, as `mga embed` would: the same decoding, letterbox and token dtype),
shortlisted against the table's gallery (`--gallery-where`, default `split = 'gallery'`),
exactly or with `--index`, and the head reranked with ATA: the same step `mga search` runs
(pipelines.search.ranking), so a photo's results equal what `mga search` gives it once it
is prepared and embedded into a table of queries.

Everything runs in this process, one gallery row group at a time (no Ray cluster, nothing
of the gallery held but its top candidates). It prints a table per photo (rank, gallery
image id, item id, category, S_global, S_token, S) and, with `--out`, writes
`DIR/query.html` and `DIR/query.png`: a contact sheet of each photo and its results with
their scores. A photo that cannot be read is one line on stderr naming it; the others are
still answered.
"""

from __future__ import annotations

import argparse
import hashlib
import posixpath
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mga.errors import InputError
from mga.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess
from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.resources import RERANK_PRECISIONS
from pipelines.search import DEFAULT_GALLERY_WHERE, INDEX_KINDS
from pipelines.storage import Location, StorageError, resolve

if TYPE_CHECKING:
    from pipelines.tables import Snapshot

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBED_BATCH = 32


def list_photos(photos: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files named by `photos` (a directory or prefix: its images, sorted; each file
    once), and (photo, reason) for each name that holds none."""
    listed: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for photo in photos:
        try:
            location = resolve(photo)
            info = location.fs.get_file_info(location.path)
            if info.type == pafs.FileType.File:
                listed.append(location.uri)
            elif info.type == pafs.FileType.Directory:
                entries = location.fs.get_file_info(pafs.FileSelector(location.path))
                images = sorted(
                    location.join(entry.base_name).uri for entry in entries
                    if entry.type == pafs.FileType.File and entry.base_name.lower().endswith(IMAGE_SUFFIXES)
                )
                listed += images
                if not images:
                    unreadable.append((photo, "a directory with no images (" + ", ".join(IMAGE_SUFFIXES) + ")"))
            else:
                unreadable.append((photo, "no such file or directory"))
        except (StorageError, OSError) as error:
            unreadable.append((photo, str(error)))
    return list(dict.fromkeys(listed)), unreadable


def read_photos(uris: list[str], image_size: int, max_pixels: int) -> tuple[dict[str, Any], dict[str, bytes], list[tuple[str, str]]]:
    """The photos decoded as `mga embed` decodes (no box): a batch of identity columns and
    `pixels`, their encoded bytes, and (photo, reason) for each one that cannot be read."""
    kept: list[str] = []
    pixels: list[np.ndarray] = []
    encoded: dict[str, bytes] = {}
    unreadable: list[tuple[str, str]] = []
    for uri in uris:
        try:
            data = resolve(uri).read_bytes()
            pixels.append(preprocess(data, None, image_size, None, max_pixels))
        except (StorageError, ImageDecodeError) as error:
            unreadable.append((uri, str(error).removeprefix(f"cannot read {uri}: ")))  # the line names the photo once
            continue
        except Exception as error:  # noqa: BLE001 - as embed: one odd file is reported, the others answered
            unreadable.append((uri, f"cannot decode: unexpected {type(error).__name__}: {error}"))
            continue
        kept.append(uri)
        encoded[uri] = data
    batch = {
        "image_id": np.array(kept, dtype=object),
        "item_id": np.array([None] * len(kept), dtype=object),
        "split": np.array(["query"] * len(kept), dtype=object),
        "domain": np.array(["consumer"] * len(kept), dtype=object),
        "category": np.array([None] * len(kept), dtype=object),
        "sha256": np.array([hashlib.sha256(encoded[uri]).hexdigest() for uri in kept], dtype=object),
        "pixels": np.stack(pixels) if pixels else np.zeros((0, 3, image_size, image_size), np.uint8),
    }
    return batch, encoded, unreadable


def run(
    photos: list[str],
    features: str,
    top: int = 10,
    out: str | None = None,
    index: str = "exact",
    gallery_where: str = DEFAULT_GALLERY_WHERE,
    rerank_top: int = 50,
    block_rows: int = 32768,
    rerank_batch: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rerank_precision: str = "auto",
) -> dict[str, Any]:
    """Match `photos` against the gallery of the features table `features`; returns the
    results (`results`: the first `top` rankings rows per photo, with `category`), the photos
    that could not be read, and where the page went."""
    # Here, not at the top: `mga query --help` and a usage error must not wait for torch.
    from pipelines.embed.embedder import feature_rows, model_schema
    from pipelines.filters import parse_filter
    from pipelines.model_store import load_artifact, read_artifact_files
    from pipelines.resources import cpu_multiplies_bf16, execute
    from pipelines.search.approximate import build_index
    from pipelines.search.gallery_scan import LocalScanner
    from pipelines.search.queries import Gallery, QueryChunk, features_table
    from pipelines.search.ranking import ChunkSearch
    from pipelines.tables import open_table, read_table

    for name, value in (("--top", top), ("--block-rows", block_rows), ("--rerank-batch", rerank_batch), ("--max-pixels", max_pixels)):
        if value < 1:
            raise InputError(f"{name} must be positive, got {value}")
    if rerank_precision not in RERANK_PRECISIONS:
        raise InputError(f"--rerank-precision must be one of {', '.join(RERANK_PRECISIONS)}, got {rerank_precision!r}")
    if rerank_top < 0:
        raise InputError(f"--rerank-top must be non-negative, got {rerank_top}")
    if index not in INDEX_KINDS:
        raise InputError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    started = time.time()
    table = features_table(open_table(resolve(features)))
    gallery = Gallery(table, parse_filter(gallery_where, "--gallery-where"))
    gallery.require_rows("--gallery-where")
    listed, unreadable = list_photos(photos)
    files = read_artifact_files(table.info["model"])
    model, model_id, model_config = load_artifact(files, resolve(table.info["model"]).uri)
    if model_id != table.info["model_id"]:
        raise InputError(f"{table.uri} was embedded with model_id {table.info['model_id']}, but its model {table.info['model']} is now {model_id}")
    model.eval()
    batch, encoded, undecodable = read_photos(listed, int(model_config["image_size"]), max_pixels)
    unreadable += undecodable
    for photo, reason in unreadable:
        print(f"mga query: cannot read {photo}: {reason}", file=sys.stderr, flush=True)
    if not encoded:
        raise InputError(f"none of the {len(photos)} photos given could be read (see the lines above)")
    schema = model_schema(model, table.info.get("token_dtype", "float32"))
    rows = pa.concat_tables([
        feature_rows(model, model_id, schema, {name: values[start:start + EMBED_BATCH] for name, values in batch.items()})
        for start in range(0, len(encoded), EMBED_BATCH)
    ])
    chunk = QueryChunk.from_rows(rows, table.info, gallery)
    alpha = float(model_config["model"]["alpha"])
    approximate = execute(lambda: build_index(gallery, index), table.uri, "(nothing)") if index != "exact" else None
    search = ChunkSearch(gallery, LocalScanner(table.location, model, gallery.where.expression), max(top, rerank_top), rerank_top, alpha, block_rows, rerank_batch, approximate,
                         rerank_precision=rerank_precision if rerank_precision != "auto" else ("bfloat16" if cpu_multiplies_bf16() else "float32"))
    ranked = execute(lambda: search(chunk), table.uri, "(nothing)")
    results = ranked.rankings.filter(pc.field("rank") <= top)
    ids = pc.unique(results.column("gallery_id"))
    categories = read_table(table, ["image_id", "category"], pc.field("image_id").isin(ids), ("image_id", ids.to_pylist()))
    results = results.join(categories.rename_columns(["gallery_id", "category"]), "gallery_id").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    _print_results(results, list(encoded))
    written = _write_page(resolve(out), results, encoded, table) if out else []
    print_summary(
        "mga query",
        {
            "photos": f"{len(encoded)} answered, {len(unreadable)} unreadable",
            "gallery": f"{table.uri} version {table.version} where {gallery.where.text} ({ranked.gallery_rows} images, model_id {model_id})",
            "ranking": f"{'exact' if index == 'exact' else 'faiss ' + index} shortlist, top {ranked.head} reranked by ATA (alpha {alpha}, {search.rerank_precision}), first {top} shown",
            "wrote": ", ".join(written) or "nothing (no --out)",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return {"results": results, "photos": list(encoded), "unreadable": unreadable, "model_id": model_id, "gallery": ranked.gallery_rows, "written": written}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_results(results: pa.Table, photos: list[str]) -> None:
    columns = ("rank", "gallery_id", "gallery_item_id", "category", "score_global", "score_token", "score")
    header = ("rank", "gallery image id", "item id", "category", "S_global", "S_token", "S")
    for number, photo in enumerate(photos, start=1):
        mine = results.filter(pc.field("query_id") == photo).select(list(columns)).to_pylist()
        cells = [header] + [
            (str(row["rank"]), row["gallery_id"], row["gallery_item_id"] or "", row["category"] or "",
             _number(row["score_global"]), _number(row["score_token"]), _number(row["score"]))
            for row in mine
        ]
        widths = [max(len(cell[index]) for cell in cells) for index in range(len(header))]
        print(f"\nphoto {number}/{len(photos)}: {photo}")
        for cell in cells:
            print("  " + "  ".join(text.rjust(width) if index in (0, 4, 5, 6) else text.ljust(width) for index, (text, width) in enumerate(zip(cell, widths))))


def _write_page(target: Location, results: pa.Table, encoded: dict[str, bytes], table: Snapshot) -> list[str]:
    """`query.png` (each photo, then its results with their scores) and `query.html` in `target`."""
    from pipelines.catalog import catalog_images, features_catalog
    from pipelines.report import GalleryExample, Section, gallery_picture, render_html

    notes: list[str] = []
    images = catalog_images(features_catalog(table, notes), results.column("gallery_id").to_pylist(), notes)
    examples, sections = [], []
    for photo in encoded:
        mine = results.filter(pc.field("query_id") == photo).to_pylist()
        examples.append(GalleryExample(
            photo, tuple(row["gallery_id"] for row in mine), tuple(None for _ in mine),
            tuple(f"S {row['score']:.3f} g {row['score_global']:.3f}" for row in mine),
        ))
        sections.append(Section(
            posixpath.basename(photo) or photo, paragraphs=[photo],
            header=["rank", "gallery image id", "item id", "category", "S_global", "S_token", "S"],
            rows=[[str(row["rank"]), row["gallery_id"], row["gallery_item_id"] or "", row["category"] or "",
                   _number(row["score_global"]), _number(row["score_token"]), _number(row["score"])] for row in mine],
        ))
    figures = {"query.png": gallery_picture(examples, {**images, **encoded})}
    overview = Section(
        "Photos and their results", paragraphs=[f"Gallery: {table.uri} (version {table.version}), model {table.info['model_id']}."],
        items=notes, figure="query.png", caption="each photo (blue), then its results in reranked order with S and S_global",
    )
    written = []
    for name, data in (("query.png", figures["query.png"]), ("query.html", render_html("mga query", [overview, *sections], figures).encode())):
        target.join(name).write_bytes(data)
        written.append(target.join(name).uri)
    return written


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="image files (local or s3://); a directory or prefix means the images in it")
    parser.add_argument("--features", required=True, help="features table URI written by `mga embed`: its gallery rows are searched, with its model")
    parser.add_argument("--top", type=int, default=10, help="results shown per photo (default: %(default)s)")
    parser.add_argument("--out", default=None, help="directory for query.html and query.png (default: print only)")
    parser.add_argument("--index", default="exact", choices=INDEX_KINDS, help="exact shortlist, or a faiss index built over the gallery")
    parser.add_argument("--gallery-where", default=DEFAULT_GALLERY_WHERE, help="SQL filter on the identity columns choosing the gallery rows (default: %(default)s)")
    parser.add_argument("--rerank-top", type=int, default=50, help="candidates per photo reranked by ATA, as `mga search` (default: %(default)s)")
    parser.add_argument("--rerank-precision", default="auto", choices=RERANK_PRECISIONS,
                        help="ATA's arithmetic, as `mga search`: auto = bfloat16 where this CPU has bfloat16 dot products, else float32")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse photos with more pixels than this")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.photos, args.features, top=args.top, out=args.out, index=args.index, gallery_where=args.gallery_where,
               rerank_top=args.rerank_top, max_pixels=args.max_pixels, rerank_precision=args.rerank_precision)


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
