"""Checkpoints of `mga train`: what a checkpoint holds, finding an earlier run, and the model artifact.

Every `run.checkpoint_every` epochs (and after the last) the workers report a checkpoint
to Ray Train: model, optimizer, LR scheduler and epoch (the batch plan of an epoch is a
function of run.seed and the epoch: pipelines.stream). Ray
Train keeps it under `run.storage_path/run.name` (`RunConfig(storage_path, name)`), local
or S3. Ray Train keeps metrics only with a checkpoint, so validation epochs are checkpoint
epochs; `CheckpointConfig(checkpoint_score_attribute=run.best_metric, order max)` keeps the
best `run.keep_checkpoints` checkpoints (plus always the latest, for resuming). The
artifact is written from the last checkpoint, or the best with `run.artifact_from=best`.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from mga.artifact import pack_artifact
from mga.model import MGAModel
from pipelines.config import TrainConfig
from pipelines.console import JobFailed
from pipelines.model_store import write_artifact
from pipelines.storage import Location

STATE_FILE = "state.pt"


class TrainingFailed(JobFailed):
    """The Ray Train run failed (more worker failures than run.max_failures, or an error in the loop)."""


def report_epoch(metrics: dict[str, Any], checkpointing: bool, state: dict[str, Any] | None) -> None:
    """Report an epoch to Ray Train (on every worker), with a checkpoint when `checkpointing`:
    rank 0 passes `state` (the model, optimizer, scheduler and epoch), the others None."""
    if not checkpointing:
        ray.train.report(metrics)
        return
    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The model/optimizer/scheduler state and epoch of a checkpoint, read from its storage.

    Not through `Checkpoint.as_directory()`: that downloads into one directory per checkpoint
    under the machine's /tmp, shared by every worker there and deleted by the last reader;
    workers restarted together on one machine then read a file another was deleting
    ("PytorchStreamReader failed reading file": tests/test_multinode.py, a node lost mid-run).
    """
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path.rstrip('/')}/{STATE_FILE}") as handle:
        data = handle.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def previous_run(run: Location) -> Any | None:
    """The Ray Train result of an earlier run stored at `run` (storage path / name), if it has a checkpoint."""
    try:
        previous = ray.train.Result.from_path(run.path, storage_filesystem=run.fs)
    except Exception:  # noqa: BLE001 - no earlier run (or not a Ray Train run directory)
        return None
    return previous if previous.checkpoint is not None and "epoch" in (previous.metrics or {}) else None


def latest_epoch(run: Location) -> int | None:
    """The epoch of the latest checkpoint of an earlier run at `run`, if any."""
    previous = previous_run(run)
    return int(previous.metrics["epoch"]) if previous is not None else None


def pick_checkpoint(result: Any, config: TrainConfig) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
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


def export_artifact(result: Any, config: TrainConfig, record: dict[str, Any], validation_source: str | None) -> dict[str, Any]:
    """Write the model artifact to run.output from the chosen checkpoint (run.artifact_from) of `result`.

    `record` (catalog, items, weights) joins the artifact's `train` record, and the chosen
    checkpoint's validation metrics its `validation`; returns what was written: model_id,
    epochs, the metrics of the last and of the chosen checkpoint, the artifact's files.
    """
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {config.run.name} produced no checkpoint")
    checkpoint, chosen_metrics = pick_checkpoint(result, config)
    state = read_checkpoint(checkpoint)
    model = MGAModel(config.model)
    model.load_state_dict({name[len("model."):]: value for name, value in state["objective"].items() if name.startswith("model.")})
    metrics = dict(result.metrics or {})
    epochs = state["epoch"] + 1
    resumed = list(state.get("starts", [0]))[1:]
    val = {key: chosen_metrics[key] for key in sorted(chosen_metrics) if key.startswith("val_") and np.isfinite(float(chosen_metrics[key]))}
    files = pack_artifact(
        model,
        {
            "image_size": config.data.image_size,
            "train": {
                "run": config.run.name,
                "epochs": epochs,
                "last_epoch": int(metrics.get("epoch", epochs)),
                "checkpoint": config.run.artifact_from,
                "resumed_after_epochs": resumed,
                **record,
                "validation": {"source": validation_source, **val} if validation_source else None,
                "config": config.model_dump(mode="json"),
            },
            "recipe": config.recipe,
        },
    )
    write_artifact(config.run.output, files)
    return {
        "model_id": json.loads(files["artifact.json"])["model_id"],
        "files": files,
        "metrics": metrics,
        "checkpoint_metrics": chosen_metrics,
        "val": val,
        "epochs": epochs,
        "last_epoch": int(metrics.get("epoch", epochs)),
        "resumed_after_epochs": resumed,
    }
