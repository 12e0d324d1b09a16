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

The job is this module, light to import; what runs in Ray is in `decoding` (the decoding
tasks, torch-free) and `embedder` (the model actors); the incremental plan and the
exactly-once check are in `merge`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mga.errors import InputError
from mga.transforms import DEFAULT_MAX_PIXELS
from pipelines.command import module_main
from pipelines.console import print_summary
from pipelines.embed.merge import check_exactly_once, mergeable, plan_incremental
from pipelines.resources import actor_cpus, actor_gpus, actor_pool, add_gpu_arguments, default_actors, execute
from pipelines.schemas import IDENTITY_COLUMNS, REJECTS, TOKEN_DTYPES
from pipelines.storage import resolve, write_parquet
from pipelines.token_ranges import parquet_options
from pipelines.tables import TableWriter, companion

DECODE_SIDES = ("auto", "tasks", "actors")


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
    decode: str = "auto",
) -> dict[str, Any]:
    # Here, not at the top: `mga embed --help` and a usage error must not wait for torch and Ray.
    import ray

    from pipelines.catalog import open_catalog, rewrite_without, table_dataset
    from pipelines.embed.decoding import prepare_batch, staged_rejects
    from pipelines.embed.device_decoding import ActorDecoding
    from pipelines.embed.embedder import Embedder, model_schema
    from pipelines.model_store import ModelSource, load_model
    from pipelines.runtime import init_ray

    if token_dtype not in TOKEN_DTYPES:
        raise InputError(f"--token-dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if actors is not None and actors < 1:
        raise InputError(f"--actors must be positive, got {actors}")
    if max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {max_pixels}")
    if decode not in DECODE_SIDES:
        raise InputError(f"--decode must be one of {list(DECODE_SIDES)}, got {decode!r}")
    actor_gpus(use_gpu, 0, gpus_per_actor), actor_cpus(0, cpus_per_actor)  # validate before anything runs
    started = time.time()
    catalog_table = open_catalog(catalog)
    model_object, model_id, model_config = load_model(model)
    image_size = int(model_config["image_size"])
    config = model_object.config
    schema = model_schema(model_object, token_dtype)
    table = resolve(out)

    init_ray(storage=[catalog_table.uri, table.uri, resolve(model).uri])
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    actors = actors or default_actors(gpus, gpus_up)
    in_actors = decode == "actors" or (decode == "auto" and gpus > 0)
    with TableWriter(table) as writer, TableWriter(companion(table, "rejects")) as rejects_writer:
        merge = incremental and writer.base is not None and mergeable(writer.base, model_id, token_dtype)
        if merge:
            plan = execute(lambda: plan_incremental(writer.base, catalog_table, model_id), catalog_table.uri, table.uri)
            source, where = catalog_table.only(plan.embed_files), [("image_id", plan.embed_ids.to_pylist())]
            expected, to_embed = plan.embed_ids, len(plan.embed_ids)
        else:
            # Every catalog row: its ids stay in the catalog's files (check_exactly_once reads them a bucket at a time).
            plan, source, where = None, catalog_table, []
            expected, to_embed = catalog_table, catalog_table.rows
        staging = rejects_writer.run.join("staged")  # the decoding tasks' rejects, until the job gathers them
        if to_embed or not merge and catalog_table.files.num_rows:  # rows unknown where a writer left out its files' stats

            def job() -> None:
                dataset = table_dataset(source, [*IDENTITY_COLUMNS, "image", "bbox", "source_path"], *where)
                decoding = ActorDecoding(image_size, max_pixels, staging.uri) if in_actors else None
                if decoding is None:
                    dataset = dataset.map_batches(
                        prepare_batch,
                        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "rejects_uri": staging.uri},
                        batch_size=batch_size,
                        batch_format="pyarrow",
                        num_cpus=0.5,
                    )
                # Ray Data restarts a dead actor and retries its batches (max_restarts=-1 and
                # max_task_retries=-1 are its defaults for actor pools); check_exactly_once
                # below proves nothing was lost or written twice.
                dataset = dataset.map_batches(
                    Embedder,
                    fn_constructor_kwargs={"model": ModelSource(resolve(model).uri, model_id), "token_dtype": token_dtype, "use_gpu": gpus > 0,
                                           "decoding": decoding},
                    batch_size=batch_size,
                    batch_format="numpy" if decoding is None else "pyarrow",
                    compute=actor_pool(actors),
                    num_gpus=gpus,
                    num_cpus=actor_cpus(gpus, cpus_per_actor),
                )
                # The token columns in the layout the search reads a few rows of by byte ranges (pipelines.token_ranges).
                dataset.write_parquet(writer.file("embedded").path, filesystem=table.fs, try_create_dir=not table.is_s3, **parquet_options(schema))

            execute(job, catalog_table.uri, table.uri)
        rejects = staged_rejects(staging, rejects_writer.written())
        embedded = execute(lambda: check_exactly_once(table, writer.written(), rejects.column("image_id").combine_chunks(), expected), catalog_table.uri, table.uri)
        kept = dropped = 0
        copies: dict[str, str] = {}
        if plan is not None and plan.rewrite:
            copies, kept, dropped = rewrite_without(writer, plan.rewrite, schema, **parquet_options(schema))
            if dropped != plan.counts["changed"] + plan.counts["deleted"]:
                raise RuntimeError(f"embed: {plan.counts['changed'] + plan.counts['deleted']} stale rows to drop from {table.uri}, found {dropped}")
        if plan is not None and not to_embed and not plan.rewrite:
            # Nothing new, changed or deleted: neither table gets a new version.
            info = {**writer.base.info, "embedded": 0, "rejected": 0, "incremental": {**plan.counts, "rows_written": 0}}
            snapshot, rejects_table = writer.base, None
        else:
            write_parquet(rejects_writer.file("rejects.parquet"), rejects.select(REJECTS.names))
            rejects_writer.discard("staged")
            rejects_table = rejects_writer.commit(REJECTS, {"table": "rejects", "of": table.uri, "rows": rejects.num_rows})
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
                "rejected": rejects.num_rows,
                "rejects": {"table": rejects_table.uri, "version": rejects_table.version},
                **({"incremental": {**plan.counts, "rows_written": embedded + kept}} if plan is not None else {}),
            }
            # The rewritten files' lineage lets an incremental search compare each with its source alone.
            snapshot = writer.commit(schema, info, files=writer.written(), remove=None if plan is None else sorted(plan.rewrite), copies=copies)
    rows = {
        "read": f"{catalog_table.uri} version {catalog_table.version} ({to_embed} images to embed)",
        "model": f"{resolve(model).uri} (model_id {model_id})",
        "wrote": f"{table.uri} (version {snapshot.version}, {snapshot.rows} rows, D={config.global_dim}, "
        f"{len(config.layers)} layers x M={config.num_tokens} x d={config.token_dim}, tokens {token_dtype})",
        "embedded": embedded,
        "rejected": f"{rejects.num_rows}" + (f" (reasons in the table {rejects_table.uri})" if rejects.num_rows and rejects_table else ""),
    }
    if incremental:
        rows["incremental"] = (
            ", ".join(f"{key} {value}" for key, value in plan.counts.items()) + f"; rows written {embedded + kept} of {snapshot.rows}"
            if plan is not None else "no features of this model and token dtype to merge with: embedded everything"
        )
    rows["actors"] = f"{actors} x " + (f"{gpus:g} GPU" if gpus else "CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)"
    rows["decoding"] = ("in the model actors, JPEGs on their " + ("GPUs" if gpus else "CPUs") if in_actors else "in CPU tasks") + f" (--decode {decode})"
    rows["wall time"] = f"{time.time() - started:.1f} s"
    print_summary("mga embed", rows)
    return {**info, "version": snapshot.version, "rows": snapshot.rows}


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact URI written by `mga train`")
    parser.add_argument("--catalog", required=True, help="catalog table URI")
    parser.add_argument("--out", required=True, help="features table URI to publish")
    parser.add_argument("--incremental", action="store_true", help="merge: embed only new or changed images, remove deleted ones, leave the rest as stored")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="most model actors: the pool starts with one and grows while work queues (default: one per GPU up, else 1)")
    parser.add_argument("--token-dtype", default="float32", choices=sorted(TOKEN_DTYPES), help="dtype of the token columns (float16 halves them)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images with more pixels than this")
    parser.add_argument("--decode", default="auto", choices=DECODE_SIDES,
                        help="where images are decoded: CPU tasks feeding the model actors, or the actors themselves (JPEGs on their GPU); auto: the actors when they have GPUs")
    add_gpu_arguments(parser, "model")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.model, args.catalog, args.out, args.incremental, args.batch_size, args.actors, args.token_dtype, args.max_pixels,
        use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, decode=args.decode,
    )


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)
