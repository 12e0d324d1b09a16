"""`mga embed`: Ray Data batch inference of a catalog into the features table.

Decoding and preprocessing run as Ray Data CPU tasks; the model runs in an actor pool
(one GPU per actor where there are GPUs, bf16 there); rows stream to Parquet, so memory
does not grow with the catalog. The features are one Delta commit (pipelines.tables): a
job that fails or is killed leaves the table as readers saw it. Before committing, the
job checks that every requested image is in the files it wrote or in its rejects exactly
once (a retried task or a restarted actor cannot duplicate a row).

`--incremental` is a merge: new, changed and deleted images are found from ids and hashes
alone (`image_id`, `sha256`, the identity columns, `model_id`); only the images to embed
are read (their files and row groups; the rest of the catalog's bytes are not); the stored
files holding changed or deleted rows are rewritten without them, and the new rows added,
in one commit; every other stored file stays as it is. A different model or token dtype
re-embeds everything.

Images that cannot be decoded are set aside in the rejects table beside the features
(`<out>_rejects`, named in the commit metadata) with a reason; so is an image whose
decoding raises anything unexpected: one bad file never fails a catalog-scale job.

GPUs: `--use-gpu auto` (default) asks for one GPU per actor when the cluster has GPUs up
when the job starts, and runs on CPU otherwise; `--use-gpu yes` asks for GPUs even when
none are up, so an autoscaling cluster scales its GPU worker group up from zero (the job
waits for it); `--use-gpu no` stays on CPU. `--gpus-per-actor 0.5` packs two actors on a GPU.

Token dtype: `--token-dtype float16` halves the token columns: Delta Lake has no half type,
so they are binary, 2*M*d bytes of little-endian IEEE halves per row (schemas.TOKEN_DTYPES;
numpy: `np.frombuffer(value, "<f2")`). Search computes in float32 either way;
tests/test_retrieval.py measures the ranking cost of float16 tokens.
"""

from __future__ import annotations

import argparse
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
from mga.errors import InputError
from mga.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess
from pipelines.catalog import open_catalog, rewrite_without, table_dataset
from pipelines.console import print_summary
from pipelines.model_store import load_artifact, read_artifact_files
from pipelines.resources import actor_cpus, actor_device, actor_gpus, actor_pool, add_gpu_arguments, default_actors, execute
from pipelines.runtime import init_ray
from pipelines.schemas import IDENTITY_COLUMNS, REJECTS, TOKEN_DTYPES, features_schema, vector_column
from pipelines.storage import Location, resolve, write_parquet
from pipelines.tables import Snapshot, TableWriter, companion, read_table

# Columns that decide whether a stored row is still valid for a catalog row.
CHANGE_KEY = ("sha256", "item_id", "split", "domain", "category")


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


class Embedder:
    """Actor: the model, loaded once from the artifact bytes in the object store."""

    def __init__(self, artifact: list, token_dtype: str, use_gpu: bool = True) -> None:
        model, self.model_id, _ = unpack_artifact(ray.get(artifact[0]))
        self.device = actor_device(use_gpu)
        self.model = model.to(self.device).eval()
        config = model.config
        self.token_dtype = token_dtype
        self.schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), token_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if len(batch["pixels"]) == 0:  # every image of the batch was rejected
            return self.schema.empty_table()
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            embedding = self.model.embed(pixels)
        rows = len(pixels)
        columns: dict[str, Any] = {name: pa.array(batch[name].tolist(), pa.string()) for name in IDENTITY_COLUMNS}
        columns["model_id"] = pa.array([self.model_id] * rows, pa.string())
        columns["global"] = vector_column(embedding.global_feature.float().cpu().numpy(), self.schema.field("global").type)
        for layer, tokens in enumerate(embedding.tokens):
            name = f"tokens_{layer}"
            columns[name] = vector_column(tokens.float().cpu().numpy(), self.schema.field(name).type)
        columns["embedded_at"] = pa.array([datetime.now(timezone.utc)] * rows, pa.timestamp("us", tz="UTC"))
        return pa.table(columns, schema=self.schema)


@dataclass
class IncrementalPlan:
    """What a merge changes: the catalog rows to embed, and the stored files to rewrite without their stale rows."""

    embed_ids: pa.Array  # image_id of new and changed rows
    embed_files: list[str]  # the catalog files that hold them: the only files whose images are read
    rewrite: dict[str, list[str]]  # stored file -> image_ids to drop from it (changed or deleted)
    counts: dict[str, int]


def plan_incremental(features: Snapshot, catalog: Snapshot, model_id: str) -> IncrementalPlan:
    """Compare the catalog with the stored features by image_id, sha256 (and identity) and model_id.

    Only id and hash columns are read, and the comparison is an Arrow hash join: no image
    bytes, no Python object per row.
    """
    now = read_table(catalog, ["image_id", *CHANGE_KEY, "__filename"]).rename_columns(["image_id", *CHANGE_KEY, "catalog_file"])
    now = now.append_column("in_catalog", pa.array(np.ones(now.num_rows, bool)))
    stored = read_table(features, ["image_id", *CHANGE_KEY, "model_id", "__filename"])
    stored = stored.rename_columns([name if name in ("image_id", "__filename") else f"stored_{name}" for name in stored.column_names])
    joined = now.join(stored, "image_id", join_type="full outer")
    in_catalog = pc.fill_null(joined.column("in_catalog"), False)
    in_store = pc.is_valid(joined.column("__filename"))
    same = pc.equal(joined.column("stored_model_id"), model_id)
    for name in CHANGE_KEY:
        same = pc.and_kleene(same, pc.equal(joined.column(name), joined.column(f"stored_{name}")))
    same = pc.fill_null(same, False)
    unchanged = pc.and_(pc.and_(in_catalog, in_store), same)
    new = pc.and_(in_catalog, pc.invert(in_store))
    changed = pc.and_(pc.and_(in_catalog, in_store), pc.invert(same))
    deleted = pc.and_(in_store, pc.invert(in_catalog))
    embed = joined.filter(pc.or_(new, changed))
    stale = joined.filter(pc.and_(in_store, pc.invert(unchanged))).select(["__filename", "image_id"]).sort_by("__filename")
    rewrite: dict[str, list[str]] = {}
    for path, image_id in zip(stale.column("__filename").to_pylist(), stale.column("image_id").to_pylist()):
        rewrite.setdefault(path, []).append(image_id)
    counts = {name: int(pc.sum(mask).as_py() or 0) for name, mask in (("new", new), ("changed", changed), ("unchanged", unchanged), ("deleted", deleted))}
    files = pc.unique(embed.column("catalog_file")).to_pylist()
    return IncrementalPlan(embed.column("image_id").combine_chunks(), files, rewrite, counts)


def check_exactly_once(table: Location, data_files: list[str], rejected: pa.Array, expected: pa.Array) -> int:
    """Every expected image is in the written files or the rejects exactly once, nothing else is; returns the rows written."""
    written = pa.chunked_array(
        [pq.read_table(path, columns=["image_id"], filesystem=table.fs).column("image_id").combine_chunks() for path in data_files], pa.string()
    ).combine_chunks()
    problems = []
    if len(pc.unique(written)) != len(written):
        problems.append(f"{len(written) - len(pc.unique(written))} duplicate rows")
    both = int(pc.sum(pc.is_in(written, value_set=rejected)).as_py() or 0)
    if both:
        problems.append(f"{both} images both written and rejected")
    accounted = pa.concat_arrays([written, rejected.cast(pa.string())])
    missing = int(pc.sum(pc.invert(pc.is_in(expected, value_set=accounted))).as_py() or 0)
    unexpected = int(pc.sum(pc.invert(pc.is_in(accounted, value_set=expected))).as_py() or 0)
    if missing or unexpected:
        problems.append(f"{missing} images missing, {unexpected} unexpected")
    if problems:
        raise RuntimeError(f"embed: the files written into {table.uri} are inconsistent ({'; '.join(problems)}); nothing was committed")
    return len(written)


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
        raise InputError(f"--token-dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if actors is not None and actors < 1:
        raise InputError(f"--actors must be positive, got {actors}")
    if max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {max_pixels}")
    actor_gpus(use_gpu, 0, gpus_per_actor), actor_cpus(0, cpus_per_actor)  # validate before anything runs
    started = time.time()
    catalog_table = open_catalog(catalog)
    files = read_artifact_files(model)
    model_object, model_id, model_config = load_artifact(files, resolve(model).uri)
    image_size = int(model_config["image_size"])
    config = model_object.config
    schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), token_dtype)
    table = resolve(out)

    init_ray()
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    actors = actors or default_actors(gpus, gpus_up)
    with TableWriter(table) as writer, TableWriter(companion(table, "rejects")) as rejects_writer:
        merge = incremental and writer.base is not None and _mergeable(writer.base, model_id, token_dtype)
        if merge:
            plan = plan_incremental(writer.base, catalog_table, model_id)
            source, where = catalog_table.only(plan.embed_files), [("image_id", plan.embed_ids.to_pylist())]
            expected = plan.embed_ids
        else:
            plan, source, where = None, catalog_table, []
            expected = read_table(catalog_table, ["image_id"]).column("image_id").combine_chunks()
        reject_log = RejectLog.remote()
        if len(expected):

            def job() -> None:
                dataset = table_dataset(source, [*IDENTITY_COLUMNS, "image", "bbox", "source_path"], *where)
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
                dataset.write_parquet(writer.file("embedded").path, filesystem=table.fs, try_create_dir=not table.is_s3)

            execute(job, catalog_table.uri, table.uri)
        rejects = ray.get(reject_log.all.remote())
        embedded_files = writer.written()
        embedded = check_exactly_once(table, embedded_files, pa.array([row[0] for row in rejects], pa.string()), expected)
        kept = dropped = 0
        if plan is not None and plan.rewrite:
            _, kept, dropped = rewrite_without(writer, plan.rewrite, schema, compression="zstd")
            if dropped != plan.counts["changed"] + plan.counts["deleted"]:
                raise RuntimeError(f"embed: {plan.counts['changed'] + plan.counts['deleted']} stale rows to drop from {table.uri}, found {dropped}")
        if plan is not None and not len(expected) and not plan.rewrite:
            # Nothing new, changed or deleted: neither table gets a new version.
            info = {**writer.base.info, "embedded": 0, "rejected": 0, "incremental": {**plan.counts, "rows_written": 0}}
            snapshot, rejects_table = writer.base, None
        else:
            write_parquet(
                rejects_writer.file("rejects.parquet"),
                pa.table({"source_path": [r[1] for r in rejects], "reason": [r[2] for r in rejects]}, schema=REJECTS),
            )
            rejects_table = rejects_writer.commit(REJECTS, {"table": "rejects", "of": table.uri, "rows": len(rejects)})
            info = {
                "table": "features",
                "catalog": catalog_table.uri,
                "catalog_version": catalog_table.version,
                "model": resolve(model).uri,
                "model_id": model_id,
                "global_dim": config.global_dim,
                "num_tokens": config.num_tokens,
                "token_dim": config.token_dim,
                "layers": list(config.layers),
                "token_dtype": token_dtype,
                "image_size": image_size,
                "config": config.model_dump(mode="json"),
                "embedded": embedded,
                "rejected": len(rejects),
                "rejects": {"table": rejects_table.uri, "version": rejects_table.version},
                **({"incremental": {**plan.counts, "rows_written": embedded + kept}} if plan is not None else {}),
            }
            snapshot = writer.commit(schema, info, files=writer.written(), remove=None if plan is None else sorted(plan.rewrite))
    rows = {
        "read": f"{catalog_table.uri} version {catalog_table.version} ({len(expected)} images to embed)",
        "model": f"{resolve(model).uri} (model_id {model_id})",
        "wrote": f"{table.uri} (version {snapshot.version}, {snapshot.rows} rows, D={config.global_dim}, "
        f"{len(config.layers)} layers x M={config.num_tokens} x d={config.token_dim}, tokens {token_dtype})",
        "embedded": embedded,
        "rejected": f"{len(rejects)}" + (f" (reasons in the table {rejects_table.uri})" if rejects and rejects_table else ""),
    }
    if incremental:
        rows["incremental"] = (
            ", ".join(f"{key} {value}" for key, value in plan.counts.items()) + f"; rows written {embedded + kept} of {snapshot.rows}"
            if plan is not None else "no features of this model and token dtype to merge with: embedded everything"
        )
    rows["actors"] = f"{actors} x " + (f"{gpus:g} GPU" if gpus else "CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)"
    rows["wall time"] = f"{time.time() - started:.1f} s"
    print_summary("mga embed", rows)
    return {**info, "version": snapshot.version, "rows": snapshot.rows}


def _mergeable(features: Snapshot, model_id: str, token_dtype: str) -> bool:
    """A merge keeps the stored rows: only when they come from the same model with the same token dtype."""
    return features.info.get("model_id") == model_id and features.info.get("token_dtype") == token_dtype


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact URI written by `mga train`")
    parser.add_argument("--catalog", required=True, help="catalog table URI")
    parser.add_argument("--out", required=True, help="features table URI to publish")
    parser.add_argument("--incremental", action="store_true", help="merge: embed only new or changed images, remove deleted ones, leave the rest as stored")
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
    from pipelines.command import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
