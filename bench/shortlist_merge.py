"""The search driver's share of the shortlist scan at scale: A actors each scan their part of the
gallery in blocks and send the entries before their running k-th (as GalleryScanner does), or
before the driver's merged k-th as it stood when their piece was sent, where that is higher;
the driver folds them into each query's exact top-`depth` (pipelines.search.gallery_scan.ShortlistMerge).

What it measures, with and without the driver's floor sent along: entries a query that reach
the driver (~A x depth x (1 + ln(rows an actor scans / block)) without it) and the driver's
time, from which bench/RESULTS.md projects the driver's share at 10^8 gallery images. Scores
are random (the gallery's order is random with respect to a query); the ratio of an actor's
rows to the block size is what sets the count. A piece is sent while the A before it are
still running, so the floor it carries is A results old.
Usage: python -m bench.shortlist_merge [--queries 500] [--actors 16] [--blocks-per-actor 190] [--block 512]
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import numpy as np
import pyarrow as pa
import torch

from bench.common import machine
from mga.shortlist import TopK, at_or_before, kth_of, merge_top_k, stricter_floor
from pipelines.search.shortlist_merge import ShortlistMerge, block_entries


def simulate(queries: int, depth: int, actors: int, blocks_per_actor: int, block: int, driver_floor: bool, seed: int = 0) -> tuple[int, int, float]:
    """(blocks, entries sent to the driver, seconds the driver spent folding them)."""
    rng = np.random.default_rng(seed)
    running: list[TopK | None] = [None] * actors
    merge = ShortlistMerge(queries, depth, 0)
    floors = deque([None] * actors, maxlen=actors)  # the driver's floor as each of the last A results arrived
    blocks = entries = 0
    folding = 0.0
    for _ in range(blocks_per_actor):
        for actor in range(actors):
            scores = torch.from_numpy(rng.random((queries, block), dtype=np.float32))
            keys = torch.from_numpy(rng.integers(0, 2**62, (queries, block)))
            top = torch.topk(scores, depth, dim=1)
            found = TopK(top.values, keys.gather(1, top.indices), top.indices)
            sent = floors[0] if driver_floor else None
            floor = stricter_floor(None if running[actor] is None else kth_of(running[actor], depth),
                                   None if sent is None else tuple(torch.from_numpy(part) for part in sent))
            if floor is not None:  # the entries after the floor stay with the actor
                kept = at_or_before(found.scores, found.keys, *floor)
                found = TopK(torch.where(kept, found.scores, float("-inf")), found.keys, found.rows).first(int(kept.sum(1).max()))
            running[actor] = found if running[actor] is None else merge_top_k(running[actor], found, depth)
            ids = pa.array([f"{blocks}-{row}" for row in range(block)])
            result = {"rows": block, "counts": np.zeros(0, np.int64), **block_entries(found, ids, ids)}
            blocks += 1
            entries += len(result["query"])
            started = time.perf_counter()
            merge.add(result)
            floors.append(merge.floor())
            folding += time.perf_counter() - started
    started = time.perf_counter()
    merge.result("simulated")
    return blocks, entries, folding + time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--actors", type=int, default=16)
    parser.add_argument("--blocks-per-actor", type=int, default=190, help="an actor's rows / block rows (6.25M / 32,768 = 190: 10^8 images on 16 actors)")
    parser.add_argument("--block", type=int, default=512, help="rows a simulated block (the count depends on the ratio above)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver folds on one thread
    print(f"\nmachine: {machine()}")
    print(f"{args.actors} actors x {args.blocks_per_actor} blocks, {args.queries} queries, depth {args.depth}")
    print("| actors' floor | blocks | entries a query | driver fold s | ns an entry |")
    print("|---|---|---|---|---|")
    for driver_floor in (False, True):
        blocks, entries, seconds = simulate(args.queries, args.depth, args.actors, args.blocks_per_actor, args.block, driver_floor)
        label = "own, or the driver's when higher" if driver_floor else "own"
        print(f"| {label} | {blocks} | {entries / args.queries:.0f} | {seconds:.2f} | {seconds / entries * 1e9:.0f} |")


if __name__ == "__main__":
    main()
