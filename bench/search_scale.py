"""Search and evaluate at scale: wall time and peak memory as the gallery grows, or as the queries grow.

Two sweeps, each as fresh processes with the CLI's defaults (their own local Ray):

- `--sizes 250000,1000000` (default): galleries of those sizes with 1,000 queries in the same
  table. Target: 1M <= 1.2x 250k.
- `--gallery 250000 --queries 10000,100000`: one gallery table, and queries in tables of their
  own (`mga search --queries`), labelled, of gallery items. Target: driver memory stays flat as
  the queries grow (the queries are streamed a chunk at a time): peak <= 1.2x.

Features tables are in today's format with the paper's sizes (D 512, 3 layers x M 8 x d 128,
tokens float16: 8 KB per image), random unit vectors, items of 2-5 gallery images, and a
random-init artifact with the paper's config. Memory is sampled every 0.2 s two ways: PSS
summed over the whole process tree (driver, raylet, GCS, workers, actors; shared object-store
pages counted once) and the machine's MemTotal - MemAvailable above what it was before the
command (which also sees /dev/shm and the page cache kept dirty by the writers); for the
queries sweep also the driver's own peak RSS.

Usage: python -m bench.search_scale [--sizes 250000,1000000 | --gallery N --queries A,B] [--workdir DIR] [--keep]
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
from pipelines.token_ranges import parquet_options
from pipelines.tables import TableWriter

PAPER = ModelConfig(backbone="tf_efficientnetv2_s", layers=(2, 3, 4), global_dim=512, token_dim=128, num_tokens=8)
QUERIES = 1000
FILE_ROWS = 50_000


def unit_rows(rng: np.random.Generator, rows: int, groups: int, width: int, dtype) -> np.ndarray:
    values = rng.random((rows, groups, width), dtype=np.float32) - 0.5
    values /= np.linalg.norm(values, axis=2, keepdims=True)
    return values.astype(dtype).reshape(rows, groups * width)


def write_features(
    uri: str, model_uri: str, model_id: str, gallery: int, queries: int = QUERIES, seed: int = 0, with_gallery: bool = True,
    config: ModelConfig = PAPER, row_group_rows: int | None = None, ranged: bool = True,
) -> None:
    """`gallery` gallery rows (items of 2-5 images) then `queries` query rows of gallery items,
    FILE_ROWS per file (one row group, or `row_group_rows` rows a row group: `mga embed` writes
    one per batch, 64 rows by default), with `config`'s feature sizes; `with_gallery=False` writes
    only the query rows (a queries table of its own, ids `query-N`): the items are drawn from
    `seed` alike either way. `ranged=False` compresses the token columns like the others (the
    layout before pipelines.token_ranges: a search decodes whole row groups of them)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, gallery)
    items = np.repeat(np.arange(len(sizes)), sizes)[:gallery]
    query_items = rng.choice(items, queries, replace=queries > len(items))
    first, kinds = (0, np.array(["gallery"] * gallery + ["query"] * queries)) if with_gallery else (gallery, np.array(["query"] * queries))
    all_items = np.concatenate([items, query_items])
    schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), "float16")
    with TableWriter(resolve(uri)) as writer:  # a failure deletes the run's files
        total = len(kinds)
        for part, start in enumerate(range(0, total, FILE_ROWS)):
            stop = min(start + FILE_ROWS, total)
            rows = stop - start
            index = np.arange(first + start, first + stop)
            columns = {
                "image_id": pa.array([f"img-{i:08d}" if i < gallery else f"query-{i - gallery:08d}" for i in index]),
                "item_id": pa.array([f"item-{i:08d}" for i in all_items[index]]),
                "split": pa.array(kinds[start:stop]),
                "domain": pa.array(["shop"] * rows),
                "category": pa.array(["c"] * rows),
                "sha256": pa.array(["0" * 64] * rows),
                "model_id": pa.array([model_id] * rows),
                "global": pa.FixedSizeListArray.from_arrays(pa.array(unit_rows(rng, rows, 1, config.global_dim, np.float32).reshape(-1)), config.global_dim),
            }
            for layer in range(len(config.layers)):
                tokens = unit_rows(rng, rows, config.num_tokens, config.token_dim, np.float16)
                columns[f"tokens_{layer}"] = vector_column(tokens, schema.field(f"tokens_{layer}").type)  # binary halves
            columns["embedded_at"] = pa.array(np.zeros(rows, "datetime64[us]"), pa.timestamp("us", tz="UTC"))
            # As `mga embed` writes them: token columns read by byte ranges (pipelines.token_ranges).
            write_parquet(writer.file(f"part-{part:05d}.parquet"), pa.table(columns, schema=schema), row_group_size=row_group_rows,
                          **(parquet_options(schema) if ranged else {}))
        writer.commit(schema, {"table": "features", "model_id": model_id, "model": model_uri, "global_dim": config.global_dim,
                               "num_tokens": config.num_tokens, "token_dim": config.token_dim, "layers": list(config.layers), "token_dtype": "float16"})


def in_use() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


# Seconds between samples of a measured process tree's PSS (its plateaus last tens of seconds).
PSS_EVERY = 2.0


def measure(command: list[str]) -> dict[str, float]:
    """Run `command`; its wall time, peak tree PSS, the driver's own peak RSS, the peak rise of
    MemTotal - MemAvailable, and the end of what it printed (`summary`)."""
    baseline = in_use()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"pss": 0, "driver": 0, "in_use": 0}
    stop = threading.Event()

    def sample() -> None:
        driver = psutil.Process(process.pid)
        pss_due = 0.0
        while not stop.is_set():
            # The tree's PSS every PSS_EVERY s only: a sample walks every process's page tables
            # (0.1 s of CPU for a Ray search's 12 processes), a fifth of a core every 0.2 s
            # slowed the measured search (143.7 s sampled, 111-114 s alone) and not the
            # one-process peer.
            if time.monotonic() >= pss_due:
                peaks["pss"] = max(peaks["pss"], tree_pss(process.pid))
                pss_due = time.monotonic() + PSS_EVERY
            try:
                peaks["driver"] = max(peaks["driver"], driver.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            peaks["in_use"] = max(peaks["in_use"], in_use() - baseline)
            time.sleep(0.2)

    started = time.time()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, errors = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}: {errors[-2000:]}")
    return {"wall": time.time() - started, **peaks, "summary": output[-3000:]}


def _row(label: str, job: str, figures: dict[str, float]) -> str:
    return (f"| {label} | {job} | {figures['wall']:.0f} | {figures['pss'] / 2**30:.2f} GiB | {figures['driver'] / 2**30:.2f} GiB "
            f"| {figures['in_use'] / 2**30:.2f} GiB |")


def _ratio(label: str, job: str, small: dict[str, float], large: dict[str, float]) -> str:
    return (f"| {label} | {job} | {large['wall'] / small['wall']:.2f} | {large['pss'] / small['pss']:.2f} | {large['driver'] / small['driver']:.2f} "
            f"| {large['in_use'] / max(small['in_use'], 1):.2f} |")


HEADER = ["| run | job | wall s | peak PSS, process tree | peak RSS, driver | peak rise of MemTotal - MemAvailable |", "|---|---|---|---|---|---|"]


def gallery_sweep(workdir: str, model_uri: str, model_id: str, sizes: list[int], keep: bool) -> list[str]:
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
        if not keep:
            shutil.rmtree(features, ignore_errors=True)
    lines = [_row(f"{size:,} gallery", name, figures) for size, search, evaluate in results for name, figures in (("search", search), ("evaluate", evaluate))]
    if len(results) == 2:
        (small, s_search, s_eval), (large, l_search, l_eval) = results
        lines += [_ratio(f"{large:,} / {small:,}", name, a, b) for name, a, b in (("search", s_search, l_search), ("evaluate", s_eval, l_eval))]
    return lines


def queries_sweep(workdir: str, model_uri: str, model_id: str, gallery: int, counts: list[int], keep: bool) -> list[str]:
    features = f"{workdir}/gallery-{gallery}"
    started = time.time()
    # Row groups of 64 rows, as `mga embed` writes them (a reader then holds a few row groups, not a file).
    write_features(features, model_uri, model_id, gallery, queries=0, row_group_rows=64)
    print(f"wrote {gallery} gallery images in {time.time() - started:.0f} s", flush=True)
    results = []
    for count in counts:
        queries = f"{workdir}/queries-{count}"
        write_features(queries, model_uri, model_id, gallery, queries=count, with_gallery=False, row_group_rows=64)
        search = measure([sys.executable, "-m", "pipelines.search", "--features", features, "--queries", queries, "--out", f"{workdir}/rankings-q{count}"])
        print(f"search {count} queries: {search}", flush=True)
        results.append((count, search))
        if not keep:
            shutil.rmtree(queries, ignore_errors=True)
    lines = [_row(f"{count:,} queries", "search", figures) for count, figures in results]
    if len(results) == 2:
        (small, a), (large, b) = results
        lines.append(_ratio(f"{large:,} / {small:,} queries", "search", a, b))
    if not keep:
        shutil.rmtree(features, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250000,1000000", help="comma-separated gallery sizes (the gallery sweep)")
    parser.add_argument("--gallery", type=int, default=None, help="gallery size of the queries sweep")
    parser.add_argument("--queries", default=None, help="comma-separated query counts: sweep the queries against --gallery")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the tables (they take 8 KB per image)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-search-scale-")
    model_uri = f"{workdir}/model"
    write_random_artifact(model_uri, PAPER, 224)
    from pipelines.model_store import read_artifact_files
    import json

    model_id = json.loads(read_artifact_files(model_uri)["artifact.json"])["model_id"]
    if args.queries:
        lines = queries_sweep(workdir, model_uri, model_id, args.gallery or 250_000, [int(n) for n in args.queries.split(",")], args.keep)
    else:
        lines = gallery_sweep(workdir, model_uri, model_id, [int(size) for size in args.sizes.split(",")], args.keep)
    print(f"\nmachine: {machine()}")
    print("\n".join(HEADER + lines))


if __name__ == "__main__":
    main()
