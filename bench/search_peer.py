"""`mga search` against a hand-written single-process peer on the same table, side by side.

The peer is what an engineer would write without this project: read the table's global
features with pyarrow, faiss `IndexFlatIP` top-`depth` of the queries, read the tokens of
each query's first `rerank` candidates row group by row group (only the token columns, only
the row groups that hold a candidate), then ATA on those pairs with the project's model in
batches of `--rerank-batch` (the search's CPU default) and the fused score's rerank. No Ray,
no positives' full-gallery ranks, no tie rule, no output table, float32 (where `mga search`'s
`auto` picks bfloat16 for ATA, the bench runs it at float32 too).

Both run as fresh processes after the page cache is dropped (as root; else said, and both
read from the cache) and their code loaded again (imports, a Ray start), on a features table of `bench.search_scale`'s writer (the paper's
sizes, float16 tokens, random unit vectors, labelled queries of gallery items). The bench
prints both walls, the peer's steps, the kernels' seconds (faiss top-k and ATA on the data in
memory), the disk's sequential read speed of the table's files (cold) and the two targets of
issue 30: `mga search` <= 1.0x the peer, and <= 2x (kernels + the bytes it needs at disk speed).

Usage: python -m bench.search_peer [--gallery 1000000] [--queries 1000] [--workdir DIR] [--keep]
       python -m bench.search_peer --peer FEATURES_URI --model ARTIFACT_URI --out FILE   (the peer alone, as the bench runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import machine, write_random_artifact
from bench.search_scale import PAPER, measure, write_features
from bench.token_reads import summary_line

DEPTH, RERANK, RERANK_BATCH, ALPHA = 100, 50, 128, 0.5  # `mga search`'s CLI defaults on a CPU


def drop_page_cache() -> bool:
    """Empty the page cache so that both runs read from the disk; False where not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
        return True
    except OSError:
        return False


WARM_CODE = (
    "import faiss, pyarrow.dataset, deltalake, timm, torch, ray; ray.init(num_cpus=1, include_dashboard=False); "
    "ray.get(ray.remote(lambda: bool(__import__('torch'))).remote()); ray.shutdown()"
)


def cold_data() -> bool:
    """Drop the page cache, then load the code both runs execute (Python packages, Ray's
    binaries) again: the runs read their data from the disk, not their imports."""
    dropped = drop_page_cache()
    subprocess.run([sys.executable, "-c", WARM_CODE], check=True, capture_output=True)
    return dropped


def disk_read_speed(files: list[str]) -> float:
    """Bytes per second of one sequential pass over `files` (after dropping the cache)."""
    drop_page_cache()
    started, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as file:
            while block := file.read(64 << 20):
                total += len(block)
    return total / (time.perf_counter() - started)


def table_files(features: str) -> list[str]:
    """The data files of a local features table's current version."""
    from pipelines.storage import resolve
    from pipelines.tables import open_table

    return sorted(open_table(resolve(features)).paths())


def run_peer(features: str, model_uri: str, out: str) -> None:
    """The peer: prints its steps' seconds as JSON and saves each query's ranked ids to `out`."""
    import faiss
    import torch

    from pipelines.model_store import load_model

    steps: dict[str, float] = {}
    started = time.perf_counter()
    files = table_files(features)
    parts = [pq.read_table(path, columns=["image_id", "split", "global"]) for path in files]
    table = pa.concat_tables(parts)
    vectors = table.column("global").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    is_query = np.asarray(pc.equal(table.column("split"), "query"))
    queries, gallery = np.ascontiguousarray(vectors[is_query]), np.ascontiguousarray(vectors[~is_query])
    gallery_rows = np.flatnonzero(~is_query)  # table row of each gallery position
    steps["read globals"] = time.perf_counter() - started

    started = time.perf_counter()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    score_global, found = index.search(queries, DEPTH)
    steps["faiss flat top-k"] = time.perf_counter() - started

    started = time.perf_counter()
    model = load_model(model_uri)[0].eval()
    token_shape = (model.config.num_tokens, model.config.token_dim)
    names = [f"tokens_{layer}" for layer in range(len(model.config.layers))]
    head_rows = gallery_rows[found[:, :RERANK]]  # table rows, [Q, RERANK]
    wanted = np.unique(head_rows)
    offsets = np.cumsum([0] + [part.num_rows for part in parts])
    tokens = [np.zeros((len(wanted), *token_shape), np.float32) for _ in names]
    for number, path in enumerate(files):
        in_file = wanted[(wanted >= offsets[number]) & (wanted < offsets[number + 1])] - offsets[number]
        if not len(in_file):
            continue
        reader = pq.ParquetFile(path)
        group_bounds = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
        for group in np.unique(np.searchsorted(group_bounds, in_file, side="right") - 1):
            rows = in_file[(in_file >= group_bounds[group]) & (in_file < group_bounds[group + 1])]
            decoded = reader.read_row_group(int(group), columns=names).take(pa.array(rows - group_bounds[group]))
            place = np.searchsorted(wanted, rows + offsets[number])
            for layer, name in enumerate(names):
                column = decoded.column(name).combine_chunks()
                halves = np.frombuffer(column.buffers()[2], "<f2", len(rows) * token_shape[0] * token_shape[1])
                tokens[layer][place] = halves.reshape(len(rows), *token_shape)
    steps["read head tokens"] = time.perf_counter() - started

    started = time.perf_counter()
    query_tokens = [np.zeros((len(queries), *token_shape), np.float32) for _ in names]
    query_table = pa.concat_tables([pq.read_table(path, columns=["split", *names], filters=pc.field("split") == "query") for path in files])
    for layer, name in enumerate(names):
        column = query_table.column(name).combine_chunks()
        query_tokens[layer][:] = np.frombuffer(column.buffers()[2], "<f2", len(query_table) * token_shape[0] * token_shape[1]).reshape(-1, *token_shape)
    steps["read query tokens"] = time.perf_counter() - started

    started = time.perf_counter()
    pair_query = np.repeat(np.arange(len(queries)), RERANK)
    pair_gallery = np.searchsorted(wanted, head_rows.reshape(-1))
    score_token = np.empty(len(pair_query), np.float32)
    with torch.inference_mode():
        for start in range(0, len(pair_query), RERANK_BATCH):
            batch = slice(start, start + RERANK_BATCH)
            score_token[batch] = model.align_tokens(
                [torch.from_numpy(layer[pair_query[batch]]) for layer in query_tokens],
                [torch.from_numpy(layer[pair_gallery[batch]]) for layer in tokens],
            ).numpy()
    steps["ATA"] = time.perf_counter() - started

    fused = ALPHA * score_global[:, :RERANK] + (1 - ALPHA) * score_token.reshape(-1, RERANK)
    order = np.argsort(-fused, axis=1, kind="stable")
    ranked = np.concatenate([np.take_along_axis(found[:, :RERANK], order, 1), found[:, RERANK:]], axis=1)
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    np.savez(out, query_id=ids[is_query].astype(str), gallery_id=ids[gallery_rows[ranked]].astype(str))
    print(json.dumps(steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="kept between runs: an existing features table there is reused")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--peer", default=None, help="run only the peer on this features table")
    parser.add_argument("--model", default=None, help="with --peer: the artifact whose ATA scores the pairs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.peer:
        run_peer(args.peer, args.model, args.out)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="mga-search-peer-")
    features, model_uri = f"{workdir}/features", f"{workdir}/model"
    if not os.path.isdir(f"{features}/_delta_log"):
        from pipelines.model_store import load_model

        write_random_artifact(model_uri, PAPER, 224)
        started = time.time()
        write_features(features, model_uri, load_model(model_uri)[1], args.gallery, queries=args.queries, row_group_rows=4096)
        print(f"wrote {args.gallery:,} gallery + {args.queries:,} queries in {time.time() - started:.0f} s", flush=True)
    files = table_files(features)
    speed = disk_read_speed(files)
    cold = cold_data()
    rankings = f"{workdir}/rankings"
    shutil.rmtree(rankings, ignore_errors=True)
    search = measure([sys.executable, "-m", "pipelines.search", "--features", features, "--out", rankings])
    cold_data()
    peer = measure([sys.executable, "-m", "bench.search_peer", "--peer", features, "--model", model_uri, "--out", f"{workdir}/peer.npz"])
    steps = json.loads(peer["summary"].strip().splitlines()[-1])

    from pipelines.storage import resolve
    from pipelines.tables import open_table, read_table

    snapshot = open_table(resolve(rankings))
    # Where `auto` chose bfloat16 (a CPU with bfloat16 dot products), also at the peer's float32.
    float32 = None
    if snapshot.info["search"]["rerank_precision"] != "float32":
        shutil.rmtree(f"{rankings}_float32", ignore_errors=True)
        cold_data()
        float32 = measure([sys.executable, "-m", "pipelines.search", "--features", features, "--out", f"{rankings}_float32", "--rerank-precision", "float32"])
    ours = read_table(snapshot, ["query_id", "rank", "gallery_id"]).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    theirs = np.load(f"{workdir}/peer.npz")
    order = np.argsort(theirs["query_id"])
    same = np.asarray(ours.column("gallery_id").to_numpy(zero_copy_only=False)).astype(str) == theirs["gallery_id"][order].reshape(-1)
    info = snapshot.info
    global_bytes = (args.gallery + args.queries) * PAPER.global_dim * 4
    needed = global_bytes + info["token_bytes_read"]
    kernels = steps["faiss flat top-k"] + steps["ATA"]
    bound = kernels + needed / speed
    print(f"\n{machine()}\ngallery {args.gallery:,}, queries {args.queries:,}; depth {DEPTH}, rerank {RERANK}, {RERANK_BATCH} pairs an ATA call; "
          f"page cache dropped before each run (code warm, data cold): {cold}; disk read {speed / 2**20:.0f} MiB/s (cold, sequential, {sum(map(os.path.getsize, files)) / 2**30:.2f} GiB)\n")
    print("| run | wall s | peak PSS, process tree | steps |")
    print("|---|---|---|---|")
    for name, run in (("`mga search` (CLI defaults)", search), ("`mga search --rerank-precision float32` (the peer's precision)", float32)):
        if run is not None:
            print(f"| {name} | {run['wall']:.1f} | {run['pss'] / 2**30:.2f} GiB | rerank {summary_line(run['summary'], 'rerank')}; scans {summary_line(run['summary'], 'scans')}; "
                  f"token reads {summary_line(run['summary'], 'token reads')} |")
    print(f"| peer (one process, faiss flat + ATA) | {peer['wall']:.1f} | {peer['pss'] / 2**30:.2f} GiB | "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items()) + " |")
    print(f"\nsame gallery id at the same rank as the peer: {same.mean():.2%} of {len(same):,}")
    print(f"kernels (faiss flat top-k + ATA): {kernels:.1f} s; bytes the search needs (globals + ranged tokens): {needed / 2**30:.2f} GiB "
          f"= {needed / speed:.1f} s at disk speed")
    print(f"mga search / peer: {search['wall'] / peer['wall']:.2f} (target <= 1.0)")
    if float32 is not None:
        print(f"mga search at the peer's precision (--rerank-precision float32) / peer: {float32['wall'] / peer['wall']:.2f}")
    print(f"mga search / (kernels + needed bytes at disk speed): {search['wall'] / bound:.2f} (target <= 2.0)")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
