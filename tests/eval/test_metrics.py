"""Metrics against hand-computed cases (../shared/BENCHMARKS.md definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from medret.eval.metrics import (
    average_precision_at_k,
    majority_vote_at_k,
    ndcg_at_k,
    precision_at_k,
    retrieval_metrics,
)


def test_ap_hand_cases() -> None:
    rel = np.array(
        [
            [1, 0, 1, 0, 0],  # (1/1 + 2/3) / 2
            [0, 0, 0, 0, 0],  # no relevant item in the top k -> 0
            [0, 1, 0, 0, 1],  # (1/2 + 2/5) / 2
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_allclose(average_precision_at_k(rel, 5), [5 / 6, 0.0, 0.45, 1.0])
    np.testing.assert_allclose(average_precision_at_k(rel, 2), [1.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(precision_at_k(rel, 5), [0.4, 0.0, 0.4, 1.0])


def test_ndcg_uses_whole_gallery_ideal() -> None:
    # ranked gains [0, 2, 1]; the gallery has three gain-2 items and one gain-1 item
    dcg = 2 / np.log2(3) + 1 / np.log2(4)
    idcg = 2 / np.log2(2) + 2 / np.log2(3) + 2 / np.log2(4)
    got = ndcg_at_k(np.array([[0, 2, 1]]), np.array([[3, 1]]), 3)
    np.testing.assert_allclose(got, [dcg / idcg])
    assert ndcg_at_k(np.array([[0, 0]]), np.array([[0, 0]]), 2)[0] == 0.0


def test_retrieval_metrics_end_to_end_with_ties_and_organs() -> None:
    # gallery: organ 0 classes [0, 0, 1], organ 1 classes [0]
    g_organ = np.array([0, 0, 0, 1])
    g_label = np.array([0, 0, 1, 0])
    # query 0 (organ 0, class 0) ranked [2, 0, 3, 1]; query 1 (organ 1, class 0) ranked [0, 3, 1, 2]
    ranked = np.array([[2, 0, 3, 1], [0, 3, 1, 2]])
    m = retrieval_metrics(
        ranked,
        query_organ=np.array([0, 1]),
        query_label=np.array([0, 0]),
        gallery_organ=g_organ,
        gallery_label=g_label,
        organs=["a", "b"],
        ks=(2, 4),
    )
    # strict relevance: q0 [0,1,0,1] -> AP@4 = (1/2 + 2/4)/2 = 0.5; q1 [0,1,0,0] -> AP@4 = 1/2
    assert m["per_organ"]["a"]["mAP@4"] == pytest.approx(0.5)
    assert m["per_organ"]["b"]["mAP@4"] == pytest.approx(0.5)
    assert m["micro"]["mAP@2"] == pytest.approx((0.5 + 0.5) / 2)
    # organ relevance: q0 [1,1,0,1] -> (1 + 1 + 3/4)/3
    assert m["per_organ"]["a"]["mAP@4 (organ)"] == pytest.approx((1 + 1 + 0.75) / 3)
    # nDCG q0: gains [1,2,0,2], ideal [2,2,1,0]
    disc = 1 / np.log2(np.arange(2, 6))
    expect = (np.array([1, 2, 0, 2]) @ disc) / (np.array([2, 2, 1, 0]) @ disc)
    assert m["per_organ"]["a"]["nDCG@4"] == pytest.approx(expect)
    assert m["macro"]["P@2"] == pytest.approx((0.5 + 0.5) / 2)


def test_padding_in_rankings_counts_as_irrelevant() -> None:
    m = retrieval_metrics(
        np.array([[0, -1, -1]]),
        query_organ=np.array([0]),
        query_label=np.array([1]),
        gallery_organ=np.array([0]),
        gallery_label=np.array([1]),
        organs=["x"],
        ks=(3,),
    )
    assert m["micro"]["mAP@3"] == 1.0 and m["micro"]["P@3"] == pytest.approx(1 / 3)


def test_majority_vote_ties_go_to_best_ranked() -> None:
    labels = np.array([["a", "b", "b", "a"], ["c", "a", "b", "d"], ["x", "y", "y", "y"]])
    np.testing.assert_array_equal(majority_vote_at_k(labels, np.array(["a", "c", "y"]), 4), [1, 1, 1])
    np.testing.assert_array_equal(majority_vote_at_k(labels, np.array(["b", "a", "x"]), 1), [0, 0, 1])


def test_leave_one_out_queries_are_drawn_from_the_whole_part() -> None:
    """The validation score must not read only the first classes of a class-ordered part."""
    from medret.eval.retrieval import leave_one_out_map
    from medret.models.codes import pack_bits

    labels = np.repeat([0, 1], 50)
    bits = np.where(np.arange(16) < 8, 1.0, -1.0)[None].repeat(100, 0)  # every item at class 0's code:
    # a class 1 query ties with everything and meets class 0 first (gallery order), a class 0 query is perfect
    codes = pack_bits(bits)
    score = leave_one_out_map(codes, labels, n_queries=50, k=10)
    assert 0.3 < score < 0.7  # the first 50 (class 0 only) would score 1.0
    assert score == leave_one_out_map(codes, labels, n_queries=50, k=10)  # seeded


def test_leave_one_out_ties_do_not_favour_the_first_classes() -> None:
    """Collapsed codes score the class prior whichever way the part is sorted, as in the benchmark's order."""
    from medret.eval.retrieval import leave_one_out_map
    from medret.models.codes import pack_bits

    codes = pack_bits(np.ones((2000, 16)))  # one code for everything: every neighbour is a tie
    rare_first = np.repeat([0, 1], [200, 1800])
    # ties in class order would score 0.1 sorted this way (rare queries perfect, the rest meet only rare
    # items first) and about 0.9 sorted the other way; in a label-independent order both score what a
    # random ranking scores (about 0.75 here), and the same
    scores = [leave_one_out_map(codes, labels, n_queries=2000, k=100) for labels in (rare_first, rare_first[::-1])]
    assert all(0.65 < s < 0.85 for s in scores) and abs(scores[0] - scores[1]) < 0.05, scores
