"""`mga embed`: Ray Data batch inference of a catalog into the features table.

Decoding and preprocessing run as Ray Data CPU tasks; the model runs in an actor pool
(one GPU per actor where there are GPUs, bf16 there); rows stream to Parquet, so memory
does not grow with the catalog. The table is published atomically (pipelines.storage).
Images that cannot be decoded are set aside in the snapshot's rejects file with a reason.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from mga.artifact import unpack_artifact
from mga.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess
from pipelines.catalog import open_catalog, table_dataset
from pipelines.console import print_summary
from pipelines.model_store import read_artifact_files
from pipelines.runtime import init_ray
from pipelines.schemas import IDENTITY_COLUMNS, REJECTS, features_schema
from pipelines.storage import (
    Location,
    TableNotFound,
    list_files,
    new_snapshot,
    publish,
    read_manifest,
    read_table,
    resolve,
    table_files,
    write_parquet,
)

# Columns that decide whether a stored row is still valid for a catalog row.
CHANGE_KEY = ("sha256", "item_id", "split", "domain", "category")
TOKEN_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


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
    if rejected:
        ray.get(reject_log.add.remote(rejected))
    output = {name: np.array(batch.column(name).take(kept).to_pylist(), dtype=object) for name in IDENTITY_COLUMNS}
    output["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 3, image_size, image_size), np.uint8)
    return output


def fixed_size_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    rows = values.shape[0]
    flat = values.reshape(rows, -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=dtype), flat.shape[1])


class Embedder:
    """Actor: the model, loaded once from the artifact bytes in the object store."""

    def __init__(self, artifact: list, token_dtype: str, threads: int) -> None:
        model, self.model_id, _ = unpack_artifact(ray.get(artifact[0]))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = model.to(self.device).eval()
        config = model.config
        self.token_dtype = token_dtype
        self.schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), TOKEN_DTYPES[token_dtype])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            embedding = self.model.embed(pixels)
        rows = len(pixels)
        columns: dict[str, Any] = {name: pa.array(batch[name].tolist(), pa.string()) for name in IDENTITY_COLUMNS}
        columns["model_id"] = pa.array([self.model_id] * rows, pa.string())
        columns["global"] = fixed_size_list(embedding.global_feature.float().cpu().numpy(), pa.float32())
        numpy_dtype = np.float16 if self.token_dtype == "float16" else np.float32
        for layer, tokens in enumerate(embedding.tokens):
            columns[f"tokens_{layer}"] = fixed_size_list(tokens.float().cpu().numpy().astype(numpy_dtype), TOKEN_DTYPES[self.token_dtype])
        columns["embedded_at"] = pa.array([datetime.now(timezone.utc)] * rows, pa.timestamp("us", tz="UTC"))
        return pa.table(columns, schema=self.schema)


@dataclass
class IncrementalPlan:
    """Which catalog rows to embed (None: all) and which stored rows to carry over."""

    embed_ids: set[str] | None
    carry_ids: set[str]
    counts: dict[str, int]


def _keyed(table: pa.Table, columns: tuple[str, ...]) -> dict[str, tuple]:
    values = [table.column(name).to_pylist() for name in columns]
    return {image_id: tuple(row) for image_id, *row in zip(table.column("image_id").to_pylist(), *values)}


def plan_incremental(out: Location, catalog: Location, model_id: str) -> IncrementalPlan:
    """Compare the catalog with the published features by image_id, sha256 (and identity) and model_id."""
    now = _keyed(read_table(catalog, columns=["image_id", *CHANGE_KEY]), CHANGE_KEY)
    try:
        before = _keyed(read_table(out, columns=["image_id", *CHANGE_KEY, "model_id"]), (*CHANGE_KEY, "model_id"))
    except TableNotFound:
        return IncrementalPlan(None, set(), {"new": len(now), "changed": 0, "unchanged": 0, "deleted": 0})
    unchanged = {image_id for image_id, key in now.items() if before.get(image_id) == (*key, model_id)}
    new = set(now) - set(before)
    changed = set(now) - unchanged - new
    counts = {"new": len(new), "changed": len(changed), "unchanged": len(unchanged), "deleted": len(set(before) - set(now))}
    return IncrementalPlan(new | changed, unchanged, counts)


def run(
    model: str,
    catalog: str,
    out: str,
    incremental: bool = False,
    batch_size: int = 64,
    actors: int | None = None,
    token_dtype: str = "float32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"--token-dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    started = time.time()
    catalog_location, catalog_manifest = open_catalog(catalog)
    files = read_artifact_files(model)
    model_object, model_id, model_config = unpack_artifact(files, where=resolve(model).uri)
    image_size = int(model_config["image_size"])
    table = resolve(out)

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = actors or max(1, gpus)
    threads = max(1, (os.cpu_count() or 1) // actors)
    plan = plan_incremental(table, catalog_location, model_id) if incremental else IncrementalPlan(None, set(), {})
    to_embed, carry_ids, counts = plan.embed_ids, plan.carry_ids, plan.counts
    carry_files = table_files(table) if carry_ids else []

    snapshot = new_snapshot(table)
    reject_log = RejectLog.remote()
    columns = [*IDENTITY_COLUMNS, "image", "bbox", "source_path"]
    if to_embed is None or to_embed:
        dataset = table_dataset(catalog_location, columns, None if to_embed is None else ("image_id", to_embed))
        dataset = dataset.map_batches(
            prepare_batch,
            fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "reject_log": reject_log},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        dataset = dataset.map_batches(
            Embedder,
            fn_constructor_kwargs={"artifact": [ray.put(files)], "token_dtype": token_dtype, "threads": threads},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        dataset.write_parquet(snapshot.path, filesystem=snapshot.fs)
    if carry_ids:
        previous = pa.concat_tables(
            pq.read_table(path, filesystem=table.fs, filters=pc.field("image_id").isin(sorted(carry_ids))) for path in carry_files
        )
        write_parquet(snapshot.join("carried.parquet"), previous.cast(pq.read_schema(carry_files[0], filesystem=table.fs)))
    data_files = list_files(snapshot, ".parquet")
    embedded = sum(pq.read_metadata(path, filesystem=table.fs).num_rows for path in data_files) - len(carry_ids)
    rejects = ray.get(reject_log.all.remote())
    rejects_files = []
    if rejects:
        rejects_location = snapshot.join("_rejects.parquet")
        write_parquet(rejects_location, pa.table({"source_path": [r[1] for r in rejects], "reason": [r[2] for r in rejects]}, schema=REJECTS))
        rejects_files = [rejects_location.path]
    requested = catalog_manifest.get("rows", 0) if to_embed is None else len(to_embed)
    if embedded + len(rejects) != requested:
        raise RuntimeError(f"embed lost rows: {requested} requested, {embedded} embedded + {len(rejects)} rejected")
    config = model_object.config
    manifest = publish(
        table,
        snapshot,
        {
            "table": "features",
            "catalog": catalog_location.uri,
            "model": resolve(model).uri,
            "model_id": model_id,
            "global_dim": config.global_dim,
            "num_tokens": config.num_tokens,
            "token_dim": config.token_dim,
            "layers": list(config.layers),
            "token_dtype": token_dtype,
            "image_size": image_size,
            "config": config.model_dump(mode="json"),
            "rows": embedded + len(carry_ids),
            "embedded": embedded,
            "carried": len(carry_ids),
            "rejected": len(rejects),
            "rejects_files": [posixpath.relpath(path, table.path) for path in rejects_files],
            **({"incremental": counts} if incremental else {}),
        },
        files=data_files,
    )
    rows = {
        "read": f"{catalog_location.uri} ({requested} images to embed)",
        "model": f"{resolve(model).uri} (model_id {model_id})",
        "wrote": f"{table.uri} (snapshot {manifest['snapshot']}, {manifest['rows']} rows, D={config.global_dim}, "
        f"{len(config.layers)} layers x M={config.num_tokens} x d={config.token_dim}, tokens {token_dtype})",
        "embedded": embedded,
        "rejected": f"{len(rejects)}" + (f" (reasons in {table.uri}/{manifest['snapshot']}/_rejects.parquet)" if rejects else ""),
    }
    if incremental:
        rows["incremental"] = ", ".join(f"{key} {value}" for key, value in counts.items())
    rows["actors"] = f"{actors} x {'GPU' if gpus else 'CPU'}"
    rows["wall time"] = f"{time.time() - started:.1f} s"
    print_summary("mga embed", rows)
    return manifest


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact URI written by `mga train`")
    parser.add_argument("--catalog", required=True, help="catalog table URI")
    parser.add_argument("--out", required=True, help="features table URI to publish")
    parser.add_argument("--incremental", action="store_true", help="embed only new or changed images, carry the rest over")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--token-dtype", default="float32", choices=sorted(TOKEN_DTYPES))
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.model, args.catalog, args.out, args.incremental, args.batch_size, args.actors, args.token_dtype, args.max_pixels)


def main(argv: list[str] | None = None) -> None:
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
