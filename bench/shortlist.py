"""Shortlist: search's exact blocked top-k (mga.shortlist) and faiss indexes against a NumPy top-k.

Prints time ratios and recall@100 measured side by side on the same 100k x D vectors.
Usage: python bench/shortlist.py [--gallery 100000] [--dim 128] [--queries 1000]
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np
import torch

from bench.common import machine, timed
from mga.shortlist import exact_top_k
from pipelines.search.approximate import new_index


def blocked_exact(gallery: np.ndarray, queries: np.ndarray, k: int, block: int = 32768) -> np.ndarray:
    """What `mga search --index exact` computes: gallery blocks, exact top-k, merged."""
    return exact_top_k(torch.from_numpy(queries), torch.from_numpy(gallery), torch.arange(len(gallery)), k, block).rows.numpy()


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Exact top-k by inner product, blocked over queries (never queries x gallery at once)."""
    result = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ gallery.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        result[start:start + block] = np.take_along_axis(top, order, axis=1)
    return result


def clustered_vectors(count: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around cluster centres: retrieval features are clustered, not uniform."""
    vectors = centres[rng.integers(len(centres), size=count)] + 0.35 * rng.standard_normal((count, dim)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
    gallery = clustered_vectors(args.gallery, args.dim, rng, centres)
    queries = clustered_vectors(args.queries, args.dim, rng, centres)

    with timed() as brute_time:
        truth = numpy_topk(gallery, queries, args.k)
    print(f"machine: {machine()}; faiss {faiss.__version__}, {faiss.get_num_gpus()} GPUs")
    print(f"gallery {args.gallery} x {args.dim}, {args.queries} queries, k={args.k}")
    print(f"numpy brute force: {brute_time[0]:.3f} s ({args.queries / brute_time[0]:.0f} queries/s)")
    print("| index | build s | search s | search speed vs numpy | recall@k vs exact |")
    print("|---|---|---|---|---|")
    with timed() as search_time:
        found = blocked_exact(gallery, queries, args.k)
    recall = np.mean([len(set(t) & set(f)) / args.k for t, f in zip(truth, found)])
    print(f"| exact, blocked (mga.shortlist) | - | {search_time[0]:.3f} | {brute_time[0] / search_time[0]:.1f}x | {recall:.4f} |")
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        with timed() as build_time:
            index = faiss.IndexFlatIP(args.dim) if kind == "flat" else new_index(kind, args.dim, len(gallery))
            if not index.is_trained:
                index.train(gallery)
            index.add(gallery)
        with timed() as search_time:
            found = index.search(queries, args.k)[1]
        recall = np.mean([len(set(t) & set(f)) / args.k for t, f in zip(truth, found)])
        print(f"| {kind} | {build_time[0]:.2f} | {search_time[0]:.3f} | {brute_time[0] / search_time[0]:.1f}x | {recall:.4f} |")


if __name__ == "__main__":
    main()
