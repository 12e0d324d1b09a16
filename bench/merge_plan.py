"""`mga embed --incremental`'s plan (pipelines.embed.merge.plan_incremental) on a large catalog:
the catalog's and the stored keys joined a hash bucket at a time in Ray tasks (JOIN_ROWS rows a
bucket), against all in one task (one bucket: what one node held before the join was split).

Key-only tables of N rows each (image_id, sha256, item, split, domain, category; the features
also model_id), in files of 50,000 rows, a row group per 64 rows, as prepare and embed write
them; the catalog has one image changed, one new and two deleted. Wall time, the driver's peak
RSS rise, and the peak PSS of the whole process tree (driver, object store, workers) sampled
every 0.5 s. On one machine the tree holds every bucket's task at once (the sum is what one node
held before); on a cluster the buckets' tasks and the key parts spread over the nodes.

Usage: python -m bench.merge_plan [--rows 2000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

from bench.common import machine, tree_pss
from pipelines.embed import merge
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table

FILE_ROWS, GROUP_ROWS = 50_000, 64


def key_rows(ids: np.ndarray, sha: str, model_id: str | None) -> pa.Table:
    count = len(ids)
    columns = {
        "image_id": pa.array([f"img-{i:09d}" for i in ids]), "item_id": pa.array([f"item-{i // 4:08d}" for i in ids]),
        "split": pa.array(["gallery"] * count), "domain": pa.array(["shop"] * count), "category": pa.array(["top"] * count),
        "sha256": pa.array([sha * 64] * count),
    }
    return pa.table({**columns, "model_id": pa.array([model_id] * count)} if model_id else columns)


def write_keys(uri: str, rows: int, model_id: str | None, drop: np.ndarray) -> None:
    with TableWriter(resolve(uri)) as writer:
        for start in range(0, rows, FILE_ROWS):
            ids = np.arange(start, min(rows, start + FILE_ROWS))
            table = key_rows(ids[~np.isin(ids, drop)], "0", model_id)
            if model_id is None and start == 0:  # the catalog: its first image changed, one new image
                table = pa.concat_tables([table.slice(1), key_rows(ids[:1], "1", None), key_rows(np.array([rows]), "0", None)])
            write_parquet(writer.file(f"part-{start // FILE_ROWS:05d}.parquet"), table, row_group_size=GROUP_ROWS)
        writer.commit(key_rows(np.arange(0), "0", model_id).schema, {"table": "keys"})


def measure(features: str, catalog: str) -> dict[str, float]:
    peak = {"tree": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], tree_pss(os.getpid()))
            time.sleep(0.5)

    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * resource.getpagesize()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    plan = merge.plan_incremental(open_table(resolve(features)), open_table(resolve(catalog)), "m1")
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    assert plan.counts == {"new": 1, "changed": 1, "unchanged": plan.counts["unchanged"], "deleted": 2}, plan.counts
    return {"wall": wall, "driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, **peak}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-merge-plan-")
    write_keys(f"{workdir}/catalog", args.rows, None, np.array([7, args.rows - 3]))
    write_keys(f"{workdir}/features", args.rows, "m1", np.array([], int))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"machine: {machine()}\n{args.rows:,} catalog rows against {args.rows:,} stored\n")
    print("| join | wall s | driver peak RSS rise | process tree peak PSS |\n|---|---|---|---|")
    default = merge.JOIN_ROWS
    for _ in range(2):  # alternating, twice
        for name, join_rows in ((f"buckets of {default:,} rows", default), ("one bucket", 10 * (2 * args.rows + 2))):
            merge.JOIN_ROWS = join_rows
            result = measure(f"{workdir}/features", f"{workdir}/catalog")
            print(f"| {name} | {result['wall']:.1f} | {result['driver'] / 2**20:.0f} MiB | {result['tree'] / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
