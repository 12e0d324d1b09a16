"""Experiment tracking in MLflow: the runs a training and an evaluation log to, never failing the job.

A tracking URI is an MLflow tracking server (`http(s)://`), a local store (`sqlite:///path`,
the store MLflow's docs recommend since 3.7) or anything else MLflow's client takes; "" means
the standard `MLFLOW_TRACKING_URI`, and without either nothing is logged. Logging must never
cost a job its work: a store that cannot be reached when the run opens is one warning line
(and the job goes on untracked), and the first call that fails later is one warning line and
the end of logging for that run. HTTP calls get few retries and a short timeout unless the
user set MLflow's own variables: MLflow's defaults (7 retries, 120 s) would stall an epoch for
minutes on a server that went away.

MLflow allows no `@` in a metric name: `R@1` is logged as `R_at_1`.

MLflow (and requests) are imported, and its HTTP settings defaulted, when a run opens: a job
without tracking never pays the import (~2 s) nor has its environment touched.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MODEL_TAG = "model_id"  # the tag evaluations find a model's run by
EVALUATIONS_EXPERIMENT = "mga-evaluations"  # where an evaluation of a model without a run goes
PROBE_TIMEOUT_S = 5.0


def configured_uri(configured: str) -> str:
    """The tracking URI in force: `configured`, else MLFLOW_TRACKING_URI, else "" (no tracking)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "")


def local_store(directory: str | os.PathLike) -> str:
    """The URI of a local store (an SQLite file) in `directory`."""
    return f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (an SQLite file or a folder), which other machines cannot reach."""
    scheme = urlparse(uri).scheme
    return scheme in ("sqlite", "file", "")


def store_directory(uri: str) -> Path | None:
    """The folder of a local SQLite store (`sqlite:///relative.db`, `sqlite:////absolute.db`), None for any other URI."""
    return Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") else None


def ui_command(uri: str) -> str:
    """The one command that opens MLflow's UI on the local SQLite store `uri`.

    The UI is the full `mlflow` package, which the project does not install (mlflow-skinny logs;
    the full package caps pyarrow below the release the project needs), so the command installs it
    in a venv of its own beside the store, at the release that wrote the store: a UI of another
    release refuses the store's database schema.
    """
    venv = store_directory(uri) / "mlflow-ui"
    release = version("mlflow-skinny")
    return f"python3 -m venv {venv} && {venv}/bin/pip install -q mlflow=={release} && {venv}/bin/mlflow ui --backend-store-uri {uri}"


def metric_name(name: str) -> str:
    return name.replace("@", "_at_")


def _warn(uri: str, what: str, error: BaseException) -> None:
    text = str(error).strip()
    # A refused or timed-out connection: its errno line, not urllib3's nested reprs.
    reason = match.group(0) if (match := re.search(r"\[Errno -?\d+\] [^'\")]+", text)) else (text.splitlines()[0][:300] if text else type(error).__name__)
    print(f"[tracking] warning: MLflow at {uri}: {what} ({reason}); the job goes on without it", file=sys.stderr, flush=True)


def _probe(uri: str) -> None:
    """Raise if a tracking server does not answer its health check within seconds (stores without one pass)."""
    if urlparse(uri).scheme in ("http", "https"):
        import requests

        response = requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
        response.raise_for_status()


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    # Unless the user chose otherwise: a lost server costs seconds, not minutes (MLflow reads these per request).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    # A new local store's "Creating initial MLflow database tables..." is not news for the job's console.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created when missing; a local store keeps its artifacts beside the database
    (MLflow's default would be ./mlruns under whatever directory the job runs in)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    directory = store_directory(uri)
    location = str(directory / "mlartifacts") if directory is not None else None
    return client.create_experiment(name, artifact_location=location)


class Tracker:
    """One MLflow run, logged to without ever failing the job (the first error: one warning line, then nothing)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client: Any = _client(uri)

    def _call(self, what: str, action) -> Any:
        if self.client is None:
            return None
        try:
            return action(self.client)
        except Exception as error:  # noqa: BLE001 - logging never fails the job
            _warn(self.uri, f"could not {what} (run {self.run_id})", error)
            self.client = None
            return None

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(key, str(value)) for key, value in params.items()]
        self._call("log parameters", lambda client: client.log_batch(self.run_id, params=values))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every finite number of `metrics` (booleans and strings left out), at `step`."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        values = [
            Metric(metric_name(key), float(value), stamp, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        ]
        self._call("log metrics", lambda client: client.log_batch(self.run_id, metrics=values))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        values = [RunTag(key, str(value)) for key, value in tags.items()]
        self._call("set tags", lambda client: client.log_batch(self.run_id, tags=values))

    def log_files(self, files: Mapping[str, bytes], artifact_path: str) -> None:
        """Log in-memory files (name -> bytes) as the run's artifacts under `artifact_path`."""

        def upload(client: Any) -> None:
            with tempfile.TemporaryDirectory() as directory:
                for name, data in files.items():
                    (Path(directory) / name).write_bytes(data)
                client.log_artifacts(self.run_id, directory, artifact_path)

        self._call("log artifacts", upload)

    def register(self, name: str, artifact_path: str, tags: Mapping[str, str]) -> str | None:
        """Register the artifacts under `artifact_path` as a new version of registered model `name`; its version number."""

        def create(client: Any) -> str:
            if client.search_registered_models(filter_string=f"name = '{name}'", max_results=1) == []:
                client.create_registered_model(name)
            source = f"{client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
            return client.create_model_version(name, source, run_id=self.run_id, tags=dict(tags)).version

        return self._call(f"register model {name}", create)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("end the run", lambda client: client.set_terminated(self.run_id, status))


def open_run(uri: str, experiment: str, run_name: str, run_id: str | None = None, tags: Mapping[str, str] | None = None) -> Tracker | None:
    """A Tracker on run `run_id` of `uri` (marked running again), or on a new run of `experiment`;
    None after one warning line when the store cannot be reached or refuses."""
    try:
        _probe(uri)
        client = _client(uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name, tags=dict(tags or {})).info.run_id
    except Exception as error:  # noqa: BLE001 - logging never fails the job
        _warn(uri, "cannot open a run", error)
        return None
    return Tracker(uri, run_id)


def model_run(uri: str, model_id: str | None, run_name: str, tags: Mapping[str, str]) -> tuple[Tracker | None, bool]:
    """(tracker, found): the latest run tagged with `model_id` (the training that made the model) in any
    experiment, else a new run `run_name` of EVALUATIONS_EXPERIMENT; (None, False) after one warning line
    when the store cannot be reached."""
    try:
        _probe(uri)
        client = _client(uri)
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        runs = []
        if model_id and experiments:
            runs = client.search_runs(experiments, filter_string=f"tags.{MODEL_TAG} = '{model_id}'", order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as error:  # noqa: BLE001 - logging never fails the job
        _warn(uri, "cannot search for the model's run", error)
        return None, False
    if runs:
        return Tracker(uri, runs[0].info.run_id), True
    return open_run(uri, EVALUATIONS_EXPERIMENT, run_name, tags=tags), False
