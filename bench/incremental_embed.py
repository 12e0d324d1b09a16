"""`mga embed --incremental` after 1% of a 10,000-image catalog changed: bytes read, rows written.

    python -m bench.incremental_embed [--images 10000] [--changed 0.01] [--workdir DIR]

Also the other filtered reads of the catalog (the training stream's split, validation's
images, the report's gallery picture), replayed the same way.

A retailer's catalog is made the way a user has one: JPEG files and a manifest CSV
(exported from a synthetic catalog), prepared with `mga prepare manifest` and embedded
once. Then 1% of it changes: half of the changed images get new bytes (re-encoded: a new
sha256), a quarter leave the manifest, a quarter are new images of existing items; the
catalog is rebuilt with `mga prepare manifest --incremental` (a merge: new and changed
images go to new files, unchanged ones stay where they are stored). Then:

- image bytes read: the catalog read that `embed --incremental` makes (the catalog files
  its plan found the rows to embed in, their row groups pruned by statistics, the id
  filter pushed into the scan) is replayed through a byte-counting filesystem, against
  the total size of the catalog's files and of its `image` column chunks;
- rows written: the real `embed.run(incremental=True)` reports the rows it wrote (new and
  re-embedded rows, plus the unchanged rows of every stored file it had to rewrite because a
  changed or deleted row sat in it) against the table's rows; the merge of the catalog
  reports the same for the catalog.

Counts, not timings: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from bench.common import git_revision, machine, tiny_model_config, write_random_artifact
from pipelines import embed, prepare, synth
from pipelines.embed.merge import plan_incremental
from pipelines.storage import Location, resolve
from pipelines.synthetic import SynthSpec
from pipelines.tables import open_table, read_table
from pipelines.train.validation import select_validation

SHARD_MB = 1.0


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


def export_manifest(catalog_uri: str, directory: str) -> str:
    """The catalog's images as JPEG files under `directory` plus a manifest CSV naming them."""
    rows = read_table(open_table(resolve(catalog_uri)), ["image_id", "item_id", "split", "domain", "category", "image"])
    lines = ["path,item_id,split,domain,category"]
    for image_id, item, split, domain, category, data in zip(*(rows.column(name).to_pylist() for name in rows.column_names)):
        path = f"images/{image_id}.jpg"
        os.makedirs(os.path.dirname(os.path.join(directory, path)), exist_ok=True)
        with open(os.path.join(directory, path), "wb") as handle:
            handle.write(data)
        lines.append(f"{path},{item},{split},{domain},{category}")
    manifest = os.path.join(directory, "catalog.csv")
    with open(manifest, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return manifest


def change_manifest(manifest: str, fraction: float, seed: int) -> dict[str, int]:
    """Change `fraction` of the manifest's images on disk and in the CSV, as a catalog's day does."""
    directory = os.path.dirname(manifest)
    with open(manifest) as handle:
        header, *lines = handle.read().splitlines()
    rng = np.random.default_rng(seed)
    count = max(4, int(round(len(lines) * fraction)))
    picked = rng.choice(len(lines), size=count, replace=False)
    changed, deleted, copied = np.split(picked, [count // 2, count // 2 + count // 4])
    for row in changed:  # new bytes under the same path
        path = os.path.join(directory, lines[row].split(",")[0])
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="JPEG", quality=70)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue())
    new_lines = []
    for row in copied:  # a new photo of an existing item
        relative, rest = lines[row].split(",", 1)
        target = relative.replace(".jpg", "-new.jpg")
        shutil.copyfile(os.path.join(directory, relative), os.path.join(directory, target))
        new_lines.append(f"{target},{rest}")
    kept = [line for index, line in enumerate(lines) if index not in set(deleted.tolist())]
    with open(manifest, "w") as handle:
        handle.write("\n".join([header, *kept, *new_lines]) + "\n")
    return {"changed": len(changed), "deleted": len(deleted), "new": len(copied), "rows": len(kept) + len(new_lines)}


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
    plan = plan_incremental(open_table(resolve(features_uri)), catalog, model_id)
    where = [("image_id", plan.embed_ids.to_pylist())]
    rows, read, files = counted_read(catalog.only(plan.embed_files), ["image_id", "image", "bbox"], pc.field("image_id").isin(plan.embed_ids), *where)
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
    validation = counted_read(catalog, ["image_id", "image", "bbox"], pc.field("image_id").isin(ids), ("split", ["val", "query", "gallery"]), ("item_id", items), ("image_id", ids))
    picture_ids = sorted(read_table(catalog, ["image_id"], pc.field("split") == "gallery", ("split", ["gallery"])).column("image_id").to_pylist())[::97][:48]
    picture = counted_read(catalog, ["image_id", "image"], pc.field("image_id").isin(picture_ids), ("split", ["val", "query", "gallery"]), ("image_id", picture_ids))
    return {"training stream (split=train)": train_rows, f"validation ({len(ids)} images)": validation, f"report picture ({len(picture_ids)} images)": picture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mga-incremental-")
    paths = {name: os.path.join(workdir, name) for name in ("synth", "files", "catalog", "model", "features")}
    # Items of 5 images on average (train 6, test 2 + 2): groups of 4 items.
    spec = SynthSpec(seed=0, groups=max(1, args.images // 20), items_per_group=4, test_fraction=0.5, train_views=6, gallery_views=2, query_views=2, image_size=64)
    synth.run(paths["synth"], spec)
    manifest = export_manifest(paths["synth"], paths["files"])
    # 1 MB shards: about as many files per image as 256 MB shards of 100 KB photos give a real catalog.
    prepare.run("manifest", paths["catalog"], manifest=manifest, shard_mb=SHARD_MB)
    model_config, image_size = tiny_model_config()
    write_random_artifact(paths["model"], model_config, image_size)
    first = embed.run(paths["model"], paths["catalog"], paths["features"], batch_size=64)
    change = change_manifest(manifest, args.changed, seed=1)
    rebuilt = prepare.run("manifest", paths["catalog"], manifest=manifest, shard_mb=SHARD_MB, incremental=True)["incremental"]
    assert {key: rebuilt[key] for key in ("new", "changed", "deleted")} == {key: change[key] for key in ("new", "changed", "deleted")}, (rebuilt, change)
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
        f"catalog merge (prepare --incremental) wrote {rebuilt['rows_written']} of {change['rows']} rows "
        f"({rebuilt['rows_written'] / change['rows']:.1%}; {rebuilt['files_rewritten']} stored files rewritten without stale rows)"
    )
    print(
        f"written: {counts['rows_written']} of {merged['rows']} rows ({counts['rows_written'] / merged['rows']:.1%}): "
        f"{merged['embedded']} embedded + {counts['rows_written'] - merged['embedded']} unchanged rows of rewritten files"
    )


if __name__ == "__main__":
    main()
