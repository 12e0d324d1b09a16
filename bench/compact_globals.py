"""Why a compact copy of the global features cannot rank a positive over the gallery exactly.

A positive's full-gallery rank needs the exact order of every gallery image whose score lies
within a copy's error of the positive's own. With the error bounded per image (Cauchy-Schwarz:
|q.x - q.x'| <= ||x - x'|| for a unit query), this counts, for random unit vectors at the
paper's D, the images a float16 copy (1 KB an image at D 512) and an int8 copy with a per-image
scale (512 B) leave undecided around a positive (any gallery image: near the median score,
where the images are densest). Each undecided image would be a ranged read of its full features.

Usage: python -m bench.compact_globals [--gallery 250000] [--dim 512] [--queries 20]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import machine


def unit(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def int8_copy(vectors: np.ndarray) -> np.ndarray:
    scale = np.abs(vectors).max(1, keepdims=True) / 127
    return np.round(vectors / scale).astype(np.int8).astype(np.float32) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gallery, queries = unit(rng, args.gallery, args.dim), unit(rng, args.queries, args.dim)
    exact = queries @ gallery.T
    print(f"{machine()}\ngallery {args.gallery:,} random unit vectors, D {args.dim}, {args.queries} queries\n")
    print("| copy | bytes an image | mean error bound | undecided images a positive (median) |")
    print("|---|---|---|---|")
    for name, copy, size in (("float16", gallery.astype(np.float16).astype(np.float32), 2 * args.dim), ("int8, per-image scale", int8_copy(gallery), args.dim)):
        bound = np.linalg.norm(gallery - copy, axis=1)
        approximate = queries @ copy.T
        positives = rng.integers(args.gallery, size=args.queries)
        undecided = [int((np.abs(approximate[q] - exact[q, p]) <= bound).sum()) for q, p in enumerate(positives)]
        print(f"| {name} | {size:,} | {bound.mean():.2e} | {np.median(undecided):,.0f} |")


if __name__ == "__main__":
    main()
