"""Reliability: bad images, faults (a killed actor, an S3 outage, killed jobs), bad arguments,
and security (no unpickling, no path escapes, no credentials in outputs or logs).

Every fault is real: actors and jobs are SIGKILLed, the S3 endpoint (a moto server of this
module's own) is frozen with SIGSTOP, the bad images are real files. Figures go to stdout
(`pytest -s`); the summary of what was injected and survived is in each test's print. The
S3-outage tests start a Ray instance of their own each and run in the multi-node stage
(`pytest -m "multinode or outage" -n 0`, README), not in the default suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray._private.state  # the GCS actor table: the state API needs the dashboard, not started locally
import torch
from PIL import Image

from mga.artifact import CONFIG, INDEX, WEIGHTS, artifact_id, unpack_artifact
from mga.config import ModelConfig
from pipelines.synthetic import SynthSpec
from tests.bad_images import CORPUS
from tests.cluster import free_ports
from tests.tiny import MODEL as TINY_MODEL
from pipelines import embed, prepare, search, synth
from pipelines.model_store import load_artifact, read_artifact_files, write_artifact
from pipelines.schemas import CATALOG, column_matrix
from pipelines.storage import StorageError, resolve, write_parquet
from pipelines.tables import TableNotFound, TableWriter, companion, open_table, read_table, vacuum

MODEL = ModelConfig(**TINY_MODEL)
SPEC = SynthSpec(seed=9, groups=4, items_per_group=3, test_fraction=0.5, train_views=2, gallery_views=2, query_views=2, image_size=64)
IMAGES = 4 * 3 // 2 * (2 + 2 + 2)  # 36
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "a-distinctive-secret-7f3c9e1b5d"


def publish_rows(uri: str, rows: list[dict], files: int = 1) -> None:
    """A catalog table written by hand (bypassing prepare), in `files` shards, committed like any other."""
    per_file = -(-len(rows) // files)
    with TableWriter(resolve(uri)) as writer:
        for number, start in enumerate(range(0, len(rows), per_file)):
            write_parquet(writer.file(f"part-{number:05d}.parquet"), pa.Table.from_pylist(rows[start:start + per_file], schema=CATALOG))
        writer.commit(CATALOG, {"table": "catalog", "rows": len(rows), "input": len(rows), "rejected": 0})


def rows_of(uri: str, version: int | None = None) -> pa.Table:
    """The rows of the table's current version (or `version`)."""
    return read_table(open_table(resolve(uri), version))


def rejects_of(uri: str) -> list[dict]:
    """The rejects table the commit metadata of the table at `uri` names, at the version it names."""
    pointer = open_table(resolve(uri)).info["rejects"]
    assert pointer["table"] == companion(resolve(uri), "rejects").uri
    return rows_of(pointer["table"], pointer["version"]).to_pylist()


def features_matrix(table: pa.Table) -> dict[str, np.ndarray]:
    rows = table.to_pylist()
    return {row["image_id"]: np.array(row["global"] + row["tokens_0"] + row["tokens_1"], np.float32) for row in rows}


@pytest.fixture(scope="module")
def base(ray_local, random_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    paths = {name: str(root / name) for name in ("catalog", "model", "features")}
    synth.run(paths["catalog"], SPEC, images_per_shard=12)
    paths["model"], paths["model_id"] = random_model["uri"], random_model["model_id"]  # the session's random model
    embed.run(paths["model"], paths["catalog"], paths["features"], batch_size=16)
    paths["root"] = str(root)
    paths["reference"] = features_matrix(rows_of(paths["features"]))
    return paths


def assert_matches_reference(table: pa.Table, reference: dict[str, np.ndarray]) -> None:
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    for image_id, vector in features_matrix(table).items():
        np.testing.assert_allclose(vector, reference[image_id], atol=1e-4)


# ------------------------------------------------------------------------------ bad images


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_bad_image_corpus_through_prepare_and_embed(base, tmp_path):
    root = tmp_path / "shop"
    root.mkdir()
    for name, (data, _) in CORPUS.items():
        (root / name).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes(CORPUS["cmyk.jpg"][0])
    os.symlink(tmp_path / "outside.jpg", root / "link-out.jpg")
    (root / "folder.jpg").mkdir()
    listed = list(CORPUS) + ["../outside.jpg", str(tmp_path / "outside.jpg"), "link-out.jpg", "missing.jpg", "folder.jpg", "cmyk.jpg"]
    expected = {name: want for name, (_, want) in CORPUS.items()}
    expected.update({"../outside.jpg": "outside the root", str(tmp_path / "outside.jpg"): "outside the root",
                     "link-out.jpg": "outside the root", "missing.jpg": "missing file", "folder.jpg": "not a file"})
    csv = root / "catalog.csv"
    csv.write_text("path,item_id,split\n" + "".join(f"{path},item-{i % 3},train\n" for i, path in enumerate(listed)))

    prepared = prepare.run("manifest", str(tmp_path / "catalog"), manifest=str(csv), min_shards=1)
    catalog = rows_of(str(tmp_path / "catalog"))
    rejects = rejects_of(str(tmp_path / "catalog"))
    assert prepared["input"] == len(listed) == prepared["rows"] + prepared["rejected"] == catalog.num_rows + len(rejects)
    sizes = {row["image_id"]: f"ok {row['width']}x{row['height']}" for row in catalog.to_pylist()}
    outcome = {}
    for name, want in expected.items():
        source = os.path.normpath(os.path.join(root, name))  # what prepare read (absolute names stay)
        reasons = [r["reason"] for r in rejects if r["source_path"] == source]
        got = sizes.get(name) if want.startswith("ok") else next((r for r in reasons if r.startswith(want)), reasons[0] if reasons else None)
        outcome[name] = got
        assert got is not None and got.startswith(want), f"{name}: expected {want!r}, got {got!r}"
    reasons = {r["source_path"]: r["reason"] for r in rejects}
    # The second listing of cmyk.jpg is a duplicate: kept once, the repeat rejected with a reason.
    assert sum(1 for reason in reasons.values() if reason.startswith("duplicate")) == 1
    for row in catalog.to_pylist():
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]

    # Embed's own reject path: a catalog written by hand with bad bytes beside the good rows.
    good = catalog.to_pylist()
    bad = [dict(good[0], image_id=f"bad/{name}", image=data, sha256=hashlib.sha256(data).hexdigest(), source_path=f"hand/{name}")
           for name, (data, want) in CORPUS.items() if not want.startswith("ok")]
    bad.append(dict(good[0], image_id="bad/null", image=None, sha256="", source_path="hand/null"))
    hand = str(tmp_path / "hand")
    publish_rows(hand, good + bad)
    out = str(tmp_path / "features")
    result = embed.run(base["model"], hand, out, batch_size=8)
    features = rows_of(out)
    embed_rejects = rejects_of(out)
    assert result["rows"] == features.num_rows == len(good) and result["rejected"] == len(embed_rejects) == len(bad)
    assert result["rows"] + result["rejected"] == len(good) + len(bad)
    by_path = {r["source_path"]: r["reason"] for r in embed_rejects}
    for row in bad:
        name = row["source_path"].split("/", 1)[1]
        want = "empty file" if name == "null" else CORPUS[name][1]
        assert by_path[row["source_path"]].startswith(want), (name, by_path[row["source_path"]])
    vectors = column_matrix(features, "global")
    assert np.isfinite(vectors).all()
    # The same rows decoded by the model actors themselves (the default where they have GPUs; here
    # on their CPUs): the same rejects with the same reasons, and features of pixels within a level.
    in_actors = embed.run(base["model"], hand, str(tmp_path / "features-decoded-in-actors"), batch_size=8, decode="actors")
    assert {r["source_path"]: r["reason"] for r in rejects_of(str(tmp_path / "features-decoded-in-actors"))} == by_path
    assert in_actors["rows"] == result["rows"] and in_actors["rejected"] == result["rejected"]
    decoded_here, decoded_there = features_matrix(features), features_matrix(rows_of(str(tmp_path / "features-decoded-in-actors")))
    assert decoded_here.keys() == decoded_there.keys()
    worst = max(float(np.abs(decoded_here[key] - decoded_there[key]).max()) for key in decoded_here)
    assert worst < 0.01, worst
    print(f"\nbad inputs: prepare read {prepared['input']} listed paths ({len(CORPUS)} crafted files, 5 path/escape cases, 1 duplicate): "
          f"{prepared['rows']} written + {prepared['rejected']} rejected; embed of a hand-written catalog with {len(bad)} bad rows: "
          f"{result['rows']} embedded + {result['rejected']} rejected = {len(good) + len(bad)}; rows lost 0; decoded in the actors: "
          f"the same rejects, largest feature difference {worst:.2g}")
    print("  outcomes: " + "; ".join(f"{name}: {got}" for name, got in outcome.items()))


# ------------------------------------------------------------------------------ faults


def test_a_retried_decoding_batch_stages_its_rejects_once(tmp_path):
    """Embed's decoding tasks stage undecodable rows as files named by their batch: a task retried
    on the same rows rewrites its file; one retried with other rows beside it still yields one reject."""
    from pipelines.embed.decoding import prepare_batch, staged_rejects

    jpeg = io.BytesIO()
    Image.new("RGB", (40, 60), (200, 30, 30)).save(jpeg, "JPEG")
    rows = {"good": jpeg.getvalue(), "broken": b"\xff\xd8 not a jpeg", "empty": b""}

    def batch(*names: str) -> pa.Table:
        return pa.table({"image_id": list(names), "item_id": ["item"] * len(names), "split": ["gallery"] * len(names),
                         "domain": ["shop"] * len(names), "category": ["top"] * len(names), "sha256": ["0" * 64] * len(names),
                         "image": [rows[name] for name in names], "bbox": pa.array([None] * len(names), pa.list_(pa.int32(), 4)),
                         "source_path": [f"/photos/{name}.jpg" for name in names]})

    writer = TableWriter(resolve(str(tmp_path / "features_rejects")))  # as embed stages them: in the rejects table's run
    staging = writer.run.join("staged").uri

    def staged() -> pa.Table:
        return staged_rejects(writer.run, writer.written())

    assert staged().num_rows == 0  # nothing staged: an empty table, not an error
    first = prepare_batch(batch("good", "broken"), 32, 10**6, staging)
    assert list(first["image_id"]) == ["good"] and first["pixels"].shape == (1, 3, 32, 32)
    prepare_batch(batch("good", "broken"), 32, 10**6, staging)  # the same task again
    assert len(os.listdir(staging)) == 1
    prepare_batch(batch("broken", "empty"), 32, 10**6, staging)  # the broken row again, batched differently
    rejects = staged()
    assert rejects.column("image_id").to_pylist() == ["broken", "empty"]
    assert rejects.column("source_path").to_pylist() == ["/photos/broken.jpg", "/photos/empty.jpg"]
    assert rejects.column("reason").to_pylist() == ["not an image (unrecognised format)", "empty file (0 bytes)"]


# (An embed losing its model actor, and the node under it: tests/test_multinode.py.)


@pytest.fixture()
def own_s3(tmp_path):
    """A moto server of this test's own (so it can be frozen), with its request log."""
    (port,) = free_ports(1)
    log = open(tmp_path / "moto.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield {"endpoint": f"http://127.0.0.1:{port}", "process": process, "log": tmp_path / "moto.log"}
    os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)
    log.close()


def _upload(endpoint: str, bucket: str, local: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=bucket)
    for directory, _, names in os.walk(local):
        for name in names:
            path = os.path.join(directory, name)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")


def _job_env(endpoint: str, ray_tmp: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="AKIATESTING", AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1",
               MGA_RAY_CPUS="4", PYTHONPATH=REPO, RAY_TMPDIR=ray_tmp, **extra)
    return env


@pytest.fixture()
def ray_tmp():
    """A short Ray temp dir of the job's own (Unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="mga-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ray_started(ray_tmp: str) -> bool:
    """Whether the job's own Ray instance (in `ray_tmp`) has begun to start."""
    root = os.path.join(ray_tmp, "ray")
    return os.path.isdir(root) and any(name.startswith("session_") and name != "session_latest" for name in os.listdir(root))


def _requests_waiting(port: int) -> bool:
    """Whether a request waits on the endpoint at `port`: a connection it has not accepted, or bytes it has not read."""
    with open("/proc/net/tcp") as sockets:
        for line in sockets.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and int(fields[4].split(":")[1], 16):
                return True
    return False


def _embed_through_outage(base, own_s3, ray_tmp, out: str, freeze_s: float | None, **env_extra) -> dict:
    """`mga embed` reading its catalog from `own_s3`, which is frozen (SIGSTOP) once the driver has opened
    the catalog (its Delta log) and starts Ray: the driver's read of the catalog's files meets the frozen
    endpoint, for `freeze_s` seconds from the moment a request waits on it, or for good (None)."""
    _upload(own_s3["endpoint"], "shop", base["catalog"], "catalog")
    env = _job_env(own_s3["endpoint"], ray_tmp, **env_extra)
    port = int(own_s3["endpoint"].rsplit(":", 1)[1])
    started = time.time()
    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "embed", "--model", base["model"], "--catalog", "s3://shop/catalog", "--out", out, "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True,
    )
    output: dict = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), job.communicate())))
    reader.start()
    frozen_at = None
    visible_while_frozen = []
    try:
        deadline = time.time() + 300
        while job.poll() is None and time.time() < deadline and frozen_at is None:
            if _ray_started(ray_tmp):
                # The driver has read the catalog's log (deltalake) and starts Ray; what it reads
                # next, the catalog's files, meets a frozen endpoint.
                os.kill(own_s3["process"].pid, signal.SIGSTOP)
                while job.poll() is None and not _requests_waiting(port) and time.time() < deadline:
                    time.sleep(0.02)
                if not _requests_waiting(port):
                    break
                frozen_at = time.time()  # a request of the job waits on the frozen endpoint
                if freeze_s is not None:
                    time.sleep(freeze_s)
                    visible_while_frozen.append(os.path.exists(os.path.join(out, "_delta_log")))
                    os.kill(own_s3["process"].pid, signal.SIGCONT)
            time.sleep(0.05)
        reader.join(timeout=300)
    finally:
        os.kill(own_s3["process"].pid, signal.SIGCONT)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert frozen_at is not None, "no request of the job met the frozen endpoint: " + output.get("stderr", "")[-3000:]
    assert visible_while_frozen in ([], [False])  # nothing committed while stuck
    return {"code": job.returncode, "frozen_at": frozen_at, "ended": time.time(), "started": started, **output}


def _secret_leaks(own_s3, output: dict, directories: list[str]) -> tuple[list[str], int]:
    """Where the secret key appears: stdout/stderr, every file under `directories`, every object on the endpoint."""
    import boto3

    leaks = [name for name in ("stdout", "stderr") if SECRET in output.get(name, "")]
    scanned = 0
    for directory in directories:
        for folder, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                scanned += 1
                with open(path, "rb") as handle:
                    if SECRET.encode() in handle.read():
                        leaks.append(path)
    client = boto3.client("s3", endpoint_url=own_s3["endpoint"], region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="k")
    for item in client.list_objects_v2(Bucket="shop").get("Contents", []):
        scanned += 1
        if SECRET.encode() in client.get_object(Bucket="shop", Key=item["Key"])["Body"].read():
            leaks.append(f"s3://shop/{item['Key']}")
    return leaks, scanned


@pytest.mark.ray
@pytest.mark.outage
@pytest.mark.timeout(600)
def test_s3_outage_during_embed_is_waited_out_and_leaks_no_secret(base, own_s3, ray_tmp, tmp_path):
    """The S3 endpoint freezes for 8 s mid-read: the job waits it out (request timeout 60 s,
    5 attempts). It runs with a distinctive secret key, which must appear in no output, log or report."""
    out = str(tmp_path / "features")
    run = _embed_through_outage(base, own_s3, ray_tmp, out, freeze_s=8)
    assert run["code"] == 0, run.get("stderr", "")[-3000:]
    committed = open_table(resolve(out))
    table = read_table(committed)
    assert table.num_rows == IMAGES and committed.version == 0 and committed.info["catalog"] == "s3://shop/catalog"
    assert_matches_reference(table, base["reference"])
    leaks, scanned = _secret_leaks(own_s3, run, [out, ray_tmp])
    print(f"\nfault: S3 endpoint frozen 8 s during the catalog read; embed finished in {run['ended'] - run['started']:.0f} s with "
          f"{table.num_rows}/{IMAGES} rows, features equal to an undisturbed run; secret searched in {scanned} files + stdout/stderr: "
          f"{len(leaks)} leaks")
    assert not leaks, f"the secret key was written to: {leaks[:5]}"


@pytest.mark.ray
@pytest.mark.outage
@pytest.mark.timeout(600)
def test_s3_endpoint_down_for_good_is_a_bounded_one_line_error(base, own_s3, ray_tmp, tmp_path):
    """The endpoint freezes and never comes back: with 3 s request timeouts and 2 attempts the
    job gives up within a bound, says so in one line naming the URI, and commits nothing (and leaves no run files)."""
    out = str(tmp_path / "features")
    run = _embed_through_outage(base, own_s3, ray_tmp, out, freeze_s=None, MGA_S3_REQUEST_TIMEOUT="3", MGA_S3_CONNECT_TIMEOUT="2", MGA_S3_MAX_ATTEMPTS="2")
    waited = run["ended"] - run["frozen_at"]
    errors = [line for line in run["stderr"].splitlines() if line.startswith("mga: error:")]
    assert run["code"] == 2 and "Traceback" not in run["stderr"] and len(errors) == 1, run["stderr"][-3000:]
    assert "s3://shop/catalog" in errors[0] and SECRET not in run["stderr"] + run["stdout"]
    for table in (out, companion(resolve(out), "rejects").path):
        assert not os.path.exists(os.path.join(table, "_delta_log")), f"{table} was committed"
        with pytest.raises(TableNotFound):
            open_table(resolve(table))
    assert not os.path.isdir(out) or not [n for n in os.listdir(out) if n.startswith("run-")]  # no run of it left behind
    leaks, scanned = _secret_leaks(own_s3, run, [out, ray_tmp])
    print(f"\nfault: S3 endpoint down for good during the catalog read: exit 2 after {waited:.0f} s, nothing committed, "
          f"{len(leaks)} secret leaks in {scanned} files; the error: {errors[0][:300]}")
    assert waited < 120 and not leaks


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_file_gone_under_a_ray_job_is_one_line_naming_it(base, tmp_path, capfd):
    """A file deleted under its table (vacuumed, lost): a Ray Data read task, or a Ray task, fails, and the
    failure is told once, as a StorageError naming the file; Ray Data's tracebacks of the task stay
    in its log file, off the console."""
    from pipelines.catalog import open_catalog, table_dataset
    from pipelines.embed.merge import plan_incremental
    from pipelines.resources import execute

    catalog = str(tmp_path / "catalog")
    shutil.copytree(base["catalog"], catalog)
    snapshot = open_catalog(catalog)
    gone = snapshot.files.column("path")[1].as_py()
    os.remove(gone)
    capfd.readouterr()
    with pytest.raises(StorageError) as error:
        execute(lambda: table_dataset(snapshot, ["image_id"]).materialize(), catalog, str(tmp_path / "out"))
    message = str(error.value)
    assert message.startswith(f"reading {catalog} / writing {tmp_path / 'out'} failed") and gone in message, message
    assert len(message.splitlines()) == 1 and "Failed to apply UDF" not in message, message
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    # Ray tasks as well: embed --incremental's plan, a file of the stored features gone.
    features = str(tmp_path / "features")
    shutil.copytree(base["features"], features)
    stored = open_table(resolve(features))
    gone = stored.files.column("path")[0].as_py()
    os.remove(gone)
    with pytest.raises(StorageError, match=re.escape(gone)):
        execute(lambda: plan_incremental(stored, open_catalog(base["catalog"]), base["model_id"]), base["catalog"], features)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_search_killed_midway_then_rerun_gives_identical_rankings(base, tmp_path):
    out = str(tmp_path / "rankings")
    positives = companion(resolve(out), "positives").path
    order = [("query_id", "ascending"), ("rank", "ascending")]
    # The table's previous version: an uninterrupted search, chunked and blocked differently.
    first = search.run(base["features"], out, rerank_top=4, query_chunk=1000, block_rows=3)
    previous = open_table(resolve(out))
    rows_before, positives_before = rows_of(out).sort_by(order), rows_of(positives).sort_by([("query_id", "ascending"), ("gallery_id", "ascending")])
    old_runs = {table: _run_dirs(table) for table in (out, positives)}
    # The job joins the test session's Ray instance as a second driver, as `ray job submit`
    # would run it on a cluster; SIGKILLing the driver makes Ray reap its actors and tasks.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.search", "--features", base["features"], "--out", out, "--rerank-top", "4", "--query-chunk", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True,
    )
    own_job = ray.get_runtime_context().get_job_id()
    killed_at, scanned = None, False
    try:
        deadline = time.time() + 300
        while job.poll() is None and time.time() < deadline:
            scanned = scanned or any("GalleryScanner" in a["ActorClassName"] and a["State"] == "ALIVE" and a["JobID"] != own_job
                                     for a in ray._private.state.actors().values())
            if scanned and _new_files(out, old_runs[out]):  # its gallery scan ran and its first chunk's rankings are on disk: kill the driver
                killed_at = time.time()
                break
            time.sleep(0.02)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert killed_at, "the search subprocess never wrote a rankings file"
    killed_with = len(_new_files(out, old_runs[out]))
    orphans = _run_dirs(out) - old_runs[out]
    # Killed with rankings files of its own on disk: the table is still at its previous version,
    # with the same content (and the same positives); the killed run's files are listed by no version.
    current = open_table(resolve(out))
    assert current.version == previous.version and current.info == previous.info and set(current.paths()) == set(previous.paths())
    assert rows_of(out).sort_by(order).equals(rows_before)
    assert open_table(resolve(positives)).version == previous.info["positives"]["version"]
    assert not set(current.paths()) & set(_new_files(out, old_runs[out]))

    # One chunk (the killed run had six, the first run other blocks): two scans, not six.
    again = search.run(base["features"], out, rerank_top=4)
    rerun = rows_of(out).sort_by(order)
    assert again["version"] == previous.version + 1 and rerun.equals(rows_before)
    assert rows_of(positives).sort_by([("query_id", "ascending"), ("gallery_id", "ascending")]).equals(positives_before)
    pairs = rerun.select(["query_id", "gallery_id"]).to_pylist()
    assert len(pairs) == len({(p["query_id"], p["gallery_id"]) for p in pairs}) == again["rows"] == first["rows"]
    # The previous version stays readable by its number (time travel), from its own files.
    assert rows_of(out, previous.version).sort_by(order).equals(rows_before)
    assert not set(open_table(resolve(out), previous.version).paths()) & set(open_table(resolve(out)).paths())
    # Vacuum with no retention: the killed run's orphan files and the previous version's go, the
    # current version stays readable as it is.
    deleted = vacuum(resolve(out), retain_hours=0) + vacuum(resolve(positives), retain_hours=0)
    for table in (out, positives):  # what is left on disk is exactly the current version's files
        assert sorted(_new_files(table, set())) == sorted(open_table(resolve(table)).paths())
    assert orphans and not _files_under(out, orphans) and not orphans & _run_dirs(out)  # the killed run's directory is gone
    assert rows_of(out).sort_by(order).equals(rerun)
    with pytest.raises(StorageError):  # the previous version's files are gone with it
        rows_of(out, previous.version)
    print(f"\nfault: search driver SIGKILLed while its gallery scan ran ({killed_with} rankings file(s) of its run written): "
          f"the table stayed at version {previous.version}, unchanged; re-run: version {again['version']}, {rerun.num_rows} rows identical "
          f"to an uninterrupted search, 0 duplicates; vacuum(retain 0) deleted {len(deleted)} files, the orphan run among them")


def _run_dirs(table: str) -> set[str]:
    return {name for name in os.listdir(table) if name.startswith("run-")} if os.path.isdir(table) else set()


def _files_under(table: str, runs: set[str]) -> list[str]:
    return [os.path.join(folder, name) for run in runs for folder, _, names in os.walk(os.path.join(table, run)) for name in names]


def _new_files(table: str, old_runs: set[str]) -> list[str]:
    """The Parquet files in the run directories of `table` other than `old_runs`."""
    return [path for path in _files_under(table, _run_dirs(table) - old_runs) if path.endswith(".parquet")]


# ------------------------------------------------------------------------------ bad arguments


_DRIVER = """
import contextlib, io, json, sys
from pipelines import cli
results = {}
for name, argv in json.loads(%r).items():
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            import traceback
            traceback.print_exc(file=err)
            code = "uncaught"
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _mga(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or dict(os.environ, PYTHONPATH=REPO), cwd=REPO)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_bad_arguments_are_one_line_errors_and_write_nothing(base, tmp_path):
    tampered = str(tmp_path / "tampered")
    shutil.copytree(base["model"], tampered)
    config = json.loads(open(os.path.join(tampered, CONFIG)).read())
    config["model"]["alpha"] = 0.9
    open(os.path.join(tampered, CONFIG), "w").write(json.dumps(config))
    hostile = str(tmp_path / "hostile")
    _hostile_artifact(hostile, tmp_path / "PWNED")
    no_credentials = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    no_credentials.update(PYTHONPATH=REPO, AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    out = lambda name: str(tmp_path / "out" / name)  # noqa: E731
    cat, model, feats = base["catalog"], base["model"], base["features"]
    cases = {  # name: (argv, env, what the one line must name)
        "missing catalog": (["embed", "--model", model, "--catalog", str(tmp_path / "nowhere"), "--out", out("a")], None, [str(tmp_path / "nowhere"), "not a Delta table"]),
        "missing model": (["embed", "--model", str(tmp_path / "no-model"), "--catalog", cat, "--out", out("b")], None, [str(tmp_path / "no-model"), "not a model artifact"]),
        "missing manifest csv": (["prepare", "manifest", "--manifest", str(tmp_path / "none.csv"), "--out", out("c")], None, [str(tmp_path / "none.csv")]),
        "unknown config key": (["train", "--config", "tiny", "--set", "model.colour=red", "--catalog", cat, "--output", out("d")], None, ["model.colour"]),
        "negative batch size": (["embed", "--model", model, "--catalog", cat, "--out", out("e"), "--batch-size", "-4"], None, ["--batch-size", "-4"]),
        "negative depth": (["search", "--features", feats, "--out", out("f"), "--depth", "-1"], None, ["--depth", "-1"]),
        "negative shard size": (["prepare", "manifest", "--manifest", str(tmp_path / "none.csv"), "--out", out("g"), "--shard-mb", "-1"], None, ["--shard-mb"]),
        "negative synth groups": (["synth", "--out", out("h"), "--groups", "-2"], None, ["groups"]),
        "s3 without credentials": (["embed", "--model", model, "--catalog", "s3://no-such-bucket/catalog", "--out", out("i")], no_credentials, ["s3://no-such-bucket/catalog", "credentials"]),
        "artifact hash mismatch": (["embed", "--model", tampered, "--catalog", cat, "--out", out("j")], None, [tampered, "model_id mismatch"]),
        "pickle in the weights": (["search", "--features", feats, "--out", out("k"), "--model", hostile], None, [hostile, "not a loadable model artifact"]),
    }
    # Three cases as processes of their own (`python -m pipelines.cli ...`); the rest through the
    # same entry point (pipelines.cli.main: argparse, run_command, sys.exit) in ONE more process,
    # one case after another: every CLI process pays ~6 s of imports on this machine (timm).
    alone = ("missing catalog", "s3 without credentials", "pickle in the weights")
    running = {name: _mga(cases[name][0], cases[name][1]) for name in alone}
    batch = {name: argv for name, (argv, env, _) in cases.items() if name not in alone}
    driver = _DRIVER % json.dumps(batch)
    batched = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, timeout=300)
    assert batched.returncode == 0, batched.stderr[-3000:]
    results = {name: (code, stderr) for name, (code, stderr) in json.loads(batched.stdout.splitlines()[-1]).items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr)
    lines = {}
    for name, (code, stderr) in results.items():
        named = cases[name][2]
        errors = [line for line in stderr.splitlines() if line.startswith("mga: error:")]
        assert code == 2, f"{name}: exit {code}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr and len(errors) == 1, f"{name}: {stderr[-2000:]}"
        lines[name] = errors[0]
        assert all(part in errors[0] for part in named), f"{name}: {errors[0]!r} does not name {named}"
    assert not os.path.exists(tmp_path / "out"), os.listdir(tmp_path / "out")
    assert not (tmp_path / "PWNED").exists()
    print(f"\nbad arguments: {len(cases)} cases ({len(alone)} as their own processes), each exit 2 with one line, nothing written:")
    for name, line in lines.items():
        print(f"  {name}: {line[:220]}")


# ------------------------------------------------------------------------------ security


def _hostile_artifact(uri: str, marker) -> None:
    """An artifact whose weights are a pickle that would run code, with a matching model_id."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"weights": Payload()}, buffer)
    weights = buffer.getvalue()
    config = json.dumps({"model": MODEL.model_dump(mode="json"), "image_size": 64}).encode()
    index = json.dumps({"model_id": artifact_id(weights, config), "files": [WEIGHTS, CONFIG]}).encode()
    write_artifact(uri, {WEIGHTS: weights, CONFIG: config, INDEX: index})


@pytest.mark.ray
def test_artifacts_load_without_unpickling(base, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an artifact load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, model_id, config = unpack_artifact(read_artifact_files(base["model"]), where=base["model"])
    assert model_id == base["model_id"] and config["image_size"] == 64
    marker = tmp_path / "PWNED"
    _hostile_artifact(str(tmp_path / "hostile"), marker)
    with pytest.raises(Exception) as error:
        load_artifact(read_artifact_files(str(tmp_path / "hostile")), str(tmp_path / "hostile"))
    assert "not a loadable model artifact" in str(error.value) and not marker.exists()


@pytest.mark.timeout(300)
def test_table_readers_never_see_a_missing_or_partial_table(tmp_path):
    # A run directory with data but no commit is not a table.
    location = resolve(str(tmp_path / "t"))
    schema = pa.schema([("x", pa.int64())])
    writer = TableWriter(location)
    write_parquet(writer.file("part-0.parquet"), pa.table({"x": [1, 2]}))
    with pytest.raises(TableNotFound, match="not a Delta table"):
        open_table(location)
    writer.commit(schema, {"table": "t"})
    assert read_table(open_table(location)).num_rows == 2
    # A second writer's files are invisible until its commit, and a writer that fails deletes them.
    pending = TableWriter(location)
    write_parquet(pending.file("part-0.parquet"), pa.table({"x": [3]}))
    assert open_table(location).version == 0 and read_table(open_table(location)).column("x").to_pylist() == [1, 2]
    with pytest.raises(RuntimeError, match="boom"):
        with TableWriter(location) as failing:
            write_parquet(failing.file("part-0.parquet"), pa.table({"x": [4]}))
            raise RuntimeError("boom")
    assert not os.path.exists(failing.run.path) and os.path.exists(pending.run.path)
    pending.commit(schema, {"table": "t"})
    assert open_table(location).version == 1 and read_table(open_table(location)).column("x").to_pylist() == [3]
    assert read_table(open_table(location, 0)).column("x").to_pylist() == [1, 2]
