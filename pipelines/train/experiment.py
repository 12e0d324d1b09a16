"""The MLflow run of a training run (pipelines.tracking): one per `run.storage_path/run.name`.

Its id is kept beside the checkpoints (`mlflow-run.json`), so a resumed run, or a re-export of
a finished one, continues the same MLflow run; `run.restart=true` deletes it with the
checkpoints and the fresh start opens a new one. A new run gets as parameters every value
that shapes the weights (the run's fingerprint: pipelines.train.runs) plus the catalog's URI
and version, the learning rate in force and the workers; rank 0 logs each epoch's metrics with
the epoch as step (pipelines.train.loop); the end logs the artifact's files under `model`, tags
the run with the model_id (evaluations find the run by it) and, with `run.register_as`,
registers the artifact as a model version.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines import tracking
from pipelines.config import TrainConfig
from pipelines.runtime import cluster_address
from pipelines.storage import Location, resolve

TRACKING_FILE = "mlflow-run.json"
ARTIFACT_PATH = "model"


def open_training_run(config: TrainConfig, uri: str, run: Location, fingerprint: dict[str, Any], catalog: dict[str, Any]) -> tracking.Tracker | None:
    """The MLflow run of the training run at `run`: the one recorded there (same tracking URI), else a new one."""
    record_file = run.join(TRACKING_FILE)
    record = json.loads(record_file.read_bytes()) if record_file.exists() else None
    if record is not None and record.get("tracking_uri") == uri:
        tracker = tracking.open_run(uri, config.run.experiment, config.run.name, run_id=record["run_id"])
        if tracker is not None:
            print(f"[train] MLflow: continuing run {tracker.run_id} at {uri}", flush=True)
        return tracker
    tracker = tracking.open_run(uri, config.run.experiment, config.run.name, tags={"mga.run_path": run.uri})
    if tracker is None:
        return None
    record_file.write_bytes(json.dumps({"tracking_uri": uri, "run_id": tracker.run_id}).encode())
    tracker.log_params(
        fingerprint
        | {
            "catalog": catalog["uri"],
            "catalog_version": catalog["version"],
            "catalog train images": catalog["images"],
            "effective lr": config.effective_lr(),
            "scaling.num_workers": config.scaling.num_workers,
            "scaling.use_gpu": config.scaling.use_gpu,
        }
    )
    print(f"[train] MLflow: run {tracker.run_id} in experiment {config.run.experiment} at {uri}", flush=True)
    return tracker


def worker_tracking(tracker: tracking.Tracker | None) -> dict[str, str] | None:
    """What rank 0 needs to log its epochs to the run, or None when the workers cannot reach the store:
    a local store is a file on this machine, out of reach of workers on other nodes (then one warning)."""
    if tracker is None:
        return None
    if cluster_address() and tracking.is_local_store(tracker.uri):
        print(f"[tracking] warning: {tracker.uri} is a file on this machine, out of reach of the training workers on the cluster's "
              "nodes: epoch metrics are not logged (give a tracking server, http(s)://)", flush=True)
        return None
    return {"uri": tracker.uri, "run_id": tracker.run_id}


def log_artifact(tracker: tracking.Tracker | None, config: TrainConfig, written: dict[str, Any]) -> str | None:
    """Log the written artifact (files, model_id) and end the run; register it with run.register_as. The registered version."""
    if tracker is None:
        return None
    tracker.log_files(written["files"], ARTIFACT_PATH)
    tracker.set_tags({tracking.MODEL_TAG: written["model_id"], "mga.artifact": resolve(config.run.output).uri, "mga.epochs": written["epochs"]})
    version = None
    if config.run.register_as:
        version = tracker.register(config.run.register_as, ARTIFACT_PATH, {tracking.MODEL_TAG: written["model_id"], "mga.artifact": resolve(config.run.output).uri})
    tracker.finish()
    return version
