"""`mga train`: Ray Train data-parallel training of MGA, fed by a Ray Data stream of P x K batches.

The catalog's train split streams through Ray Data: each block's rows are grouped by item
and K images per item are decoded, cropped and augmented in Ray Data tasks; the workers
assemble batches of P distinct items from that stream (`mga.sampling.pk_batches`). No
step holds the whole dataset on one node, and no image bytes are shuffled globally:
the order comes from shuffled files and a local shuffle buffer of item groups.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mga.artifact import pack_artifact
from mga.model import MGAModel
from mga.objective import MGAObjective
from mga.sampling import pk_batches
from mga.transforms import ImageDecodeError, preprocess
from pipelines.catalog import catalog_dataset, train_item_ids
from pipelines.config import TrainConfig, load_config
from pipelines.console import print_summary
from pipelines.model_store import write_artifact
from pipelines.runtime import init_ray
from pipelines.storage import resolve

STATE_FILE = "state.pt"


def item_groups(batch: pa.Table, images_per_item: int, image_size: int, augment: bool, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task: a block of catalog rows -> one row per item with K prepared images.

    A plain function, not an actor class: Ray reuses task worker processes across epochs,
    while an actor pool would be started again, imports and all, for every epoch.
    """
    rng = np.random.default_rng()
    rows_by_item: dict[str, list[int]] = {}
    for row, item_id in enumerate(batch.column("item_id").to_pylist()):
        rows_by_item.setdefault(item_id, []).append(row)
    images, bboxes = batch.column("image"), batch.column("bbox").to_pylist()
    item_ids, groups = [], []
    for item_id, rows in rows_by_item.items():
        picks = rng.choice(rows, size=images_per_item, replace=len(rows) < images_per_item)
        prepared = []
        for row in picks:
            try:
                prepared.append(preprocess(images[int(row)].as_py(), bboxes[int(row)], image_size, rng if augment else None, max_pixels))
            except ImageDecodeError:
                continue  # prepare already rejected undecodable images; a later corruption only thins the group
        if prepared:
            while len(prepared) < images_per_item:
                prepared.append(prepared[int(rng.integers(len(prepared)))])
            item_ids.append(item_id)
            groups.append(np.stack(prepared))
    return {
        "item_id": np.array(item_ids, dtype=object),
        "images": np.stack(groups) if groups else np.zeros((0, images_per_item, 3, image_size, image_size), np.uint8),
    }


def _all_workers_have(flag: bool, device: torch.device) -> bool:
    """Keep DDP workers in lockstep: a step runs only if every worker has a batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    config = TrainConfig(**loop_config["config"])
    class_index: dict[str, int] = loop_config["class_index"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed)
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    model = MGAModel(config.model, pretrained=config.run.pretrained, weights_file=loop_config.get("weights_file"))
    objective = MGAObjective(model, len(class_index), config.loss)
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.optim.milestones), gamma=config.optim.gamma)
    sampler_rng = np.random.default_rng([config.run.seed, rank])
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler_rng.bit_generator.state = state["sampler"][rank % len(state["sampler"])]
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"[train] resumed from checkpoint after epoch {start_epoch}", flush=True)
    if on_gpu and config.scaling.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    objective = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": objective.unused_parameters_possible()}
    )
    shard = ray.train.get_dataset_shard("train")
    P, K = config.data.items_per_batch, config.data.images_per_item
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and config.scaling.bf16 else torch.autocast("cpu", enabled=False)

    for epoch in range(start_epoch, config.optim.epochs):
        objective.train()
        started = time.perf_counter()
        totals = {"loss": 0.0, "identity": 0.0, "triplet": 0.0}
        steps = 0

        def groups():
            for batch in shard.iter_batches(batch_size=P, batch_format="numpy", local_shuffle_buffer_size=config.data.shuffle_buffer_items):
                yield from zip(batch["item_id"], batch["images"])

        batches = pk_batches(groups(), P, K, sampler_rng)
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
        metrics = {key: value / max(steps, 1) for key, value in totals.items()}
        metrics.update(epoch=epoch + 1, lr=lr, steps=steps, images_per_s=steps * P * K * world / max(elapsed, 1e-9), epoch_s=elapsed, data_wait_s=data_wait)
        if rank == 0:
            print(
                f"[train] epoch {epoch + 1}/{config.optim.epochs} loss {metrics['loss']:.4f} "
                f"(identity {metrics['identity']:.4f}, triplet {metrics['triplet']:.4f}) lr {lr:.2e} "
                f"{metrics['images_per_s']:.1f} img/s, {steps} steps, {elapsed:.1f} s ({data_wait:.1f} s waiting for data)",
                flush=True,
            )
        last = epoch + 1 == config.optim.epochs
        if (epoch + 1) % config.run.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    torch.save(
                        {
                            "objective": _unwrap(objective).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "sampler": [sampler_rng.bit_generator.state],
                            "epoch": epoch,
                        },
                        Path(directory) / STATE_FILE,
                    )
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


def _weights_file(config: TrainConfig) -> str | None:
    """A local copy of the backbone weights file (S3 files are fetched once, by the driver)."""
    uri = config.run.weights_file
    if not uri:
        return None
    location = resolve(uri)
    if not location.exists():
        raise FileNotFoundError(f"run.weights_file: {location.uri} does not exist")
    if not location.is_s3:
        return location.path
    local = Path(tempfile.mkdtemp(prefix="mga-weights-")) / Path(location.path).name
    local.write_bytes(location.read_bytes())
    return str(local)


def run(config: TrainConfig) -> dict[str, Any]:
    """Train with Ray Train and write the model artifact to `run.output`."""
    if not config.data.catalog:
        raise ValueError("data.catalog: no catalog URI given (set it in the config or with --catalog)")
    if not config.run.output:
        raise ValueError("run.output: no artifact URI given (set it in the config or with --output)")
    started = time.time()
    init_ray()
    items = train_item_ids(config.data.catalog)
    if len(items) < config.data.items_per_batch:
        raise ValueError(f"{config.data.catalog}: {len(items)} train items, fewer than data.items_per_batch={config.data.items_per_batch}")
    dataset = catalog_dataset(config.data.catalog, ["item_id", "image", "bbox"], splits=("train",))
    dataset = dataset.map_batches(
        item_groups,
        fn_kwargs=dict(
            images_per_item=config.data.images_per_item,
            image_size=config.data.image_size,
            augment=config.data.augment,
            max_pixels=config.data.max_pixels,
        ),
        batch_size=256,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    storage = config.run.storage_path or tempfile.mkdtemp(prefix="mga-runs-")
    storage_location = resolve(storage)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "class_index": {item: index for index, item in enumerate(items)},
            "weights_file": _weights_file(config),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker, **({"GPU": 1} if config.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage_location.path,
            storage_filesystem=storage_location.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.run.name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    model = MGAModel(config.model)
    model.load_state_dict({name[len("model."):]: value for name, value in state["objective"].items() if name.startswith("model.")})
    metrics = result.metrics or {}
    files = pack_artifact(
        model,
        {
            "image_size": config.data.image_size,
            "train": {"run": config.run.name, "epochs": state["epoch"] + 1, "catalog": config.data.catalog, "items": len(items)},
            "recipe": config.recipe,
        },
    )
    write_artifact(config.run.output, files)
    model_id = json.loads(files["artifact.json"])["model_id"]
    summary = {
        "catalog": config.data.catalog,
        "train items": len(items),
        "epochs": state["epoch"] + 1,
        "final loss": round(float(metrics.get("loss", float("nan"))), 4),
        "images/s (last epoch)": round(float(metrics.get("images_per_s", float("nan"))), 1),
        "workers": f"{config.scaling.num_workers} x {'GPU' if config.scaling.use_gpu else 'CPU'}",
        "checkpoints": f"{storage_location.uri}/{config.run.name}",
        "model artifact": f"{resolve(config.run.output).uri} (model_id {model_id})",
        "wall time": f"{time.time() - started:.0f} s",
    }
    print_summary("mga train", summary)
    return {"model_id": model_id, "metrics": metrics, "epochs": state["epoch"] + 1, "output": config.run.output}


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
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
