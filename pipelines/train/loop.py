"""The training loop of `mga train` (on every Ray Train worker) and the trainer that runs it.

The catalog's train split streams through Ray Data (pipelines.stream): every epoch is
planned from an id-only index of the train rows (whole items, P x K, seeded by run.seed and
the epoch: a resumed run replays its epochs) and Ray Data tasks decode each worker's share;
one stream spans all of a worker's epochs. Images that cannot be decoded, batches dropped
and items left out are counted in every epoch line. A
worker that dies mid-run (a lost node, an OOM kill) makes Ray Train restart the worker
group and restore the latest checkpoint, up to `run.max_failures` times
(`FailureConfig(max_failures)`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mga.errors import InputError
from mga.model import MGAModel
from mga.objective import MGAObjective
from pipelines.config import TrainConfig
from pipelines.console import first_line
from pipelines.runtime import init_ray
from pipelines.storage import Location
from pipelines.stream import (
    DECODE_TASK_CPUS,
    EPOCH_COUNTS,
    Catalog,
    EpochBatches,
    StreamSettings,
    batch_stream,
)
from pipelines.train.checkpoints import (
    TrainingFailed,
    latest_epoch,
    read_checkpoint,
    report_epoch,
)
from pipelines.tracking import Tracker
from pipelines.train.validation import Validator
from pipelines.train.weights import backbone_weights_file

# The data counts of an epoch line, shown when any is not zero.
DATA_COUNTS = ("undecodable_images", "dropped_batches", "left_out_items")


def _all_workers_have(flag: bool, device: torch.device) -> bool:
    """Keep DDP workers in lockstep: a step runs only if every worker has a batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _sum_over_workers(values: list[int], device: torch.device) -> list[int]:
    """Counts summed over the DDP workers (the values themselves on one worker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(value) for value in total.tolist()]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


# --------------------------------------------------------------------------- the training loop


def epoch_line(config: TrainConfig, metrics: dict[str, Any], validation: dict[str, Any] | None, resumed_from: int) -> str:
    """The console line of one epoch: loss, throughput, and validation when it ran."""
    line = (
        f"[train] epoch {metrics['epoch']}/{config.optim.epochs} loss {metrics['loss']:.4f} "
        f"(identity {metrics['identity']:.4f}, triplet {metrics['triplet']:.4f}) lr {metrics['lr']:.2e} "
        f"{metrics['images_per_s']:.1f} img/s, {metrics['steps']} steps, {metrics['epoch_s']:.1f} s ({metrics['data_wait_s']:.1f} s waiting for data)"
    )
    if any(metrics[name] for name in DATA_COUNTS):
        line += (f" | {metrics['undecodable_images']} undecodable images replaced, {metrics['dropped_batches']} batches dropped, "
                 f"{metrics['left_out_items']} items left out")
    if "val_s" in metrics:
        line += (
            f" | val [{validation['source']}; {metrics['val_queries']} queries x {metrics['val_gallery']} gallery]"
            f" R@1 {metrics['val_R@1']:.3f} mAP {metrics['val_mAP']:.3f}"
            f" (global R@1 {metrics['val_global_R@1']:.3f} mAP {metrics['val_global_mAP']:.3f}) {metrics['val_s']:.1f} s"
        )
    if resumed_from:
        line += f" | resumed from the checkpoint of epoch {resumed_from}"
    return line



def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    # Ray 2.60 logs every report at INFO ("Reporting training result ... TrainingReport(...)")
    # through a logger named by its file path, which propagates to the root logger rather than
    # `ray.train` (that LoggingConfig quiets): the worker's console gets warnings only.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "Dataset ... execution finished" per stream
    config = TrainConfig(**loop_config["config"])
    catalog_ref = loop_config["catalog"][0]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed)
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # the checkpoint has every weight: no hub, no weights file
        model = MGAModel(config.model)
    else:
        model = MGAModel(config.model, hub=config.run.pretrained == "hub", weights_file=backbone_weights_file(config))
    objective = MGAObjective(model, loop_config["classes"], config.loss)
    body = set(objective.model.backbone.body.parameters())
    groups = [
        {"params": [p for p in objective.parameters() if p in body], "lr": config.effective_lr() * config.optim.backbone_lr_scale},
        {"params": [p for p in objective.parameters() if p not in body], "lr": config.effective_lr()},
    ]
    optimizer = torch.optim.Adam(groups, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.optim.milestones), gamma=config.optim.gamma)
    start_epoch, starts = 0, [0]
    if checkpoint:
        state = read_checkpoint(checkpoint)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        starts = list(state.get("starts", [0])) + [start_epoch]
        if rank == 0:
            print(f"[train] resumed from the checkpoint after epoch {start_epoch} (run {config.run.name}, start {len(starts)})", flush=True)
    if on_gpu and config.scaling.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    objective = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": objective.unused_parameters_possible()}
    )
    P, K = config.data.items_per_batch, config.data.images_per_item
    settings = StreamSettings(P, K, config.data.image_size, config.data.augment, config.data.max_pixels,
                              config.data.window_rows, config.data.groups_per_batch, config.run.seed)
    stream = EpochBatches(batch_stream(catalog_ref, settings, range(start_epoch, config.optim.epochs), rank, world))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and config.scaling.bf16 else torch.autocast("cpu", enabled=False)
    validation = loop_config.get("validation")
    validator = Validator(config.data.catalog, validation, config.data.image_size, config.data.max_pixels) if validation and rank == 0 else None
    tracker = Tracker(**loop_config["tracking"]) if loop_config.get("tracking") and rank == 0 else None

    for epoch in range(start_epoch, config.optim.epochs):
        objective.train()
        started = time.perf_counter()
        totals = {"loss": 0.0, "identity": 0.0, "triplet": 0.0}
        steps, undecodable, plan = 0, 0, dict.fromkeys(EPOCH_COUNTS, 0)

        batches = stream.epoch(epoch)
        data_wait = 0.0
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - waited
            if not _all_workers_have(batch is not None, device):
                break
            if steps == 0:
                plan = {name: int(batch[name][0]) for name in EPOCH_COUNTS}
            undecodable += int(batch["undecodable"][0])
            # Copies: Ray Data's arrays are read-only views of its blocks.
            labels = torch.tensor(batch["labels"][0], device=device)
            pixels = torch.tensor(batch["images"][0]).to(device, non_blocking=True)  # [P*K, 3, S, S], item-major
            with autocast:
                parts = objective(pixels, labels)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            steps += 1
            totals["loss"] += parts.total.item()
            totals["identity"] += parts.identity.item()
            totals["triplet"] += parts.triplet.item()
        # Batches of this rank that no step used: past the shortest rank's end, or never
        # decoded (an item without a decodable image); summed over the ranks.
        unused = sum(1 for _ in batches)
        counts = _sum_over_workers([undecodable, max(unused, plan["rank_batches"] - steps)], device)
        elapsed = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics: dict[str, Any] = {key: value / max(steps, 1) for key, value in totals.items()}
        metrics.update(epoch=epoch + 1, lr=lr, steps=steps, images_per_s=steps * P * K * world / max(elapsed, 1e-9), epoch_s=elapsed, data_wait_s=data_wait,
                       undecodable_images=counts[0], dropped_batches=counts[1] + plan["unassigned_batches"], left_out_items=plan["left_out_items"])
        last = epoch + 1 == config.optim.epochs
        checkpointing = (epoch + 1) % config.run.checkpoint_every == 0 or last
        validating = bool(validation) and checkpointing and ((epoch + 1) % config.run.validate_every == 0 or last)
        if validator is not None and validating:
            metrics.update(validator(_unwrap(objective).model, device, autocast, max(P * K, 32), config.run.validation_rerank_top))
        elif validation and checkpointing:
            # Every checkpoint carries the score key (NaN: not validated), so Ray Train
            # ranks it below every validated one instead of logging a missing-key error.
            metrics[config.run.best_metric] = float("nan")
        if rank == 0:
            print(epoch_line(config, metrics, validation, resumed_from=start_epoch if epoch == start_epoch else 0), flush=True)
            if tracker is not None:
                tracker.log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step=epoch + 1)
        state = None
        if checkpointing and rank == 0:
            state = {
                "objective": _unwrap(objective).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "starts": starts,
            }
        report_epoch(metrics, checkpointing, state)




# --------------------------------------------------------------------------- the trainer


def check_local_resources(config: TrainConfig) -> None:
    """On a local Ray instance, refuse a worker group that can never start or never get data.

    Ray Train reserves its workers' CPUs for the whole run; the Ray Data tasks that decode
    the images need DECODE_TASK_CPUS each beside them, or the stream never starts and the
    run waits forever. GPU workers on an instance without the GPUs would wait forever too
    (Ray Train retries the worker group's start every minute). A cluster may autoscale, so
    there both are left to Ray.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    resources = ray.cluster_resources()
    total = float(resources.get("CPU", 0))
    workers = config.scaling.num_workers * config.scaling.cpus_per_worker
    if workers + DECODE_TASK_CPUS > total:
        raise InputError(
            f"scaling: {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker:g} CPUs take {workers:g} of the "
            f"{total:g} CPUs of the local Ray instance, leaving less than {DECODE_TASK_CPUS} for the tasks that decode images: "
            "lower scaling.cpus_per_worker or scaling.num_workers (or give Ray more CPUs with MGA_RAY_CPUS)"
        )
    gpus = int(resources.get("GPU", 0))
    if config.scaling.use_gpu and config.scaling.num_workers > gpus:
        raise InputError(
            f"scaling.use_gpu=true: {config.scaling.num_workers} GPU workers, but the local Ray instance has {gpus} GPUs "
            f"(torch sees {torch.cuda.device_count()}): set scaling.use_gpu=false, lower scaling.num_workers, "
            "or submit to a cluster with GPUs (RAY_ADDRESS)"
        )


def fit(config: TrainConfig, catalog: Catalog, validation: dict[str, Any] | None, storage: Location, tracking: dict[str, str] | None = None) -> Any:
    """Run `train_loop` on a Ray Train worker group; the Ray Train result (its checkpoints under storage/run.name).
    With `tracking` ({"uri", "run_id"}: pipelines.train.experiment), rank 0 logs each epoch to that MLflow run."""
    init_ray()
    check_local_resources(config)
    if validation:
        checkpoint_config = ray.train.CheckpointConfig(
            num_to_keep=config.run.keep_checkpoints, checkpoint_score_attribute=config.run.best_metric, checkpoint_score_order="max"
        )
    else:
        checkpoint_config = ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            # Each worker streams its own share of the plan (pipelines.stream), so Ray Train
            # is given no dataset to split: the catalog's index travels once, by reference.
            "catalog": [ray.put(catalog)],
            "classes": len(catalog.items),
            "validation": validation,
            "tracking": tracking,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker, **({"GPU": 1} if config.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=checkpoint_config,
            # The console gets one line per epoch (rank 0's print), nothing more: Ray Train's
            # INFO logs dump every report ("Reporting training result ... TrainingReport(...)"),
            # and its print patch sends each print to the root logger's console handler and,
            # because Ray has replaced a worker's sys.stdout, to stdout as well: twice.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        return trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray wraps the worker's error; the cause is in the log above
        run = storage.join(config.run.name)
        latest = latest_epoch(run)
        where = f"the checkpoint after epoch {latest}" if latest is not None else "the start (no checkpoint yet)"
        again = "re-running it without run.restart=true" if config.run.restart else "re-running the same command"
        message = f"training run {config.run.name} failed ({first_line(error)}); {again} resumes from {where} in {run.uri}"
        print(f"[train] {message}", file=sys.stderr, flush=True)
        raise TrainingFailed(message) from error
