"""`mga embed`: Ray Data batch inference of a catalog into the features table.

Decoding and preprocessing run as Ray Data CPU tasks; the model runs in an actor pool
(one GPU per actor where there are GPUs, bf16 there); rows stream to Parquet, so memory
does not grow with the catalog. The table is published atomically (pipelines.storage):
a job that fails or is killed leaves the previous snapshot as readers saw it, and its
own half-written snapshot is deleted (or, after a SIGKILL, removed by the next publish).
Before publishing, the job checks that every requested image is in the new snapshot or
its rejects exactly once (a retried task or a restarted actor cannot duplicate a row).

Images that cannot be decoded are set aside in the snapshot's rejects file with a reason;
so is an image whose decoding raises anything unexpected: one bad file never fails a
catalog-scale job.

GPUs: `--use-gpu auto` (default) asks for one GPU per actor when the cluster has GPUs up
when the job starts, and runs on CPU otherwise; `--use-gpu yes` asks for GPUs even when
none are up, so an autoscaling cluster scales its GPU worker group up from zero (the job
waits for it); `--use-gpu no` stays on CPU. `--gpus-per-actor 0.5` packs two actors on a GPU.

Token dtype: `--token-dtype float16` halves the token columns (Parquet FLOAT16 logical
type; pyarrow reads it as halffloat, DuckDB >= 1.1 as FLOAT). Search computes in float32
either way; tests/test_retrieval.py measures the ranking cost of float16 tokens.
"""

from __future__ import annotations

import argparse
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

from mga.artifact import ArtifactError, unpack_artifact
from mga.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess
from pipelines.catalog import open_catalog, table_dataset
from pipelines.console import print_summary
from pipelines.model_store import read_artifact_files
from pipelines.resources import actor_cpus, actor_device, actor_gpus, actor_pool, add_gpu_arguments, default_actors, execute
from pipelines.runtime import init_ray
from pipelines.schemas import IDENTITY_COLUMNS, REJECTS, features_schema
from pipelines.storage import (
    Location,
    TableNotFound,
    discard_snapshot,
    list_files,
    new_snapshot,
    publish,
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
        except Exception as error:  # noqa: BLE001 - one odd file must not fail the job; it is reported
            reason = f"cannot decode: unexpected {type(error).__name__}: {error}"
            rejected.append((batch.column("image_id")[row].as_py(), batch.column("source_path")[row].as_py(), reason))
    if rejected:
        ray.get(reject_log.add.remote(rejected))
    rows = pa.array(kept, pa.int64())  # typed: a batch whose rows were all rejected takes nothing
    output = {name: np.array(batch.column(name).take(rows).to_pylist(), dtype=object) for name in IDENTITY_COLUMNS}
    output["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 3, image_size, image_size), np.uint8)
    return output


def fixed_size_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    rows = values.shape[0]
    flat = values.reshape(rows, -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=dtype), flat.shape[1])


class Embedder:
    """Actor: the model, loaded once from the artifact bytes in the object store."""

    def __init__(self, artifact: list, token_dtype: str, use_gpu: bool = True) -> None:
        model, self.model_id, _ = unpack_artifact(ray.get(artifact[0]))
        self.device = actor_device(use_gpu)
        self.model = model.to(self.device).eval()
        config = model.config
        self.token_dtype = token_dtype
        self.schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), TOKEN_DTYPES[token_dtype])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if len(batch["pixels"]) == 0:  # every image of the batch was rejected
            return self.schema.empty_table()
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


def load_artifact(files: dict[str, bytes], where: str) -> tuple[Any, str, dict[str, Any]]:
    """unpack_artifact, with whatever a corrupt or hostile artifact raises (safetensors, JSON,
    config errors) reported as an ArtifactError naming it: a one-line error, never a traceback."""
    try:
        return unpack_artifact(files, where=where)
    except ArtifactError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ArtifactError(f"{where}: not a loadable model artifact ({type(error).__name__}: {error})") from error


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


def carry_over(table: Location, files: list[str], carry_ids: set[str], snapshot: Location, schema: pa.Schema) -> int:
    """Copy the stored rows in `carry_ids` into `snapshot`, one output file per input file,
    a record batch at a time (memory stays bounded by a row group), cast to `schema`
    (a change of --token-dtype converts the carried tokens too). Returns the rows copied."""
    wanted = pa.array(sorted(carry_ids), pa.string())
    copied = 0
    for number, path in enumerate(files):
        source = pq.ParquetFile(path, filesystem=table.fs)
        target = snapshot.join(f"carried-{number:05d}.parquet")
        with pq.ParquetWriter(target.path, schema, filesystem=snapshot.fs, compression="zstd") as writer:
            for batch in source.iter_batches(batch_size=4096):
                kept = batch.filter(pc.is_in(batch.column("image_id"), value_set=wanted))
                if kept.num_rows:
                    writer.write_table(pa.Table.from_batches([kept]).select(schema.names).cast(schema))
                    copied += kept.num_rows
    return copied


def check_exactly_once(snapshot: Location, data_files: list[str], rejects: list[tuple[str, str, str]], expected: set[str]) -> int:
    """Every expected image is in the snapshot or its rejects exactly once, nothing else is; returns the rows written."""
    ids: list[str] = []
    for path in data_files:
        ids += pq.read_table(path, columns=["image_id"], filesystem=snapshot.fs).column("image_id").to_pylist()
    written = set(ids)
    rejected = {row[0] for row in rejects}
    problems = []
    if len(written) != len(ids):
        problems.append(f"{len(ids) - len(written)} duplicate rows")
    if written & rejected:
        problems.append(f"{len(written & rejected)} images both written and rejected")
    if written | rejected != expected:
        problems.append(f"{len(expected - written - rejected)} images missing, {len((written | rejected) - expected)} unexpected")
    if problems:
        raise RuntimeError(f"embed: the new snapshot {snapshot.uri} is inconsistent ({'; '.join(problems)}); it was not published")
    return len(ids)


def run(
    model: str,
    catalog: str,
    out: str,
    incremental: bool = False,
    batch_size: int = 64,
    actors: int | None = None,
    token_dtype: str = "float32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    use_gpu: str = "auto",
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float = 2.0,
) -> dict[str, Any]:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"--token-dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if actors is not None and actors < 1:
        raise ValueError(f"--actors must be positive, got {actors}")
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be positive, got {max_pixels}")
    actor_gpus(use_gpu, 0, gpus_per_actor), actor_cpus(0, cpus_per_actor)  # validate before anything runs
    started = time.time()
    catalog_location, _ = open_catalog(catalog)
    files = read_artifact_files(model)
    model_object, model_id, model_config = load_artifact(files, resolve(model).uri)
    image_size = int(model_config["image_size"])
    table = resolve(out)

    init_ray()
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    actors = actors or default_actors(gpus, gpus_up)
    plan = plan_incremental(table, catalog_location, model_id) if incremental else IncrementalPlan(None, set(), {})
    to_embed, carry_ids, counts = plan.embed_ids, plan.carry_ids, plan.counts
    carry_files = table_files(table) if carry_ids else []
    # What must come out: each requested image_id once, as a row or a reject.
    requested_ids = to_embed if to_embed is not None else set(read_table(catalog_location, columns=["image_id"]).column("image_id").to_pylist())
    requested = len(requested_ids)
    config = model_object.config
    schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), TOKEN_DTYPES[token_dtype])

    snapshot = new_snapshot(table)
    try:
        reject_log = RejectLog.remote()
        columns = [*IDENTITY_COLUMNS, "image", "bbox", "source_path"]
        if to_embed is None or to_embed:

            def job() -> None:
                dataset = table_dataset(catalog_location, columns, *([] if to_embed is None else [("image_id", to_embed)]))
                dataset = dataset.map_batches(
                    prepare_batch,
                    fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "reject_log": reject_log},
                    batch_size=batch_size,
                    batch_format="pyarrow",
                    num_cpus=0.5,
                )
                # Ray Data restarts a dead actor and retries its batches (max_restarts=-1 and
                # max_task_retries=-1 are its defaults for actor pools); check_exactly_once
                # below proves nothing was lost or written twice.
                dataset = dataset.map_batches(
                    Embedder,
                    fn_constructor_kwargs={"artifact": [ray.put(files)], "token_dtype": token_dtype, "use_gpu": gpus > 0},
                    batch_size=batch_size,
                    batch_format="numpy",
                    compute=actor_pool(actors),
                    num_gpus=gpus,
                    num_cpus=actor_cpus(gpus, cpus_per_actor),
                )
                dataset.write_parquet(snapshot.path, filesystem=snapshot.fs)

            execute(job, catalog_location.uri, table.uri)
        carried = carry_over(table, carry_files, carry_ids, snapshot, schema) if carry_ids else 0
        if carried != len(carry_ids):
            raise RuntimeError(f"embed: {len(carry_ids)} rows to carry over from {table.uri}, found {carried}")
        data_files = list_files(snapshot, ".parquet")
        rejects = ray.get(reject_log.all.remote())
        if not data_files:  # everything rejected: an empty table with the schema, so readers still work
            empty = snapshot.join("part-empty.parquet")
            write_parquet(empty, schema.empty_table())
            data_files = [empty.path]
        total = check_exactly_once(snapshot, data_files, rejects, requested_ids | carry_ids)
        embedded = total - len(carry_ids)
        rejects_files = []
        if rejects:
            rejects_location = snapshot.join("_rejects.parquet")
            write_parquet(rejects_location, pa.table({"source_path": [r[1] for r in rejects], "reason": [r[2] for r in rejects]}, schema=REJECTS))
            rejects_files = [rejects_location.path]
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
    except BaseException:
        discard_snapshot(snapshot)
        raise
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
    rows["actors"] = f"{actors} x " + (f"{gpus:g} GPU" if gpus else "CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)"
    rows["wall time"] = f"{time.time() - started:.1f} s"
    print_summary("mga embed", rows)
    return manifest


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact URI written by `mga train`")
    parser.add_argument("--catalog", required=True, help="catalog table URI")
    parser.add_argument("--out", required=True, help="features table URI to publish")
    parser.add_argument("--incremental", action="store_true", help="embed only new or changed images, carry the rest over")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="most model actors: the pool starts with one and grows while work queues (default: one per GPU up, else 1)")
    parser.add_argument("--token-dtype", default="float32", choices=sorted(TOKEN_DTYPES), help="dtype of the token columns (float16 halves them)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images with more pixels than this")
    add_gpu_arguments(parser, "model")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.model, args.catalog, args.out, args.incremental, args.batch_size, args.actors, args.token_dtype, args.max_pixels,
        use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
