"""pipelines.tracking on MLflow's real local store (an SQLite file, no server): runs that jobs open,
continue and log to, and a store that cannot be reached costing one warning line. The tracking
server (`mlflow server`) is exercised with the trainings in tests/test_train.py and tests/test_pipeline.py."""

from __future__ import annotations

import math
import os
from importlib.metadata import version

import pytest
from mlflow import MlflowClient

from pipelines import tracking
from tests.cluster import free_ports


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One local store for the module: creating one migrates its database schema (seconds)."""
    directory = tmp_path_factory.mktemp("store")
    return tracking.local_store(directory)


@pytest.mark.timeout(120)
def test_a_run_on_a_local_store_is_logged_to_continued_and_keeps_its_artifacts_beside_the_store(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = tracking.store_directory(store)
    assert store == f"sqlite:///{directory / 'mlflow.db'}" and tracking.is_local_store(store)
    assert not tracking.is_local_store("http://mlflow.example:5000")

    opened = tracking.open_run(store, "mga", "t", tags={"purpose": "test"})
    assert opened is not None and opened.active
    opened.log_params({"model.alpha": 0.5, "catalog": "s3://bucket/catalog", "layers": [3, 4]})
    opened.log_metrics({"val_R@1": 0.25, "loss": 2.0, "skipped": math.nan, "flag": True, "source": "text"}, step=1)
    opened.log_files({"artifact.json": b"{}", "model.safetensors": b"weights"}, "model")
    opened.finish("FAILED")  # an interrupted training

    again = tracking.open_run(store, "mga", "t", run_id=opened.run_id)  # its resume
    again.log_metrics({"val_R@1": 0.5, "loss": 1.5}, step=2)
    again.finish()

    client = MlflowClient(store)
    run = client.get_run(opened.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    assert run.data.params == {"model.alpha": "0.5", "catalog": "s3://bucket/catalog", "layers": "[3, 4]"}
    assert set(run.data.metrics) == {"val_R_at_1", "loss"}  # '@' is not allowed in MLflow names; NaN, bools and text are left out
    assert [(m.step, m.value) for m in client.get_metric_history(opened.run_id, "val_R_at_1")] == [(1, 0.25), (2, 0.5)]
    # The artifacts lie beside the store, not in ./mlruns of wherever the job ran.
    assert sorted(os.listdir(directory / "mlartifacts" / opened.run_id / "artifacts" / "model")) == ["artifact.json", "model.safetensors"]
    assert not (tmp_path / "mlruns").exists()
    venv = directory / "mlflow-ui"
    assert tracking.ui_command(store) == (f"python3 -m venv {venv} && {venv}/bin/pip install -q mlflow=={version('mlflow-skinny')} "
                                          f"&& {venv}/bin/mlflow ui --backend-store-uri {store}")


@pytest.mark.timeout(120)
def test_an_unreachable_server_is_one_warning_line_and_nothing_else(capfd):
    (closed,) = free_ports(1)
    uri = f"http://127.0.0.1:{closed}"
    assert tracking.open_run(uri, "mga", "t") is None
    assert tracking.model_run(uri, "abc", "evaluate", {}) == (None, False)
    out, err = capfd.readouterr()
    lines = (out + err).strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"[tracking] warning: MLflow at {uri}: ") and "Connection refused" in line for line in lines), lines


@pytest.mark.timeout(120)
def test_a_store_that_fails_mid_run_stops_logging_after_one_warning(store, capfd):
    opened = tracking.open_run(store, "mga", "t")
    opened.log_metrics({"loss": 1.0}, step=1)
    MlflowClient(store).delete_run(opened.run_id)  # someone deletes the run mid-training: every call fails now
    opened.log_metrics({"loss": 0.5}, step=2)
    opened.log_files({"a.txt": b"a"}, "model")
    opened.finish()
    assert not opened.active
    out, err = capfd.readouterr()
    warnings = [line for line in (out + err).splitlines() if line.startswith("[tracking] warning")]
    assert len(warnings) == 1 and f"could not log metrics (run {opened.run_id})" in warnings[0], warnings
