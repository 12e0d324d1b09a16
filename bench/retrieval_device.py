"""Search's two kernels on one device: the blocked exact shortlist and the ATA rerank.

1. Shortlist: exact top-k of Q queries over a G x D gallery, scanned in blocks as a search
   actor does (mga.shortlist.exact_top_k), at depth 100 and at a depth beyond
   faiss's GPU cap of 2048; gallery scores per second, and (optionally) faiss IndexFlatIP
   on the same data at depth 100 for comparison, in the same run.
2. Rerank: ATA pairs/s with the paper's token sizes (3 layers x M 8 x d 128) against the
   batch size (pairs per call), fp32 and bf16 autocast, and the largest S_token
   difference bf16 makes.

Needs torch only (faiss if present); runs on CUDA when there is one, else on the CPU.
Usage: python -m bench.retrieval_device [--gallery 1000000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

from mga.ata import AttentionTokenAlignment
from mga.config import ModelConfig
from mga.shortlist import exact_top_k


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shortlist_rate(queries: torch.Tensor, gallery: torch.Tensor, keys: torch.Tensor, depth: int, block: int) -> float:
    """Seconds for the exact top-`depth` of every query over the whole gallery, block by block."""
    synchronize(queries.device)
    started = time.perf_counter()
    exact_top_k(queries, gallery, keys, depth, block)
    synchronize(queries.device)
    return time.perf_counter() - started


def unit(*shape: int, device: torch.device) -> torch.Tensor:
    values = torch.randn(*shape, device=device)
    return values / values.norm(dim=-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--block", type=int, default=32768)
    parser.add_argument("--deep", type=int, default=5000, help="a depth beyond faiss's GPU cap")
    parser.add_argument("--batches", default="128,256,512,1024,2048,4096,8192")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    torch.manual_seed(0)
    config = ModelConfig()
    gallery = unit(args.gallery, config.global_dim, device=device)
    queries = unit(args.queries, config.global_dim, device=device)
    keys = torch.randint(0, 2**62, (args.gallery,), device=device)

    print("| shortlist | depth | seconds | gallery scores/s |")
    print("|---|---|---|---|")
    shortlist_rate(queries[:8], gallery[: args.block * 2], keys[: args.block * 2], 100, args.block)  # warm-up
    for depth in (100, args.deep):
        seconds = shortlist_rate(queries, gallery, keys, depth, args.block)
        print(f"| blocked exact (mga.shortlist), {args.gallery:,} x {config.global_dim}, {args.queries} queries | {depth} | {seconds:.2f} | {args.queries * args.gallery / seconds:.3g} |")
    try:
        import faiss
    except ImportError:
        print("| faiss IndexFlatIP | - | not installed here | - |")
    else:
        index = faiss.IndexFlatIP(config.global_dim)
        index.add(gallery.cpu().numpy())
        started = time.perf_counter()
        index.search(queries.cpu().numpy(), 100)
        seconds = time.perf_counter() - started
        print(f"| faiss IndexFlatIP (CPU), same data | 100 | {seconds:.2f} | {args.queries * args.gallery / seconds:.3g} |")

    alignment = AttentionTokenAlignment(len(config.layers), config.token_dim, config.heads, config.mlp_ratio, config.temperature, config.token_reduce, config.stage2_keys).to(device).eval()
    largest = max(int(size) for size in args.batches.split(","))
    first = [unit(largest, config.num_tokens, config.token_dim, device=device) for _ in config.layers]
    second = [unit(largest, config.num_tokens, config.token_dim, device=device) for _ in config.layers]
    print(f"\n| ATA rerank, {len(config.layers)} layers x M {config.num_tokens} x d {config.token_dim} | pairs per call | fp32 pairs/s | bf16 pairs/s |")
    print("|---|---|---|---|")
    worst = 0.0
    for size in (int(size) for size in args.batches.split(",")):
        rates = []
        for bf16 in (False, True):
            a, b = [t[:size] for t in first], [t[:size] for t in second]
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                alignment(a, b)  # warm-up
                synchronize(device)
                started, calls = time.perf_counter(), 0
                while time.perf_counter() - started < 1.0 or calls < 3:
                    alignment(a, b)
                    calls += 1
                synchronize(device)
                rates.append(size * calls / (time.perf_counter() - started))
        with torch.inference_mode():
            exact = alignment(a, b).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                worst = max(worst, float((alignment(a, b).float() - exact).abs().max()))
        print(f"| | {size} | {rates[0]:,.0f} | {rates[1]:,.0f} |")
    print(f"\nlargest |S_token(bf16) - S_token(fp32)| over the pairs: {worst:.4f} (S_token spans [-2, 2])")


if __name__ == "__main__":
    main()
