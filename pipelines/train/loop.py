"""The training loop of `mga train` (on every Ray Train worker) and the trainer that runs it.

The catalog's train split streams through Ray Data: each block's rows are grouped by item
and K images per item are decoded, cropped and augmented in Ray Data tasks; the workers
assemble batches of P distinct items from that stream (`mga.sampling.pk_batches`). A
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

import numpy as np
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
from pipelines.stream import DECODE_TASK_CPUS, pk_stream, train_stream
from pipelines.train.checkpoints import TrainingFailed, latest_epoch, read_checkpoint, report_epoch
from pipelines.train.validation import Validator
from pipelines.train.weights import backbone_weights_file

def _all_workers_have(flag: bool, device: torch.device) -> bool:
    """Keep DDP workers in lockstep: a step runs only if every worker has a batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


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
    config = TrainConfig(**loop_config["config"])
    class_index: dict[str, int] = loop_config["class_index"]
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
    objective = MGAObjective(model, len(class_index), config.loss)
    body = set(objective.model.backbone.body.parameters())
    groups = [
        {"params": [p for p in objective.parameters() if p in body], "lr": config.effective_lr() * config.optim.backbone_lr_scale},
        {"params": [p for p in objective.parameters() if p not in body], "lr": config.effective_lr()},
    ]
    optimizer = torch.optim.Adam(groups, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.optim.milestones), gamma=config.optim.gamma)
    sampler_rng = np.random.default_rng([config.run.seed, rank])
    start_epoch, starts = 0, [0]
    if checkpoint:
        state, sampler_state = read_checkpoint(checkpoint, rank)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if sampler_state is not None:
            sampler_rng.bit_generator.state = sampler_state
        else:  # more workers than when the checkpoint was written: a fresh stream per rank and epoch
            sampler_rng = np.random.default_rng([config.run.seed, rank, start_epoch])
        starts = list(state.get("starts", [0])) + [start_epoch]
        if rank == 0:
            print(f"[train] resumed from the checkpoint after epoch {start_epoch} (run {config.run.name}, start {len(starts)})", flush=True)
    if on_gpu and config.scaling.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    objective = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": objective.unused_parameters_possible()}
    )
    shard = ray.train.get_dataset_shard("train")
    P, K = config.data.items_per_batch, config.data.images_per_item
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and config.scaling.bf16 else torch.autocast("cpu", enabled=False)
    validation = loop_config.get("validation")
    validator = Validator(config.data.catalog, validation, config.data.image_size, config.data.max_pixels) if validation and rank == 0 else None

    for epoch in range(start_epoch, config.optim.epochs):
        objective.train()
        started = time.perf_counter()
        totals = {"loss": 0.0, "identity": 0.0, "triplet": 0.0}
        steps = 0

        batches = pk_stream(shard, P, K, config.data.shuffle_buffer_items, sampler_rng)
        data_wait = 0.0
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - waited
            if not _all_workers_have(batch is not None, device):
                break
            item_ids, images = batch
            labels = torch.tensor([class_index[item] for item in item_ids for _ in range(K)], device=device)
            pixels = torch.from_numpy(images).to(device, non_blocking=True)  # [P*K, 3, S, S], item-major
            with autocast:
                parts = objective(pixels, labels)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            steps += 1
            totals["loss"] += parts.total.item()
            totals["identity"] += parts.identity.item()
            totals["triplet"] += parts.triplet.item()
        elapsed = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics: dict[str, Any] = {key: value / max(steps, 1) for key, value in totals.items()}
        metrics.update(epoch=epoch + 1, lr=lr, steps=steps, images_per_s=steps * P * K * world / max(elapsed, 1e-9), epoch_s=elapsed, data_wait_s=data_wait)
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
        state = None
        if checkpointing and rank == 0:
            state = {
                "objective": _unwrap(objective).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "starts": starts,
            }
        report_epoch(metrics, checkpointing, rank, sampler_rng, state)




# --------------------------------------------------------------------------- the trainer


def check_local_cpus(config: TrainConfig) -> None:
    """On a local Ray instance, refuse a worker group that leaves no CPU for the decode tasks.

    Ray Train reserves its workers' CPUs for the whole run; the Ray Data tasks that decode
    the images need DECODE_TASK_CPUS each beside them, or the stream never starts and the
    run waits forever. (A cluster may autoscale, so there this is left to Ray.)
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    total = float(ray.cluster_resources().get("CPU", 0))
    workers = config.scaling.num_workers * config.scaling.cpus_per_worker
    if workers + DECODE_TASK_CPUS > total:
        raise InputError(
            f"scaling: {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker:g} CPUs take {workers:g} of the "
            f"{total:g} CPUs of the local Ray instance, leaving less than {DECODE_TASK_CPUS} for the tasks that decode images: "
            "lower scaling.cpus_per_worker or scaling.num_workers (or give Ray more CPUs with MGA_RAY_CPUS)"
        )


def fit(config: TrainConfig, items: list[str], validation: dict[str, Any] | None, storage: Location) -> Any:
    """Run `train_loop` on a Ray Train worker group; the Ray Train result (its checkpoints under storage/run.name)."""
    init_ray()
    check_local_cpus(config)
    dataset = train_stream(config.data.catalog, config.data.images_per_item, config.data.image_size, config.data.augment, config.data.max_pixels)
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
            "class_index": {item: index for index, item in enumerate(items)},
            "validation": validation,
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
        datasets={"train": dataset},
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
