"""R@K and mAP as DESIGN.md pins them, on rankings worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mga.metrics import DEFAULT_KS, RetrievalMetrics, average_precision, dense_matches, first_match_rank

T, F = True, False

# Depth 5. Query 0: matches at ranks 2 and 4, |P| = 3 (the third positive is below the
# depth). Query 1: match at rank 1, |P| = 1. Query 2: nothing retrieved, |P| = 2.
# Query 3: |P| = 0, excluded.
HAND_MATCHES = np.array(
    [
        [F, T, F, T, F],
        [T, F, F, F, F],
        [F, F, F, F, F],
        [F, F, F, F, F],
    ]
)
HAND_POSITIVES = np.array([3, 1, 2, 0])


def test_first_match_rank_is_one_based_and_zero_without_match():
    assert first_match_rank(HAND_MATCHES).tolist() == [2, 1, 0, 0]


def test_average_precision_by_hand():
    ap = average_precision(HAND_MATCHES, HAND_POSITIVES)
    # (precision@2 + precision@4) / |P| = (1/2 + 2/4) / 3; the unretrieved positive counts as 0.
    assert ap[0] == pytest.approx(1 / 3)
    assert ap[1] == pytest.approx(1.0)
    assert ap[2] == 0.0
    assert np.isnan(ap[3])


def test_average_precision_several_positives_all_retrieved():
    ap = average_precision(np.array([[T, F, T, T]]), np.array([3]))
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_more_matches_than_positives_is_an_error():
    with pytest.raises(ValueError, match="2 matches but only 1 positives"):
        average_precision(np.array([[T, T, F]]), np.array([1]))


def test_recall_and_map_by_hand():
    metrics = RetrievalMetrics(ks=(1, 2, 5, 10))
    metrics.update(HAND_MATCHES, HAND_POSITIVES)
    result = metrics.result()
    assert result["queries"] == 3
    assert result["excluded_queries"] == 1
    assert result["R@1"] == pytest.approx(1 / 3)
    assert result["R@2"] == pytest.approx(2 / 3)
    assert result["R@5"] == pytest.approx(2 / 3)
    assert result["R@10"] == pytest.approx(2 / 3)  # K beyond the depth: nothing more to find
    assert result["mAP"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_default_keys_and_range():
    metrics = RetrievalMetrics()
    metrics.update(HAND_MATCHES, HAND_POSITIVES)
    result = metrics.result()
    assert list(result) == [f"R@{k}" for k in DEFAULT_KS] + ["mAP", "queries", "excluded_queries"]
    assert all(0.0 <= result[key] <= 1.0 for key in list(result)[:-2])


def test_excluded_query_does_not_count_even_when_it_would_hit():
    with_excluded = RetrievalMetrics(ks=(1,))
    with_excluded.update(np.array([[T], [F]]), np.array([1, 1]))
    with_excluded.add(np.array([1]), np.array([np.nan]), np.array([0]))
    result = with_excluded.result()
    assert result["R@1"] == 0.5 and result["mAP"] == 0.5
    assert result["excluded_queries"] == 1


def test_empty_result_is_zero_not_nan():
    result = RetrievalMetrics().result()
    assert result["queries"] == 0 and result["R@1"] == 0.0 and result["mAP"] == 0.0


def test_bad_ks_and_shapes_are_rejected():
    with pytest.raises(ValueError):
        RetrievalMetrics(ks=(0, 1))
    with pytest.raises(ValueError):
        RetrievalMetrics().update(np.zeros(5, dtype=bool), np.ones(5))


def test_dense_matches_pads_short_rankings_and_drops_below_depth():
    # Query 0 has only two ranked rows; query 1 has a match at position 3 (below depth 3).
    block = dense_matches(
        query_index=np.array([0, 0, 1, 1, 1, 1]),
        position=np.array([0, 1, 0, 1, 2, 3]),
        is_match=np.array([F, T, F, F, T, T]),
        num_queries=2,
        depth=3,
    )
    assert block.tolist() == [[F, T, F], [F, F, T]]


def test_blocked_accumulation_equals_one_shot():
    rng = np.random.default_rng(7)
    queries, depth = 503, 40
    is_match = rng.random((queries, depth)) < 0.08
    # |P| at least the retrieved matches, sometimes more (positives below the depth), sometimes 0.
    positives = is_match.sum(axis=1) + rng.integers(0, 3, queries)
    one_shot = RetrievalMetrics()
    one_shot.update(is_match, positives)

    blocked = RetrievalMetrics()
    for start in range(0, queries, 37):
        blocked.update(is_match[start : start + 37], positives[start : start + 37])
    pieces = RetrievalMetrics()
    for start in range(0, queries, 100):
        rows = slice(start, start + 100)
        pieces.add(
            first_match_rank(is_match[rows]), average_precision(is_match[rows], positives[rows]), positives[rows]
        )

    expected = one_shot.result()
    assert expected["excluded_queries"] == int((positives == 0).sum()) > 0
    for result in (blocked.result(), pieces.result()):
        assert result == pytest.approx(expected, rel=1e-12)

    # And against a direct, unvectorised reading of the definitions.
    included = positives > 0
    for k in DEFAULT_KS:
        assert expected[f"R@{k}"] == pytest.approx(is_match[included, :k].any(axis=1).mean())
    aps = []
    for row, count in zip(is_match[included], positives[included], strict=True):
        ranks = np.flatnonzero(row) + 1
        aps.append(sum((i + 1) / rank for i, rank in enumerate(ranks)) / count)
    assert expected["mAP"] == pytest.approx(np.mean(aps))
