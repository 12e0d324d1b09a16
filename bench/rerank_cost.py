"""Rerank cost: pairs/s of the batched ATA scorer vs a per-pair loop, and the cost of
reranking the top 100 of a query as a fraction of the cost of embedding that query.

All on the demo's model (tiny config) and the same device, measured in one run.
Usage: python bench/rerank_cost.py [--top 100] [--queries 16]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, tiny_model_config, timed
from mga.model import MGAModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--loop-pairs", type=int, default=200, help="pairs scored one by one for the loop figure")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, image_size = tiny_model_config()
    model = MGAModel(config).eval()
    images = torch.randint(0, 256, (args.queries, 3, image_size, image_size), dtype=torch.uint8)
    with torch.inference_mode():
        model.embed(images[:2])  # warm-up
        with timed() as embed_time:
            queries = model.embed(images)
        candidates = model.embed(torch.randint(0, 256, (args.top, 3, image_size, image_size), dtype=torch.uint8))
        per_query = candidates.index(torch.arange(args.top).repeat(args.queries))
        model.score_candidates(queries.index(torch.arange(2)), candidates.index(torch.arange(args.top).repeat(2)))  # warm-up
        with timed() as batched_time:
            model.score_candidates(queries, per_query)
        pairs = args.queries * args.top
        with timed() as loop_time:
            for pair in range(args.loop_pairs):
                query = queries.index(torch.tensor([pair % args.queries]))
                model.score_pairs(query, candidates.index(torch.tensor([pair % args.top])))
    batched_rate = pairs / batched_time[0]
    loop_rate = args.loop_pairs / loop_time[0]
    embed_per_query = embed_time[0] / args.queries
    rerank_per_query = args.top / batched_rate
    print(f"machine: {machine()}; {args.threads} threads")
    print(f"model: {config.backbone} {image_size}px, {len(config.layers)} layers x M={config.num_tokens} x d={config.token_dim}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| batched ATA scorer | {batched_rate:,.0f} pairs/s ({args.queries} queries x {args.top} candidates in one call) |")
    print(f"| per-pair loop | {loop_rate:,.0f} pairs/s |")
    print(f"| batching speed-up | {batched_rate / loop_rate:.1f}x |")
    print(f"| embed one query | {embed_per_query * 1000:.1f} ms |")
    print(f"| rerank its top {args.top} | {rerank_per_query * 1000:.1f} ms |")
    print(f"| rerank / embed | {rerank_per_query / embed_per_query:.2f} |")


if __name__ == "__main__":
    main()
