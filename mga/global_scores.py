"""Exact S_global (eq. 3) and the error of the fast one: what makes every shortlist decision
the same on any device, block shape or BLAS library (mga.shortlist).

`pair_scores` is the canonical score of a (query, gallery image) pair: float32 features,
products summed in float64, rounded to float32 once. `block_scores` is the fast score of a
queries x block product (one fp32 matmul), within `score_tolerance` of the canonical one;
`block_pair_scores` recomputes the few pairs a decision needs exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

# Elements of an exact recomputation's batch, on a CPU and on a GPU (bound memory, not results; a GPU pays per launch).
EXACT_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# float64 elements of a CPU pair_scores batch: two such batches stay in a 2 MB cache.
PAIR_ELEMENTS = 1 << 17


def pair_scores(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Eq. (3) for aligned rows, [..., D] x [..., D] (broadcast) -> [...] float32, accumulated in float64.

    The canonical score: a float32 product is exact in float64, so the sum rounds to the
    same float32 whatever order a device sums in. On a CPU numpy's einsum, rows a cache-sized
    batch at a time (9x torch's multiply-and-sum there, same values).
    """
    if first.device.type != "cpu":
        return (first.double() * second.double()).sum(-1).float()
    first, second = torch.broadcast_tensors(first.detach().float(), second.detach().float())
    shape, width = first.shape[:-1], first.shape[-1]
    left, right = first.reshape(-1, width).numpy(), second.reshape(-1, width).numpy()
    scores = np.empty(len(left), dtype=np.float32)
    step = max(1, PAIR_ELEMENTS // max(width, 1))
    for start in range(0, len(left), step):
        part = slice(start, start + step)
        scores[part] = np.einsum("ij,ij->i", left[part].astype(np.float64), right[part].astype(np.float64))
    return torch.from_numpy(scores).reshape(shape)


def block_pair_scores(
    query_global: torch.Tensor, block_global: torch.Tensor, query: torch.Tensor, row: torch.Tensor, block_double: torch.Tensor | None = None
) -> torch.Tensor:
    """`pair_scores` of the pairs (query_global[query[p]], block_global[row[p]]) of one
    queries x block product ([P] float32).

    On a CPU, given the block in float64 (`block_double`, converted once for all its query
    tiles), one sampled float64 matmul over the pairs' pattern (a CSR tensor): the same float64
    sums rounded to float32, without gathering a copy of each pair's rows (~7x faster at the
    ~150 pairs a query a block needs). Elsewhere the rows are gathered a bounded batch at a time.
    """
    if len(query) == 0:
        return torch.zeros(0, dtype=torch.float32, device=block_global.device)
    if block_double is None or block_global.device.type != "cpu":
        step = max(1, EXACT_ELEMENTS.get(block_global.device.type, EXACT_ELEMENTS["cpu"]) // block_global.shape[1])
        return torch.cat([pair_scores(query_global[query[start:start + step]], block_global[row[start:start + step]]) for start in range(0, len(query), step)])
    count, width = query_global.shape[0], block_double.shape[0]
    order = torch.argsort(query * width + row)  # CSR: by query, then row
    starts = torch.zeros(count + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(query, minlength=count), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested (tests/test_retrieval_step.py)
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(starts, row[order], torch.zeros(len(order), dtype=torch.float64), size=(count, width), check_invariants=False)
        sums = torch.sparse.sampled_addmm(pattern, query_global.double(), block_double.t(), beta=0.0).values()
    scores = torch.empty(len(order), dtype=torch.float32)
    scores[order] = sums.float()
    return scores


def score_tolerance(dim: int) -> float:
    """Bound on |fp32 matmul - pair_scores| for unit vectors of width `dim`, plus one ulp at 1."""
    return (dim + 4) * 2.0**-24


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """fp32 matmul without TF32 (a training process may have enabled it): the tolerance assumes fp32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)



def block_scores(query_global: torch.Tensor, block_global: torch.Tensor) -> torch.Tensor:
    """S_global of every query with every row of a block, [Q, G], by one fp32 matmul.

    On a CPU numpy's (OpenBLAS) sgemm: 15-20% faster than torch's at the scans' shapes (a
    1,024-query tile x 21-50k rows, one thread: 0.225 vs 0.28 s on an AMD EPYC, 0.525 vs 0.62 s
    on an Intel Xeon); any fp32 matmul is within `score_tolerance` of the exact scores."""
    if query_global.device.type == "cpu":
        return torch.from_numpy(query_global.detach().float().numpy() @ block_global.detach().float().numpy().T)
    with _full_precision_matmul():
        return query_global.float() @ block_global.float().t()
