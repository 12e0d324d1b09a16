"""The run directory of `mga train` (run.storage_path/run.name): what a run was trained with, a
fresh start, and storage that every node of a cluster can reach.

A run's checkpoints hold weights trained under one setup: resuming them under another, or
re-exporting them under another config, would mix two runs. So a run's first start writes its
fingerprint, `mga-run.json`, beside Ray Train's checkpoints (Ray Train leaves other files in
its run directory alone): every config value that shapes the weights (model, loss, data,
optim except `epochs`, the initial weights and seed, the worker count when the learning rate
follows it), a digest of the catalog's train rows and the class count. Every later start
compares before Ray Train starts and refuses a difference in one line naming it;
`run.restart=true` deletes the run's checkpoints and starts afresh. `optim.epochs` is left
out so that raising it continues a run. The catalog counts by content (ids, items, domains,
boxes and image hashes of the train rows), not by Delta version: a rewrite with the same rows
(`mga demo` re-synthesises its catalog each time) is the same catalog, and a copy elsewhere
too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from mga.errors import InputError
from pipelines.catalog import open_catalog
from pipelines.config import TrainConfig
from pipelines.nodes import on_every_node
from pipelines.runtime import cluster_address, init_ray
from pipelines.storage import Location, StorageError, resolve
from pipelines.tables import read_table

RUN_FILE = "mga-run.json"
# Config values that do not shape the weights: the catalog counts by its rows, `max_pixels`
# only guards the decoder, and a higher `epochs` continues the run.
NOT_FINGERPRINTED = {"data.catalog", "data.max_pixels", "optim.epochs"}
CATALOG_KEY = "catalog train rows"


def catalog_rows(uri: str) -> dict[str, Any]:
    """The catalog's current version and a digest of its train rows (ids only, no image bytes)."""
    snapshot = open_catalog(uri)
    columns = ["image_id", "item_id", "domain", "bbox", "sha256"]
    table = read_table(snapshot, columns, pc.field("split") == "train", ("split", ["train"])).sort_by("image_id").combine_chunks()
    # The Arrow IPC bytes of the sorted columns: no Python object per row on the driver.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest = hashlib.sha256(sink.getvalue()).hexdigest()
    return {"uri": uri, "version": snapshot.version, "images": table.num_rows, "digest": digest}


def fingerprint(config: TrainConfig, catalog: dict[str, Any], classes: int) -> dict[str, Any]:
    """Every value that shapes a run's weights, by dotted name (JSON values)."""
    sections = {"model": config.model, "loss": config.loss, "data": config.data, "optim": config.optim}
    values = {f"{name}.{key}": value for name, section in sections.items() for key, value in section.model_dump(mode="json").items()}
    values = {key: value for key, value in values.items() if key not in NOT_FINGERPRINTED}
    values.update({"run.seed": config.run.seed, "run.pretrained": config.run.pretrained, "run.weights_file": config.run.weights_file})
    if config.optim.lr_scaling == "linear":
        values["scaling.num_workers"] = config.scaling.num_workers  # the learning rate follows it
    values[CATALOG_KEY] = catalog["digest"]
    values["train classes"] = classes
    return values


def _shown(key: str, value: Any, catalog: dict[str, Any] | None) -> str:
    if key == CATALOG_KEY:
        where = f" of {catalog['uri']} version {catalog['version']}, {catalog['images']} images" if catalog else ""
        return f"{key} {str(value)[:12]}{where}"
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def difference(stored: dict[str, Any], current: dict[str, Any], stored_catalog: dict | None, catalog: dict) -> str | None:
    """`was trained with A; this command asks for B`, naming up to 3 differing values, or None."""
    keys = [key for key in {**stored, **current} if stored.get(key, "(not recorded)") != current.get(key, "(not recorded)")]
    if not keys:
        return None
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    was = ", ".join(_shown(key, stored.get(key, "(not recorded)"), stored_catalog) for key in keys[:3])
    asks = ", ".join(_shown(key, current.get(key, "(not recorded)"), catalog) for key in keys[:3])
    return f"was trained with {was}{more}; this command asks for {asks}"


def check_same_run(config: TrainConfig, run: Location, current: dict[str, Any], catalog: dict[str, Any]) -> None:
    """Refuse to resume or re-export the checkpoints at `run` under another fingerprint (InputError, one line)."""
    what = f"run {config.run.name} in {run.uri}"
    fix = "use another run.name, or --set run.restart=true to start it afresh"
    record = run.join(RUN_FILE)
    if not record.exists():
        raise InputError(f"{what} has checkpoints but no {RUN_FILE} saying what it was trained with: {fix}")
    stored = json.loads(record.read_bytes())
    if (problem := difference(stored["fingerprint"], current, stored.get("catalog"), catalog)) is not None:
        raise InputError(f"{what} {problem}: {fix}")


def start_run(config: TrainConfig, run: Location, current: dict[str, Any], catalog: dict[str, Any], restart: bool) -> None:
    """Record the fingerprint of a new run at `run`; with `restart`, delete the earlier run there first."""
    if restart:
        try:
            run.fs.delete_dir(run.path)
        except OSError as error:
            raise StorageError(f"run.restart: cannot delete {run.uri}: {error}") from error
        print(f"[train] run.restart: deleted the checkpoints of run {config.run.name} in {run.uri}; starting afresh", flush=True)
    record = {"run": config.run.name, "fingerprint": current, "catalog": catalog, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run.join(RUN_FILE).write_bytes(json.dumps(record, indent=1).encode())


# --------------------------------------------------------------------------- storage on a cluster


def run_storage(config: TrainConfig) -> Location:
    """Where the run's checkpoints go: run.storage_path, or on a local Ray a temp dir.

    On a cluster a temp dir is on the driver's disk only: workers on other nodes cannot write
    their checkpoints there, and a re-run (a new temp dir) never finds them to resume.
    """
    if config.run.storage_path:
        return resolve(config.run.storage_path)
    if address := cluster_address():
        raise InputError(
            f"run.storage_path: training on the Ray cluster at {address} needs checkpoint storage that every node reaches, "
            "and without --storage-path checkpoints would go to a temp dir on this machine that other nodes cannot see "
            "(and a re-run cannot resume from): give --storage-path s3://... or a path every node mounts"
        )
    return resolve(tempfile.mkdtemp(prefix="mga-runs-"))


@ray.remote(num_cpus=0)
def _exists(path: str) -> bool:
    return os.path.exists(path)


def nodes_without(path: str, timeout_s: float = 120) -> list[str]:
    """The addresses of the alive Ray nodes on whose disk `path` does not exist (nodes that do not answer in time, or fail the probe, are left out)."""
    answered, _ = on_every_node(_exists, path, timeout_s=timeout_s)
    return sorted(node["NodeManagerAddress"] for node, exists in answered if exists is False)


def check_cluster_storage(storage: Location) -> None:
    """On a Ray cluster, refuse a local storage path that some node cannot see (InputError, one line).

    A path every node mounts (NFS, a shared volume) passes; s3:// always does. Checked on the
    nodes alive now: a node an autoscaler adds later is not.
    """
    address = cluster_address()
    if not address or storage.is_s3:
        return
    init_ray()
    marker = storage.join(f".mga-visible-{uuid.uuid4().hex}")
    marker.write_bytes(b"")
    try:
        missing = nodes_without(marker.path)
    finally:
        storage.fs.delete_file(marker.path)
    if missing:
        raise InputError(
            f"run.storage_path: {storage.uri} is on this machine's disk, not visible from {len(missing)} node(s) of the Ray "
            f"cluster at {address} ({', '.join(missing[:3])}), where Ray Train workers could not write checkpoints: "
            "give an s3:// URI or a path every node mounts"
        )
