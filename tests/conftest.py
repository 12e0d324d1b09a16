"""Shared fixtures: one real local Ray instance and one real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1: the real S3 protocol over HTTP."""
    port = _free_port()
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


@pytest.fixture()
def s3_env(s3_server):
    """A fresh bucket on the moto server (the AWS variables are set for the session)."""
    import uuid

    import boto3

    bucket = f"mga-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"endpoint": s3_server["endpoint"], "bucket": bucket}
