"""Search and evaluate at 250k and 1M gallery images: wall time and peak memory. Target: 1M <= 1.2x 250k.

Features tables in today's format with the paper's sizes (D 512, 3 layers x M 8 x d 128,
tokens float16: 8 KB per image), random unit vectors, 1,000 queries whose items have 2-5
gallery images each, and a random-init artifact with the paper's config. Each command runs
as a fresh process with the CLI's defaults (its own local Ray). Memory is sampled every
0.2 s two ways: PSS summed over the whole process tree (driver, raylet, GCS, workers,
actors; shared object-store pages counted once) and the machine's MemTotal - MemAvailable
above what it was before the command (which also sees /dev/shm and the page cache kept
dirty by the writers).

Usage: python -m bench.search_scale [--sizes 250000,1000000] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa

from bench.common import machine, tree_pss, write_random_artifact
from mga.config import ModelConfig
from pipelines.schemas import features_schema, vector_column
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter

PAPER = ModelConfig(backbone="tf_efficientnetv2_s", layers=(2, 3, 4), global_dim=512, token_dim=128, num_tokens=8)
QUERIES = 1000
FILE_ROWS = 50_000


def unit_rows(rng: np.random.Generator, rows: int, groups: int, width: int, dtype) -> np.ndarray:
    values = rng.random((rows, groups, width), dtype=np.float32) - 0.5
    values /= np.linalg.norm(values, axis=2, keepdims=True)
    return values.astype(dtype).reshape(rows, groups * width)


def write_features(uri: str, model_uri: str, model_id: str, gallery: int, seed: int = 0) -> None:
    """`gallery` + QUERIES rows, FILE_ROWS per file; items of 2-5 gallery images, queries of gallery items."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, gallery)
    items = np.repeat(np.arange(len(sizes)), sizes)[:gallery]
    query_items = rng.choice(items, QUERIES, replace=False)
    all_items = np.concatenate([items, query_items])
    schema = features_schema(PAPER.global_dim, [PAPER.num_tokens * PAPER.token_dim] * len(PAPER.layers), "float16")
    with TableWriter(resolve(uri)) as writer:  # a failure deletes the run's files
        total = gallery + QUERIES
        for part, start in enumerate(range(0, total, FILE_ROWS)):
            stop = min(start + FILE_ROWS, total)
            rows = stop - start
            index = np.arange(start, stop)
            columns = {
                "image_id": pa.array([f"img-{i:08d}" for i in index]),
                "item_id": pa.array([f"item-{i:08d}" for i in all_items[index]]),
                "split": pa.array(np.where(index < gallery, "gallery", "query")),
                "domain": pa.array(["shop"] * rows),
                "category": pa.array(["c"] * rows),
                "sha256": pa.array(["0" * 64] * rows),
                "model_id": pa.array([model_id] * rows),
                "global": pa.FixedSizeListArray.from_arrays(pa.array(unit_rows(rng, rows, 1, PAPER.global_dim, np.float32).reshape(-1)), PAPER.global_dim),
            }
            for layer in range(len(PAPER.layers)):
                tokens = unit_rows(rng, rows, PAPER.num_tokens, PAPER.token_dim, np.float16)
                columns[f"tokens_{layer}"] = vector_column(tokens, schema.field(f"tokens_{layer}").type)  # binary halves
            columns["embedded_at"] = pa.array(np.zeros(rows, "datetime64[us]"), pa.timestamp("us", tz="UTC"))
            write_parquet(writer.file(f"part-{part:05d}.parquet"), pa.table(columns, schema=schema))
        writer.commit(schema, {"table": "features", "model_id": model_id, "model": model_uri, "global_dim": PAPER.global_dim,
                               "num_tokens": PAPER.num_tokens, "token_dim": PAPER.token_dim, "layers": list(PAPER.layers), "token_dtype": "float16"})


def in_use() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def measure(command: list[str]) -> dict[str, float]:
    """Run `command`; its wall time, peak tree PSS and peak rise of MemTotal - MemAvailable."""
    baseline = in_use()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"pss": 0, "in_use": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks["pss"] = max(peaks["pss"], tree_pss(process.pid))
            peaks["in_use"] = max(peaks["in_use"], in_use() - baseline)
            time.sleep(0.2)

    started = time.time()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}: {errors[-2000:]}")
    return {"wall": time.time() - started, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the tables (they take 8 KB per image)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-search-scale-")
    model_uri = f"{workdir}/model"
    write_random_artifact(model_uri, PAPER, 224)
    from pipelines.model_store import read_artifact_files
    import json

    model_id = json.loads(read_artifact_files(model_uri)["artifact.json"])["model_id"]
    results = []
    for size in sizes:
        features = f"{workdir}/features-{size}"
        started = time.time()
        write_features(features, model_uri, model_id, size)
        print(f"wrote {size} gallery images in {time.time() - started:.0f} s", flush=True)
        search = measure([sys.executable, "-m", "pipelines.search", "--features", features, "--out", f"{workdir}/rankings-{size}"])
        print(f"search {size}: {search}", flush=True)
        evaluate = measure([sys.executable, "-m", "pipelines.evaluate", "--rankings", f"{workdir}/rankings-{size}", "--out", f"{workdir}/report-{size}"])
        print(f"evaluate {size}: {evaluate}", flush=True)
        results.append((size, search, evaluate))
        if not args.keep:
            shutil.rmtree(features, ignore_errors=True)
    print(f"\nmachine: {machine()}")
    print("| gallery | job | wall s | peak PSS, process tree | peak rise of MemTotal - MemAvailable |")
    print("|---|---|---|---|---|")
    for size, search, evaluate in results:
        for name, figures in (("search", search), ("evaluate", evaluate)):
            print(f"| {size:,} | {name} | {figures['wall']:.0f} | {figures['pss'] / 2**30:.2f} GiB | {figures['in_use'] / 2**30:.2f} GiB |")
    if len(results) == 2:
        (small, s_search, s_eval), (large, l_search, l_eval) = results
        for name, a, b in (("search", s_search, l_search), ("evaluate", s_eval, l_eval)):
            print(f"| {large:,} / {small:,} | {name} | {b['wall'] / a['wall']:.2f} | {b['pss'] / a['pss']:.2f} | {b['in_use'] / max(a['in_use'], 1):.2f} |")


if __name__ == "__main__":
    main()
