"""`mga train`: Ray Train data-parallel training of MGA, fed by a Ray Data stream of P x K batches.

The job is thin; its parts are modules of their own: `loop` (the worker loop and the
trainer), `validation` (held-out R@K / mAP on rank 0), `checkpoints` (what a checkpoint
holds, an earlier run, the model artifact), `runs` (a run's fingerprint, a fresh start,
storage on a cluster) and `weights` (backbone weights).

Resume: re-running the same command with the same `run.name` and storage path resumes from
the latest checkpoint (Ray Train V2 has no `resume_from_checkpoint`:
`ray.train.get_checkpoint()` returns it); the first epoch line after a resume says so, and
the artifact records where the run was resumed. A run already trained to `optim.epochs`
writes its artifact straight from the stored checkpoints (e.g. again with
`run.artifact_from=best`). Both only under the setup the run was started with (`runs`:
its fingerprint); `run.restart=true` starts it afresh. On a Ray cluster the checkpoints need
storage every node reaches (`runs.run_storage`, `runs.check_cluster_storage`).

The driver builds the backbone with the chosen weights once before anything starts, so a
missing file, an unreachable hub or a file that does not fit the backbone is one clear
error, not a traceback from inside a Ray worker.

With a tracking URI (`run.tracking_uri` or MLFLOW_TRACKING_URI) the run is logged to MLflow
(`experiment`: its params, epochs, artifact and registered version); without one nothing is.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mga.errors import InputError
from pipelines.command import module_main
from pipelines.config import TrainConfig, load_config
from pipelines.console import print_summary
from pipelines.storage import resolve
from pipelines.tracking import configured_uri


def absolute_uris(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: Ray Train workers run in their own working directory."""
    data = {"catalog": resolve(config.data.catalog).uri}
    run = {name: resolve(value).uri for name in ("output", "storage_path", "weights_file") if (value := getattr(config.run, name))}
    return config.model_copy(update={"data": config.data.model_copy(update=data), "run": config.run.model_copy(update=run)})


def run(config: TrainConfig) -> dict[str, Any]:
    """Train with Ray Train and write the model artifact to `run.output`."""
    # Here, not at the top: `mga train --help` and a usage error must not wait for torch and Ray.
    from pipelines.runtime import init_ray
    from pipelines.stream import index_catalog
    from pipelines.train import checkpoints, experiment, loop, runs, validation, weights

    if not config.data.catalog:
        raise InputError("data.catalog: no catalog URI given (set it in the config or with --catalog)")
    if not config.run.output:
        raise InputError("run.output: no artifact URI given (set it in the config or with --output)")
    tracking_uri = configured_uri(config.run.tracking_uri)
    if config.run.register_as and not tracking_uri:
        raise InputError(f"run.register_as={config.run.register_as}: no MLflow tracking URI to register it in (set run.tracking_uri or MLFLOW_TRACKING_URI)")
    config = absolute_uris(config)
    started = time.time()
    storage = runs.run_storage(config)
    run_location = storage.join(config.run.name)
    previous = checkpoints.previous_run(run_location)
    restarting = previous is not None and config.run.restart
    if previous is None or restarting:
        # Before Ray starts: a missing weights file or an unreachable hub is one line.
        # (A resumed run takes every weight from its checkpoint.)
        weights.check_backbone_weights(config)
    catalog = index_catalog(config.data.catalog)  # ids and places of the train rows, no image bytes
    items = catalog.items
    if len(items) < config.data.items_per_batch:
        raise InputError(f"{config.data.catalog}: {len(items)} train items, fewer than data.items_per_batch={config.data.items_per_batch}")
    train_rows = runs.catalog_rows(config.data.catalog)
    fingerprint = runs.fingerprint(config, train_rows, len(items))
    if previous is not None and not restarting:  # resuming or re-exporting: only the run's own setup
        runs.check_same_run(config, run_location, fingerprint, train_rows)
    selection = None
    if config.run.validate_every:
        selection = validation.select_validation(config.data.catalog, config.run.validation_queries, config.run.validation_gallery, config.run.seed)
        if selection is None:
            raise InputError(f"run.validate_every: {config.data.catalog} has no held-out query with a gallery match (no val split, no query/gallery splits); set run.validate_every=0")
        print(f"[train] validation on the {selection['source']}: {len(selection['queries'])} queries x {len(selection['gallery'])} gallery images", flush=True)
    resuming_after = int(previous.metrics["epoch"]) if previous is not None and not restarting else None
    if resuming_after is not None and resuming_after >= config.optim.epochs:
        print(
            f"[train] run {config.run.name} is already trained to epoch {resuming_after} (optim.epochs={config.optim.epochs}) "
            f"in {run_location.uri}: writing the artifact from its checkpoints, nothing to train",
            flush=True,
        )
        result = previous
        tracker = experiment.open_training_run(config, tracking_uri, run_location, fingerprint, train_rows) if tracking_uri else None
    else:
        init_ray(storage=[config.data.catalog, storage.uri])
        runs.check_cluster_storage(storage)
        if resuming_after is not None:
            print(f"[train] run {config.run.name} has a checkpoint after epoch {resuming_after} in {run_location.uri}: resuming from it", flush=True)
        else:
            runs.start_run(config, run_location, fingerprint, train_rows, restart=restarting)
        tracker = experiment.open_training_run(config, tracking_uri, run_location, fingerprint, train_rows) if tracking_uri else None
        try:
            result = loop.fit(config, catalog, selection, storage, experiment.worker_tracking(tracker))
        except checkpoints.TrainingFailed:
            if tracker is not None:
                tracker.finish("FAILED")
            raise
    source = selection["source"] if selection else None
    record = {"catalog": config.data.catalog, "catalog_version": train_rows["version"], "items": len(items), "weights": weights.describe_weights(config), "lr": config.effective_lr()}
    written = checkpoints.export_artifact(result, config, record, source)
    registered = experiment.log_artifact(tracker, config, written)
    _print_summary(config, written, record, source, run_location.uri, time.time() - started)
    if tracker is not None:
        _print_tracking(config, tracker, registered)
    return {key: written[key] for key in ("model_id", "metrics", "checkpoint_metrics", "epochs", "last_epoch", "resumed_after_epochs")} | {
        "output": config.run.output,
        "run_path": run_location.uri,
    }


def _print_summary(config: TrainConfig, written: dict[str, Any], record: dict[str, Any], source: str | None, run_uri: str, seconds: float) -> None:
    metrics, val, resumed = written["metrics"], written["val"], written["resumed_after_epochs"]
    summary = {
        "catalog": config.data.catalog,
        "train items": record["items"],
        "epochs": f"{written['last_epoch']}" + (f" (resumed after epoch {', '.join(map(str, resumed))})" if resumed else ""),
        "final loss": round(float(metrics.get("loss", float("nan"))), 4),
        "images/s (last epoch)": round(float(metrics.get("images_per_s", float("nan"))), 1),
        "workers": f"{config.scaling.num_workers} x {'GPU' if config.scaling.use_gpu else 'CPU'}",
        "learning rate": f"{record['lr']:.2e}"
        + (f" (optim.lr {config.optim.lr:g} x {config.scaling.num_workers} workers: optim.lr_scaling=linear)" if config.optim.lr_scaling == "linear" else ""),
        "backbone weights": record["weights"],
    }
    if source:
        summary["validation"] = source
        if val:
            summary[f"val R@1 / mAP (epoch {written['epochs']})"] = f"{val.get('val_R@1', float('nan')):.3f} / {val.get('val_mAP', float('nan')):.3f}"
    kept = f" best by {config.run.best_metric}, and the latest)" if source else " latest)"
    summary["checkpoints"] = f"{run_uri} (kept: {config.run.keep_checkpoints}{kept}"
    summary["model artifact"] = (
        f"{resolve(config.run.output).uri} (model_id {written['model_id']}, from the {config.run.artifact_from} checkpoint: epoch {written['epochs']})"
    )
    summary["wall time"] = f"{seconds:.0f} s"
    print_summary("mga train", summary)


def _print_tracking(config: TrainConfig, tracker: Any, registered: str | None) -> None:
    lines = [f"[train] MLflow: run {tracker.run_id} (experiment {config.run.experiment}) at {tracker.uri}" + ("" if tracker.active else ", logging stopped at a failure (warning above)")]
    if registered is not None:
        lines.append(f"[train] MLflow: registered as {config.run.register_as} version {registered}")
    print("\n".join(lines), flush=True)


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="YAML path or bundled name: tiny, inshop, consumer2shop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.epochs=3")
    parser.add_argument("--catalog", help="catalog URI (same as --set data.catalog=...)")
    parser.add_argument("--output", help="model artifact URI (same as --set run.output=...)")
    parser.add_argument("--storage-path", help="checkpoint storage URI (same as --set run.storage_path=...)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    extra: dict[str, Any] = {}
    if args.catalog:
        extra.setdefault("data", {})["catalog"] = args.catalog
    if args.output:
        extra.setdefault("run", {})["output"] = args.output
    if args.storage_path:
        extra.setdefault("run", {})["storage_path"] = args.storage_path
    return load_config(args.config, args.overrides, extra)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(config_from_args(args))


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)
