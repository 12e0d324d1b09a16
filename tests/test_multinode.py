"""The pipeline on a real multi-node Ray cluster (tests/cluster.py): a head with no CPUs for
work and worker nodes of 2 CPUs, each with its own raylet, object store and temp dir; tables
and the model on S3 (the moto server); jobs submitted with `ray job submit`.

Work spreads over the worker nodes and equals a single-node run; losing a worker node
(SIGKILL of everything on it) in the middle of an embed or a search loses and doubles
nothing, and a node that joins mid-job takes work; a node that cannot work (no project, no
S3 settings) fails the job in one line naming it. The tests run in order on one cluster,
each on the tables and the nodes the one before left.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
import uuid

import boto3
import numpy as np
import pyarrow.compute as pc
import pytest
import yaml

from pipelines.storage import resolve
from pipelines.synthetic import SynthSpec
from pipelines.tables import open_table, read_table
from tests.cluster import RAY, REPO, RayCluster
from tests.test_incremental_search import assert_same_search
from tests.tiny import TRAIN, write_random_model

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.timeout(600)]

# 60 items, 480 images of 96 px: an embed of a few dozen batches, long enough to lose a node in.
SPEC = SynthSpec(seed=5, groups=10, items_per_group=6, test_fraction=0.5, train_views=4, gallery_views=2, query_views=2, image_size=96)
SEARCH = ["--depth", "20", "--rerank-top", "5"]
EMBED_WORK = ("Embedder", "prepare_batch", "ReadFiles", "Write")  # Ray Data's names for the embed's tasks and actors
SEARCH_WORK = ("GalleryScanner",)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    bucket = f"mga-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1").create_bucket(Bucket=bucket)
    ray_cluster = RayCluster(root, dict(os.environ))
    try:
        ray_cluster.start_head()
        for name in ("a", "b"):
            ray_cluster.add_node(name, wait=False)
        ray_cluster.wait_for(lambda nodes: {"head", "a", "b"} <= set(nodes), "the worker nodes to join")
        base = f"s3://{bucket}"
        model_id = write_random_model(f"{base}/model", image_size=96)
        spec = [word for field in dataclasses.fields(SPEC) for word in ("--" + field.name.replace("_", "-"), str(getattr(SPEC, field.name)))]
        ray_cluster.run(["pipelines.synth", "--out", f"{base}/catalog", *spec])
        yield {"cluster": ray_cluster, "base": base, "model_id": model_id, "root": root}
    finally:
        ray_cluster.stop()


def job_id(cluster: RayCluster, logs: str) -> str:
    submission = re.search(r"raysubmit_\w+", logs).group(0)
    return next(job["job_id"] for job in cluster.state("jobs") if job.get("submission_id") == submission)


def worker_nodes_of(cluster: RayCluster, job: str, names: dict[str, str], work: tuple[str, ...]) -> set[str]:
    """The names of the nodes where the job's tasks and actors named with one of `work` ran
    (the job's own zero-CPU coordinators, Ray Data's and the node probes, may run on the head)."""
    by_id = {node_id: name for name, node_id in names.items()}
    ran = [(task.get("name", ""), task.get("node_id")) for task in cluster.state("tasks", f"job_id={job}")]
    ran += [(actor.get("class_name", ""), actor.get("node_id")) for actor in cluster.state("actors", f"job_id={job}")]
    return {by_id.get(node_id, node_id) for name, node_id in ran if node_id and any(marker in name for marker in work)}


def embed(base: str, out: str, *extra: str) -> list[str]:
    return ["pipelines.embed", "--model", f"{base}/model", "--catalog", f"{base}/catalog", "--out", out, "--batch-size", "16", *extra]


def test_work_spreads_over_the_worker_nodes_and_equals_a_single_node_run(cluster, ray_local, tmp_path):
    from pipelines import embed as embed_job
    from pipelines import search

    ray_cluster, base = cluster["cluster"], cluster["base"]
    names = ray_cluster.alive_nodes()
    logs = ray_cluster.run(embed(base, f"{base}/features", "--actors", "2"))
    assert worker_nodes_of(ray_cluster, job_id(ray_cluster, logs), names, EMBED_WORK) == {"a", "b"}, "the embed ran on the head or on one node only"
    logs = ray_cluster.run(["pipelines.search", "--features", f"{base}/features", "--out", f"{base}/rankings", "--workers", "2", *SEARCH])
    assert worker_nodes_of(ray_cluster, job_id(ray_cluster, logs), names, SEARCH_WORK) == {"a", "b"}
    # Ray's warning that a restarted actor could not get its constructor arguments: not for the scan actors any more
    # (Ray Data's and Ray Train's own actors still get theirs from the object store, owned by the driver: see cluster/README.md).
    assert "constructor arguments in the object store" not in logs

    # The same jobs on one node (the test's local Ray), from the same S3 tables.
    embed_job.run(f"{base}/model", f"{base}/catalog", str(tmp_path / "features"), batch_size=16)
    local, distributed = (read_table(open_table(resolve(uri))).sort_by("image_id") for uri in (str(tmp_path / "features"), f"{base}/features"))
    assert local.column("image_id").equals(distributed.column("image_id")) and local.num_rows == open_table(resolve(f"{base}/catalog")).rows
    np.testing.assert_allclose(np.stack(local.column("global").to_numpy(zero_copy_only=False)),
                               np.stack(distributed.column("global").to_numpy(zero_copy_only=False)), atol=1e-5)
    search.run(f"{base}/features", str(tmp_path / "rankings"), depth=20, rerank_top=5)
    assert_same_search(f"{base}/rankings", str(tmp_path / "rankings"))


def _wait_for_actor(ray_cluster: RayCluster, class_fragment: str, names: dict[str, str], timeout: float = 180) -> str:
    """The name of a worker node where an alive actor of `class_fragment` runs."""
    by_id = {node_id: name for name, node_id in names.items()}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for actor in ray_cluster.state("actors", "state=ALIVE"):
            if class_fragment in actor.get("class_name", "") and by_id.get(actor.get("node_id")) not in (None, "head"):
                return by_id[actor["node_id"]]
        time.sleep(0.5)
    raise AssertionError(f"no alive {class_fragment} actor within {timeout} s")


def test_an_embed_loses_a_node_and_takes_one_that_joins(cluster):
    ray_cluster, base = cluster["cluster"], cluster["base"]
    names = ray_cluster.alive_nodes()
    out = f"{base}/features-lost"
    job = ray_cluster.submit(embed(base, out, "--actors", "2"))
    lost = _wait_for_actor(ray_cluster, "Embedder", names)
    ray_cluster.kill(lost)
    ray_cluster.add_node("c", wait=False)  # a replacement, as an autoscaler would start
    logs, _ = job.communicate(timeout=420)
    assert job.returncode == 0 and "succeeded" in logs, logs[-6000:]
    names = {**names, **ray_cluster.wait_for(lambda nodes: "c" in nodes, "node c")}
    ran = worker_nodes_of(ray_cluster, job_id(ray_cluster, logs), names, EMBED_WORK)
    assert lost in ran and "c" in ran, f"worked: {ran}, lost {lost}"
    table = read_table(open_table(resolve(out)), ["image_id", "global"]).sort_by("image_id")
    assert table.num_rows == open_table(resolve(f"{base}/catalog")).rows and pc.count_distinct(table.column("image_id")).as_py() == table.num_rows
    assert re.search(r"rejected\s+0\b", logs), logs[-3000:]
    # Rows embedded before the loss, redone after it, or on the new node: the undisturbed run's features.
    undisturbed = read_table(open_table(resolve(f"{base}/features")), ["image_id", "global"]).sort_by("image_id")
    assert table.column("image_id").equals(undisturbed.column("image_id"))
    np.testing.assert_allclose(np.stack(table.column("global").to_numpy(zero_copy_only=False)),
                               np.stack(undisturbed.column("global").to_numpy(zero_copy_only=False)), atol=1e-5)


def test_a_search_loses_the_node_of_a_scanner(cluster):
    ray_cluster, base = cluster["cluster"], cluster["base"]
    names = ray_cluster.alive_nodes()
    out = f"{base}/rankings-lost"
    # Chunks of 4 queries: 30 passes over the gallery, a node is lost in one of them.
    job = ray_cluster.submit(["pipelines.search", "--features", f"{base}/features", "--out", out, "--workers", "2", "--query-chunk", "4", *SEARCH])
    lost = _wait_for_actor(ray_cluster, "GalleryScanner", names)
    time.sleep(3)  # into the token scans: the model is loaded from storage again on the restarted actor
    ray_cluster.kill(lost)
    ray_cluster.add_node("d", wait=False)
    logs, _ = job.communicate(timeout=420)
    assert job.returncode == 0 and "succeeded" in logs, logs[-6000:]
    assert_same_search(out, f"{base}/rankings")


def test_training_submitted_with_ray_job_submit_loses_a_node_and_resumes_from_s3(cluster):
    """`ray job submit --runtime-env ray_job.yaml` as users run it (the repo uploaded as the job's
    working dir); a worker node lost after the first checkpoint: Ray Train restarts the worker
    group on the nodes left, from the checkpoint on S3, and the run ends with every epoch."""
    ray_cluster, base = cluster["cluster"], cluster["base"]
    # Ray 2.60 turns token auth on for a head started with `ray start --head`; the CLI sends
    # its token (~/.ray/auth_token) only with RAY_AUTH_MODE=token, as the README says.
    without = {key: value for key, value in ray_cluster.env.items() if key != "RAY_AUTH_MODE"}
    refused = subprocess.run([RAY, "job", "list", "--address", ray_cluster.address], capture_output=True, text=True, env=without, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr, refused.stderr[-2000:]

    runtime_env = yaml.safe_load((REPO / "ray_job.yaml").read_text())
    runtime_env.pop("pip")  # this machine's venv has every dependency, and there is no network
    runtime_env["working_dir"] = str(REPO)
    # Epochs of about a second: enough of them that the node is lost (a few seconds after the first) while some remain.
    epochs = 12
    overrides = TRAIN + [f"optim.epochs={epochs}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "run.checkpoint_every=1",
                         "run.validate_every=0", "run.max_failures=2", "run.name=lost"]
    job = ray_cluster.submit(["pipelines.train", "--config", "pipelines/configs/tiny.yaml", *[w for o in overrides for w in ("--set", o)],
                              "--catalog", f"{base}/catalog", "--output", f"{base}/trained", "--storage-path", f"{base}/runs"], runtime_env=runtime_env)
    names = ray_cluster.alive_nodes()
    lines = []
    for line in job.stdout:  # until the first epoch's checkpoint is reported
        lines.append(line)
        if "[train] epoch 1/" in line:
            break
    lost = _wait_for_actor(ray_cluster, "RayTrainWorker", names)
    ray_cluster.kill(lost)
    logs, _ = job.communicate(timeout=480)
    logs = "".join(lines) + logs
    assert job.returncode == 0 and "succeeded" in logs, logs[-6000:]
    names = {**names, **ray_cluster.alive_nodes()}
    trained_on = worker_nodes_of(ray_cluster, job_id(ray_cluster, logs), names, ("RayTrainWorker",))
    assert lost in trained_on and "head" not in trained_on and len(trained_on) >= 2, trained_on  # the group moved off the lost node
    assert "== mga train ==" in logs and "TrainingReport(" not in logs and "Reporting training result" not in logs, logs[-5000:]
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", logs)]
    assert len(resumed) == 1 and 1 <= resumed[0] < epochs, logs[-5000:]
    # Every epoch after the restart has its line, the first saying where it resumed from. (Lines the lost node's
    # workers printed in its last second may never reach the driver: its log monitor died with it.)
    assert all(f"[train] epoch {epoch}/{epochs} " in logs for epoch in (1, *range(resumed[0] + 1, epochs + 1))), logs[-5000:]
    assert re.search(rf"\[train\] epoch {resumed[0] + 1}/{epochs} .*resumed from the checkpoint of epoch {resumed[0]}", logs), logs[-5000:]
    from pipelines.model_store import load_model

    _, _, saved = load_model(f"{base}/trained")
    assert saved["train"]["epochs"] == epochs and saved["train"]["resumed_after_epochs"] == resumed


def test_a_node_that_cannot_work_fails_the_job_in_one_line(cluster, tmp_path):
    ray_cluster, base = cluster["cluster"], cluster["base"]
    never = f"{base}/features-never"
    # A node from an image without the project: `pipelines` and `mga` cannot be imported there.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "sitecustomize.py").write_text(
        "import sys\n"
        "class NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pipelines', 'mga'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
    )
    for name, env, lacks in (
        ("bare", {**ray_cluster.env, "PYTHONPATH": str(tmp_path / "bare")}, "the project is not installed there"),
        ("nocreds", {key: value for key, value in ray_cluster.env.items() if not key.startswith("AWS_")}, "no AWS_ENDPOINT_URL"),
    ):
        ray_cluster.add_node(name, env=env)
        node_id = ray_cluster.alive_nodes()[name]
        job = ray_cluster.submit(embed(base, never))
        logs, _ = job.communicate(timeout=300)
        errors = {line for line in logs.splitlines() if line.startswith("mga: error:")}  # `ray job submit` repeats the job's last logs
        assert job.returncode != 0 and len(errors) == 1, logs[-5000:]
        errors = sorted(errors)
        assert f"node id {node_id[:12]}" in errors[0] and lacks in errors[0], errors[0]
        ray_cluster.kill(name)
    assert not resolve(never).exists()
