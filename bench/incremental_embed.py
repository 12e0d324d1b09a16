"""`mga embed --incremental` after 1% of a 10,000-image catalog changed: bytes read, rows written.

    python -m bench.incremental_embed [--images 10000] [--changed 0.01] [--workdir DIR]

Also the other filtered reads of the catalog (the training stream's split, validation's
images, the report's gallery picture), replayed the same way.

The catalog is synthesised, embedded once, then 1% of it changes the way a catalog rebuild
(`mga synth`/`mga prepare` overwriting the catalog) changes it: half of the changed images get
new bytes (re-encoded: a new sha256), a quarter are deleted, a quarter are new images of
existing items; the rebuilt catalog is laid out as synth lays it out (sorted by item, 64-row
row groups). Then:

- image bytes read: the catalog read that `embed --incremental` makes (its file pruning and
  the id filter pushed into the Parquet scan) is replayed through a byte-counting filesystem,
  against the total size of the catalog's `image` column chunks and of its files;
- rows written: the real `embed.run(incremental=True)` reports the rows it wrote (new and
  re-embedded rows, plus the unchanged rows of every stored file it had to rewrite because a
  changed or deleted row sat in it) against the table's rows.

Counts, not timings: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from bench.common import git_revision, machine, tiny_model_config, write_random_artifact
from pipelines.synthetic import SynthSpec
from pipelines import embed, synth
from pipelines.schemas import CATALOG
from pipelines.storage import Location, resolve, write_parquet
from pipelines.tables import TableWriter, open_table, read_table
from pipelines.train.validation import select_validation


class CountingFile:
    """A read-only file object that counts the bytes read through it."""

    def __init__(self, handle, counter: list[int]) -> None:
        self.handle, self.counter, self.closed = handle, counter, False

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.counter[0] += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self.handle.close()


class CountingHandler(pafs.FileSystemHandler):
    """Local files, every byte read counted (pyarrow's own readers go through it)."""

    def __init__(self) -> None:
        self.local, self.counter = pafs.LocalFileSystem(), [0]

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_file(self, path: str):
        return pa.PythonFile(CountingFile(open(path, "rb"), self.counter), mode="r")

    def open_input_stream(self, path: str):
        return self.open_input_file(path)

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    # Writing is not needed to replay a read.
    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = None
    open_output_stream = open_append_stream = None


def change_catalog(uri: str, fraction: float, seed: int) -> dict[str, int]:
    """Rewrite the catalog as a rebuild would after `fraction` of its images changed."""
    catalog = open_table(resolve(uri))
    rows = read_table(catalog)
    rng = np.random.default_rng(seed)
    count = max(4, int(round(rows.num_rows * fraction)))
    picked = rng.choice(rows.num_rows, size=count, replace=False)
    changed, deleted, copied = np.split(picked, [count // 2, count // 2 + count // 4])
    images = rows.column("image").to_pylist()
    sha = rows.column("sha256").to_pylist()
    for row in changed:  # new bytes for the same image id
        buffer = io.BytesIO()
        Image.open(io.BytesIO(images[row])).save(buffer, format="JPEG", quality=70)
        images[row] = buffer.getvalue()
        sha[row] = hashlib.sha256(images[row]).hexdigest()
    rows = rows.set_column(rows.column_names.index("image"), "image", pa.array(images, pa.binary()))
    rows = rows.set_column(rows.column_names.index("sha256"), "sha256", pa.array(sha, pa.string()))
    new = rows.take(pa.array(copied))
    new = new.set_column(0, "image_id", pc.binary_join_element_wise(new.column("image_id"), pa.scalar("-new"), ""))
    keep = np.ones(rows.num_rows, bool)
    keep[deleted] = False
    rebuilt = pa.concat_tables([rows.filter(pa.array(keep)), new]).sort_by([(key, "ascending") for key in ("split", "item_id", "image_id")])
    with TableWriter(resolve(uri)) as writer:  # synth's layout: files of one split, sorted by item, 64-row row groups
        for split in pc.unique(rebuilt.column("split")).to_pylist():
            part = rebuilt.filter(pc.equal(rebuilt.column("split"), split))
            for start in range(0, part.num_rows, 500):
                name = f"{split}-{start // 500:05d}.parquet"
                write_parquet(writer.file(name), part.slice(start, 500).cast(CATALOG), row_group_size=synth.ROW_GROUP_ROWS)
        writer.commit(CATALOG, {**catalog.info, "rows": rebuilt.num_rows})
    return {"changed": len(changed), "deleted": len(deleted), "new": len(copied), "rows": rebuilt.num_rows}


def image_bytes(paths: list[str]) -> int:
    """Compressed bytes of the `image` column chunks in `paths`."""
    total = 0
    for path in paths:
        metadata = pq.read_metadata(path)
        column = metadata.schema.to_arrow_schema().get_field_index("image")
        total += sum(metadata.row_group(group).column(column).total_compressed_size for group in range(metadata.num_row_groups))
    return total


def counted_read(catalog, columns: list[str], filter: pc.Expression, *where) -> tuple[int, int, int]:
    """(rows, bytes read, files read) of a filtered read of the catalog through tables.read_table's
    pruning (files by statistics, then row groups by footer statistics), the bytes counted."""
    handler = CountingHandler()
    counting = dataclasses.replace(catalog, location=Location(pafs.PyFileSystem(handler), catalog.location.path, catalog.location.uri))
    table = read_table(counting, columns, filter, *where)
    return table.num_rows, handler.counter[0], len(catalog.paths(*where))


def replay_read(catalog_uri: str, features_uri: str, model_id: str) -> dict[str, int]:
    """The catalog bytes `embed --incremental` reads: its plan, its pruning, its pushed-down filter."""
    catalog = open_table(resolve(catalog_uri))
    plan = embed.plan_incremental(open_table(resolve(features_uri)), catalog, model_id)
    where = [("item_id", plan.embed_items.to_pylist()), ("image_id", plan.embed_ids.to_pylist())]
    rows, read, files = counted_read(catalog, ["image_id", "image", "bbox"], pc.field("image_id").isin(plan.embed_ids), *where)
    assert rows == len(plan.embed_ids), (rows, len(plan.embed_ids))
    all_paths = catalog.paths()
    return {
        "to_embed": len(plan.embed_ids), "files_read": files, "files": len(all_paths), "bytes_read": read,
        "catalog_bytes": catalog.bytes(all_paths), "catalog_image_bytes": image_bytes(all_paths),
    }


def filtered_reads(catalog_uri: str) -> dict[str, tuple[int, int, int]]:
    """Bytes read by the other filtered reads: the training stream, validation, the report's picture."""
    catalog = open_table(resolve(catalog_uri))
    train_rows = counted_read(catalog, ["item_id", "image", "bbox"], pc.field("split") == "train", ("split", ["train"]))
    selection = select_validation(catalog_uri, max_queries=200, max_gallery=1000, seed=0)
    pairs = selection["queries"] + selection["gallery"]
    ids, items = [image_id for image_id, _ in pairs], [item for _, item in pairs]
    validation = counted_read(catalog, ["image_id", "image", "bbox"], pc.field("image_id").isin(ids), ("item_id", items), ("image_id", ids))
    picture_ids = sorted(read_table(catalog, ["image_id"], pc.field("split") == "gallery", ("split", ["gallery"])).column("image_id").to_pylist())[::97][:48]
    picture = counted_read(catalog, ["image_id", "image"], pc.field("image_id").isin(picture_ids), ("image_id", picture_ids))
    return {"training stream (split=train)": train_rows, f"validation ({len(ids)} images)": validation, f"report picture ({len(picture_ids)} images)": picture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mga-incremental-")
    paths = {name: os.path.join(workdir, name) for name in ("catalog", "model", "features")}
    # Items of 5 images on average (train 6, test 2 + 2): groups of 4 items.
    spec = SynthSpec(seed=0, groups=max(1, args.images // 20), items_per_group=4, test_fraction=0.5, train_views=6, gallery_views=2, query_views=2, image_size=64)
    synth.run(paths["catalog"], spec)
    model_config, image_size = tiny_model_config()
    write_random_artifact(paths["model"], model_config, image_size)
    first = embed.run(paths["model"], paths["catalog"], paths["features"], batch_size=64)
    change = change_catalog(paths["catalog"], args.changed, seed=1)
    read = replay_read(paths["catalog"], paths["features"], first["model_id"])
    merged = embed.run(paths["model"], paths["catalog"], paths["features"], incremental=True, batch_size=64)
    counts = merged["incremental"]
    assert counts["new"] == change["new"] and counts["changed"] == change["changed"] and counts["deleted"] == change["deleted"], (counts, change)
    print(f"machine: {machine()}; revision {git_revision()}")
    print(f"catalog: {first['rows']} images -> {change['rows']} after {change['changed']} changed, {change['deleted']} deleted, {change['new']} new")
    print(
        f"read:    {read['bytes_read'] / 2**20:.2f} MiB of the catalog's {read['catalog_bytes'] / 2**20:.2f} MiB "
        f"({read['bytes_read'] / read['catalog_bytes']:.1%}; image column chunks {read['catalog_image_bytes'] / 2**20:.2f} MiB), "
        f"{read['files_read']} of {read['files']} files, {read['to_embed']} images to embed"
    )
    total = read["catalog_bytes"]
    for name, (rows, bytes_read, files) in filtered_reads(paths["catalog"]).items():
        print(f"read:    {name}: {rows} rows, {bytes_read / 2**20:.2f} MiB ({bytes_read / total:.1%} of the catalog), {files} of {read['files']} files")
    print(
        f"written: {counts['rows_written']} of {merged['rows']} rows ({counts['rows_written'] / merged['rows']:.1%}): "
        f"{merged['embedded']} embedded + {counts['rows_written'] - merged['embedded']} unchanged rows of rewritten files"
    )


if __name__ == "__main__":
    main()
