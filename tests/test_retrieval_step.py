"""mga.shortlist and mga.retrieval: the blocked exact shortlist, positive ranks and the rerank, against brute force.

Runs on the CPU and, where CUDA is present, on the GPU too (at a depth above faiss's
GPU cap of 2048).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mga.global_scores import block_pair_scores, pair_scores
from mga.metrics import RetrievalMetrics, rank_metrics
from mga.retrieval import reranked_ranks, retrieve
from mga.tie_keys import tie_keys
from pipelines.schemas import arrow_tie_keys
from mga.shortlist import block_top_k, count_ranked_above, exact_top_k, kth_of, merge_top_k, rows_at_or_above, stricter_floor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gallery_with_ties(count: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Unit vectors in a few tight clusters, with exact duplicates (score ties) among them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    vectors = centres[rng.integers(0, 8, count)] + 0.3 * rng.normal(size=(count, dim))
    vectors[count // 2: count // 2 + 40] = vectors[:40]  # 40 duplicated images
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return torch.from_numpy(vectors.astype(np.float32)), np.array([f"g{i:05d}" for i in range(count)])


def brute_force_order(queries: torch.Tensor, gallery: torch.Tensor, keys: np.ndarray) -> np.ndarray:
    """Full global order per query: exact score descending, tie key ascending."""
    scores = np.stack([pair_scores(q.expand_as(gallery), gallery).numpy() for q in queries.cpu()])
    return np.stack([np.lexsort((keys, -row)) for row in scores])


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_top_k_and_positive_ranks_equal_brute_force(device):
    gallery, ids = gallery_with_ties(5000, 32, seed=0)
    keys = tie_keys(ids)
    queries = torch.cat([gallery[:6], gallery[2500:2504]])  # queries with exact duplicates in the gallery
    truth = brute_force_order(queries, gallery, keys)
    depth = 2100 if device == "cuda" else 300  # on a GPU: beyond faiss's k cap of 2048

    on = lambda t: torch.as_tensor(t).to(device)  # noqa: E731
    q, g, k = on(queries), on(gallery), on(keys)
    shortlist = exact_top_k(q, g, k, depth, gallery_block=700)  # blocks of 700, the last one shorter
    assert np.array_equal(shortlist.rows.cpu().numpy(), truth[:, :depth])

    # As "positives" of every query: every 97th gallery image, and its first 20 in the global order
    # (ties and duplicates among them): their ranks, counted blockwise, by comparing each positive's
    # scores over the block, or off the block's top list (cut at a running floor, as the scan does) where it can.
    pq = np.repeat(np.arange(len(queries)), 52 + 20)
    pg = np.concatenate([np.concatenate([np.arange(0, len(gallery), 97), truth[query, :20]]) for query in range(len(queries))])
    score = pair_scores(q[on(pq)], g[on(pg)])
    counts = torch.zeros(len(pq), dtype=torch.int64, device=device)
    counts_with_lists, running = torch.zeros_like(counts), None
    for start in range(0, len(gallery), 700):
        block, block_keys = g[start:start + 700], k[start:start + 700]
        # On a CPU the near rows' exact scores come from the block in float64, as the search's scan passes it.
        block_double = block.double() if device == "cpu" else None
        counts += count_ranked_above(q @ block.t(), q, block, block_keys, on(pq), score, k[on(pg)], block_double)
        floor = None if running is None else kth_of(running, 60)
        listed = block_top_k(q, block, block_keys, 60, torch.arange(start, start + len(block), device=device), floor=floor)
        counts_with_lists += count_ranked_above(q @ block.t(), q, block, block_keys, on(pq), score, k[on(pg)], block_double, listed=listed, floor=floor)
        running = listed if running is None else merge_top_k(running, listed, 60)
    position = np.argsort(truth, axis=1)  # position[q, g] = 0-based place of gallery row g
    assert np.array_equal(counts.cpu().numpy() + 1, position[pq, pg] + 1)
    assert np.array_equal(counts_with_lists.cpu().numpy(), counts.cpu().numpy())


def test_blocks_cut_at_another_scans_floor_still_merge_to_the_exact_top_k():
    """Two scanners take turns over their halves of a gallery; each block is cut at the stricter
    of the scanner's own k-th and the merged list's k-th (what search's actors get from the
    driver with each piece): the merged list equals brute force, ties included."""
    gallery, ids = gallery_with_ties(4000, 32, seed=1)
    keys = tie_keys(ids)
    queries = torch.cat([gallery[:4], gallery[2000:2004]])
    truth = brute_force_order(queries, gallery, keys)
    keys = torch.as_tensor(keys)
    depth, merged, running = 50, None, [None, None]
    for step in range(4):
        for scanner in (0, 1):
            start = scanner * 2000 + step * 500
            own = None if running[scanner] is None else kth_of(running[scanner], depth)
            floor = stricter_floor(own, None if merged is None else kth_of(merged, depth))
            found = block_top_k(queries, gallery[start:start + 500], keys[start:start + 500], depth, torch.arange(start, start + 500), floor=floor)
            running[scanner] = found if running[scanner] is None else merge_top_k(running[scanner], found, depth)
            merged = found if merged is None else merge_top_k(merged, found, depth)
    assert np.array_equal(merged.rows.numpy(), truth[:, :depth])

    # The stricter floor is the one earlier in the global order: a higher score, or on equal scores the lower key.
    first = (torch.tensor([0.5, 0.5, 0.7]), torch.tensor([3, 3, 1]))
    second = (torch.tensor([0.6, 0.5, 0.6]), torch.tensor([9, 2, 0]))
    score, key = stricter_floor(first, second)
    assert score.tolist() == pytest.approx([0.6, 0.5, 0.7]) and key.tolist() == [9, 2, 1]
    assert stricter_floor(None, second) is second and stricter_floor(first, None) is first


@pytest.mark.parametrize("device", DEVICES)
def test_rows_at_or_above_a_floor_in_block_order_padded_or_none_past_the_limit(device):
    """The floor's shortcut of block_top_k: each query's rows at or above its bound, in block
    order, padded with -1 to the widest query (at least `width`); None once a query has more than `limit`."""
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.9, 0.8, 0.7, 0.6], [0.0, 0.0, 0.0, 0.0]], device=device)
    bound = torch.tensor([0.3, 0.75, 0.1], device=device)
    assert rows_at_or_above(scores, bound, 4, 1).tolist() == [[1, 2, 3], [0, 1, -1], [-1, -1, -1]]
    assert rows_at_or_above(scores, bound, 4, 5).tolist() == [[1, 2, 3, -1, -1], [0, 1, -1, -1, -1], [-1] * 5]
    assert rows_at_or_above(scores, bound, 2, 1) is None
    assert rows_at_or_above(scores, torch.ones(3, device=device), 2, 0).shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_block_pair_scores_equal_pair_scores_in_any_order(device):
    """The sampled float64 matmul (CPU, with the block in float64) and the gathered rows give
    pair_scores' values for pairs in any order, repeated pairs and queries without pairs."""
    gallery, _ = gallery_with_ties(3000, 96, seed=3)
    queries = gallery[::50][:40]
    rng = np.random.default_rng(4)
    query = torch.from_numpy(rng.integers(0, 30, 5000))  # queries 30-39 have no pair
    row = torch.from_numpy(rng.integers(0, len(gallery), 5000))
    query[-10:], row[-10:] = query[0], row[0]  # one pair ten times more
    q, g = queries.to(device), gallery.to(device)
    truth = pair_scores(queries[query], gallery[row])
    for block_double in (None, g.double()):
        scores = block_pair_scores(q, g, query.to(device), row.to(device), block_double).cpu()
        assert scores.dtype == torch.float32 and torch.equal(scores, truth)
    assert len(block_pair_scores(q, g, query[:0].to(device), row[:0].to(device), g.double())) == 0


def test_rerank_reorders_only_the_head_and_ranks_follow():
    gallery, ids = gallery_with_ties(400, 16, seed=1)
    queries = gallery[[3, 150]] + 0.01
    queries = queries / queries.norm(dim=1, keepdim=True)
    keys = torch.from_numpy(tie_keys(ids))
    token = torch.Generator().manual_seed(0)
    token_table = torch.rand(2, 400, generator=token) * 4 - 2  # any S_token in [-2, 2]

    def token_scores(query_rows, gallery_rows):
        return token_table[query_rows[:, None], gallery_rows]

    ranking = retrieve(queries, gallery, keys, depth=400, rerank_top=10, alpha=0.5, token_scores=token_scores)
    global_order = brute_force_order(queries, gallery, tie_keys(ids))
    rows = ranking.rows.numpy()
    for query in range(2):
        head = global_order[query, :10]
        fused = 0.5 * pair_scores(queries[query].expand(10, -1), gallery[head]) + 0.5 * token_table[query, head]
        assert np.array_equal(rows[query, :10], head[np.argsort(-fused.numpy(), kind="stable")])
        assert np.array_equal(rows[query, 10:], global_order[query, 10:])  # the tail keeps the global order
        assert torch.isnan(ranking.score_token[query, 10:]).all() and not torch.isnan(ranking.score_token[query, :10]).any()
        assert (ranking.score[query, 10:] <= ranking.score[query, 9]).all()  # the tail's fused score is a lower bound
    # The reranked rank of any gallery image = its place in the rows; beyond the head = its global rank.
    pq = torch.tensor([0, 0, 0, 1, 1])
    pg = [global_order[0, 0], global_order[0, 7], global_order[0, 200], global_order[1, 9], global_order[1, 10]]
    global_rank = torch.tensor([1, 8, 201, 10, 11])
    reranked = reranked_ranks(global_rank, pq, ranking.head_order).numpy()
    expected = [int(np.flatnonzero(rows[q] == g)[0]) + 1 for q, g in zip(pq.tolist(), pg)]
    assert reranked.tolist() == expected and reranked[2] == 201 and reranked[4] == 11


def test_metrics_from_positive_ranks_equal_full_depth_metrics():
    """Bounded rankings + positive ranks give the full-gallery R@K and mAP, positives beyond the depth included."""
    rng = np.random.default_rng(3)
    queries, gallery, depth = 40, 500, 20
    full = np.zeros((queries, gallery), dtype=bool)  # full-depth match matrix in ranked order
    for query in range(queries - 3):  # three queries with no positive at all
        count = rng.integers(1, 6)
        full[query, rng.choice(gallery, count, replace=False)] = True
    full[0, :] = False
    full[0, [150, 420]] = True  # both positives far below the depth
    query_index, position = np.nonzero(full)
    reference = RetrievalMetrics()
    reference.update(full, full.sum(1))
    first, ap, positives = rank_metrics(query_index, position + 1, queries)
    from_ranks = RetrievalMetrics()
    from_ranks.add(first, ap, positives)
    assert from_ranks.result() == pytest.approx(reference.result())
    # Cut at an evaluation depth: a positive below it counts as not retrieved.
    cut = RetrievalMetrics()
    cut.update(full[:, :depth], full.sum(1))
    first, ap, positives = rank_metrics(query_index, position + 1, queries, depth=depth)
    at_depth = RetrievalMetrics()
    at_depth.add(first, ap, positives)
    assert at_depth.result() == pytest.approx(cut.result())
    with pytest.raises(ValueError, match="share a rank"):
        rank_metrics(np.array([0, 0]), np.array([3, 3]), 1)


def test_tie_keys_follow_their_rule_from_strings_and_from_arrow():
    def reference(text: str) -> int:  # TIE_RULE, a byte at a time
        key = 0xCBF29CE484222325
        for byte in text.encode("utf-8"):
            key = (key ^ byte) * 0x100000001B3 % 2**64
        for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            key = (key ^ key >> shift) * multiplier % 2**64
        return (key ^ key >> 31) >> 1

    ids = ["", "a", "b", "g00001", "g00002", "é", "x😀y", "item/42 front.jpg", "long" * 40]
    expected = [reference(text) for text in ids]
    assert tie_keys(ids).tolist() == expected
    assert tie_keys(np.array(ids, dtype=object)).tolist() == expected
    assert tie_keys(text for text in ids).tolist() == expected
    assert tie_keys(["a"]).tolist() == [reference("a")]  # one id's key does not depend on the longest id beside it
    assert tie_keys([]).dtype == np.int64 and tie_keys([]).shape == (0,)
    # The drivers' path: Arrow's buffers, sliced, chunked, with 64-bit offsets.
    column = pa.array(["pad", *ids], pa.string()).slice(1)
    assert arrow_tie_keys(column).tolist() == expected
    assert arrow_tie_keys(pa.chunked_array([column.slice(0, 4), column.slice(4)])).tolist() == expected
    assert arrow_tie_keys(column.cast(pa.large_string())).tolist() == expected
    assert arrow_tie_keys(pa.array([""] * 3)).tolist() == [reference("")] * 3
    assert len(set(arrow_tie_keys(pa.array([f"g{i:06d}" for i in range(100_000)])).tolist())) == 100_000
