"""The search driver's share of the shortlist scan at scale: A actors each scan their part of the
gallery in blocks and send the entries before their own running k-th (as GalleryScanner does);
the driver folds them into each query's exact top-`depth` (pipelines.search.gallery_scan.ShortlistMerge).

What it measures: entries a query reaches the driver (~A x depth x (1 + ln(rows an actor
scans / block))) and the driver's cost an entry, from which bench/RESULTS.md projects the
driver's time at 10^8 gallery images. Scores are random (the gallery's order is random with
respect to a query); the ratio of an actor's rows to the block size is what sets the count.
Usage: python -m bench.shortlist_merge [--queries 500] [--actors 16] [--blocks-per-actor 190] [--block 512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from bench.common import machine
from mga.retrieval import TopK, kth_of, merge_top_k
from pipelines.search.gallery_scan import ShortlistMerge


def actor_stream(queries: int, depth: int, actors: int, blocks_per_actor: int, block: int, seed: int = 0) -> list[dict]:
    """The blocks' results in the order they would arrive, actors taking turns."""
    rng = np.random.default_rng(seed)
    running: list[TopK | None] = [None] * actors
    stream = []
    for _ in range(blocks_per_actor):
        for actor in range(actors):
            scores = torch.from_numpy(rng.random((queries, block), dtype=np.float32))
            keys = torch.from_numpy(rng.integers(0, 2**62, (queries, block)))
            top = torch.topk(scores, depth, dim=1)
            found = TopK(top.values, keys.gather(1, top.indices), top.indices)
            floor = None if running[actor] is None else kth_of(running[actor], depth)
            if floor is not None:  # the entries after the actor's own k-th stay with it
                kept = found.scores > floor[0][:, None]
                found = TopK(torch.where(kept, found.scores, float("-inf")), found.keys, found.rows).first(int(kept.sum(1).max()))
            running[actor] = found if running[actor] is None else merge_top_k(running[actor], found, depth)
            ids = pa.array([f"{len(stream)}-{row}" for row in range(found.scores.numel())])
            stream.append({"rows": block, "counts": np.zeros(0, np.int64), "scores": found.scores.numpy(), "keys": found.keys.numpy(), "ids": ids, "items": ids})
    return stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--actors", type=int, default=16)
    parser.add_argument("--blocks-per-actor", type=int, default=190, help="an actor's rows / block rows (6.25M / 32,768 = 190: 10^8 images on 16 actors)")
    parser.add_argument("--block", type=int, default=512, help="rows a simulated block (the count depends on the ratio above)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver folds on one thread
    stream = actor_stream(args.queries, args.depth, args.actors, args.blocks_per_actor, args.block)
    entries = sum(int(np.isfinite(block["scores"]).sum()) for block in stream)
    merge = ShortlistMerge(args.queries, args.depth, 0)
    started = time.perf_counter()
    for block in stream:
        merge.add(block)
    merge.result("simulated")
    elapsed = time.perf_counter() - started
    print(f"\nmachine: {machine()}")
    print(f"{args.actors} actors x {args.blocks_per_actor} blocks, {args.queries} queries, depth {args.depth}")
    print("| blocks | entries a query | driver fold s | ns an entry |")
    print("|---|---|---|---|")
    print(f"| {len(stream)} | {entries / args.queries:.0f} | {elapsed:.2f} | {elapsed / entries * 1e9:.0f} |")


if __name__ == "__main__":
    main()
