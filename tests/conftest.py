"""Shared fixtures: one real local Ray instance, one real S3 endpoint (moto server), and the
session's data: one synthetic catalog, one random-init model artifact, ONE trained tiny model
and its features. Tests read them and write their outputs elsewhere. Session fixtures are per
pytest-xdist worker (two, `-n 2` in pyproject): each worker that needs Ray starts its own; the
scheduler below keeps the training's users on one worker, so it still runs once.

Every test that starts or uses Ray carries `@pytest.mark.ray` (`-m "not ray"` is the fast
subset); collection fails if a test asks for `ray_local` without it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.cluster import free_ports

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


# The modules that share the session's one training (`trained_model`): pytest-xdist runs them
# in one worker, so the suite trains it once.
SHARED_TRAINING = ("tests/test_pipeline.py", "tests/test_train.py")
# Whole modules go to the workers in this order, the longest first (seconds beside another
# worker, session 28: training 219, then 168, 136, 117, 80, 44, 41, 36), so that the last
# ones to start are short and the two workers end together; the rest follow in file order.
LONGEST_FIRST = (*SHARED_TRAINING, "tests/test_retrieval.py", "tests/test_incremental_search.py", "tests/test_nightly.py",
                 "tests/test_reliability.py", "tests/test_tables.py", "tests/test_search.py", "tests/test_prepare.py")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("ray")]
    if unmarked:
        raise pytest.UsageError("tests that use ray_local without @pytest.mark.ray: " + ", ".join(unmarked))
    stray = [item.nodeid for item in items if "trained_model" in getattr(item, "fixturenames", ()) and _module(item.nodeid) not in SHARED_TRAINING]
    if stray:
        raise pytest.UsageError(f"tests outside {SHARED_TRAINING} use trained_model (add their module there): " + ", ".join(stray))
    # The scheduler hands out modules in collection order.
    items.sort(key=lambda item: LONGEST_FIRST.index(_module(item.nodeid)) if _module(item.nodeid) in LONGEST_FIRST else len(LONGEST_FIRST))


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_xdist_make_scheduler(config, log):
    """`-n 2` (pyproject): whole modules go to a worker, so module fixtures are built once, and
    the SHARED_TRAINING modules go together. (xdist's `loadgroup` would do the latter, but its
    marks do not reach pytest 9.2's node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "shared-training" if module in SHARED_TRAINING else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance shared by every test that asks for it.

    It starts after the S3 server so that its workers inherit the S3 settings.
    """
    import ray

    from pipelines.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1: the real S3 protocol over HTTP."""
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    # Session-wide, before Ray starts: Ray workers take their S3 settings from these.
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("moto server did not start")
    yield {"endpoint": endpoint, "process": process, "port": port}
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (`mlflow server`: an SQLite store, artifacts served
    from a local folder): its URL. Its workers are its own process group, stopped together."""
    import requests

    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.3)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


@pytest.fixture()
def s3_env(s3_server):
    """A fresh bucket on the moto server (the AWS variables are set for the session)."""
    import uuid

    import boto3

    bucket = f"mga-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"endpoint": s3_server["endpoint"], "bucket": bucket}


@pytest.fixture(scope="session")
def synthetic_catalog(tmp_path_factory) -> str:
    """The tiny synthetic catalog (tests/tiny.py CATALOG_SPEC), as a Delta table: its path."""
    from pipelines import synth
    from tests.tiny import CATALOG_SPEC

    path = str(tmp_path_factory.mktemp("session") / "catalog")
    synth.run(path, CATALOG_SPEC)
    return path


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> dict:
    """A randomly initialised tiny model artifact: {"uri", "model_id"}."""
    from tests.tiny import write_random_model

    uri = str(tmp_path_factory.mktemp("session") / "random-model")
    return {"uri": uri, "model_id": write_random_model(uri)}


@pytest.fixture(scope="session")
def trained_model(ray_local, synthetic_catalog, mlflow_server, tmp_path_factory) -> dict:
    """The session's one training: the tiny model, 1 epoch, 2 Ray Train workers, tracked on the MLflow server.

    {"catalog", "model", "root", "result"}. The catalog, output and storage paths are given
    relative to the driver's working directory, as `mga train` users type them: Ray Train
    workers run in another directory, so the job must resolve them.
    """
    from pipelines import train
    from pipelines.config import load_config
    from tests.tiny import TRAIN

    root = tmp_path_factory.mktemp("trained")
    previous = os.getcwd()
    os.chdir(root)
    try:
        config = load_config("tiny", TRAIN + ["optim.epochs=1", "scaling.num_workers=2"],
                             extra={"data": {"catalog": os.path.relpath(synthetic_catalog, root)},
                                    "run": {"output": "model", "storage_path": "runs", "name": "t", "tracking_uri": mlflow_server}})
        result = train.run(config)
    finally:
        os.chdir(previous)
    return {"catalog": synthetic_catalog, "model": str(root / "model"), "root": root, "result": result, "tracking_uri": mlflow_server}


@pytest.fixture(scope="session")
def trained_features(trained_model) -> dict:
    """The trained model's features of the whole catalog: {"uri", "manifest"} (embed's return value)."""
    from pipelines import embed

    uri = str(trained_model["root"] / "features")
    return {"uri": uri, "manifest": embed.run(trained_model["model"], trained_model["catalog"], uri)}
