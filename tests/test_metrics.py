"""Pure metric functions against hand-computed values."""

import math

import numpy as np
import pytest

from memwatch.signals.buckets import BUCKET_NAMES, bucket_of_count, transition_matrix
from memwatch.signals.entropy import boundary_stats, entropy_profiles
from memwatch.signals.events import memorization_events
from memwatch.signals.extraction import (
    edit_similarity,
    levenshtein,
    match_count,
    match_ratio,
    memorized,
    prefix_match_len,
)


def test_prefix_match_ratio_and_edit_similarity_by_hand():
    g = np.array([[1, 2, 3, 4], [1, 9, 3, 4], [5, 6, 7, 8], [2, 3, 4, 0]])
    s = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    assert prefix_match_len(g, s).tolist() == [4, 1, 0, 0]
    np.testing.assert_allclose(match_ratio(g, s), [1.0, 0.75, 0.0, 0.0])
    # Row 3 skipped the first word and recited the rest: Levenshtein 2 (delete 1, insert 0) -> similarity 0.5,
    # although its match ratio is 0 (Ippolito et al.'s point).
    np.testing.assert_allclose(edit_similarity(g, s), [1.0, 0.75, 0.0, 0.5])


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("abcdef", "azced", 3),
    ],
)
def test_levenshtein_classic_pairs(a, b, d):
    enc = lambda t: np.array([[ord(c) for c in t]], dtype=np.int64).reshape(1, len(t))  # noqa: E731
    assert levenshtein(enc(a), enc(b)).tolist() == [d]


def test_levenshtein_matches_scalar_dp_on_random_rows():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (200, 9))
    b = rng.integers(0, 3, (200, 7))

    def dp(x, y):
        prev = list(range(len(y) + 1))
        for i, xi in enumerate(x, 1):
            cur = [i]
            for j, yj in enumerate(y, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (xi != yj)))
            prev = cur
        return prev[-1]

    assert levenshtein(a, b).tolist() == [dp(x, y) for x, y in zip(a, b, strict=True)]


def test_buckets_follow_chen_et_al_intervals():
    # m = 10: counts 0..10 -> ratios 0, .1, ..., 1
    counts = np.arange(11)
    assert bucket_of_count(counts, 10).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    # A row only counts as exact through `exact`, when given.
    assert bucket_of_count(np.array([10, 9]), 10, np.array([False, True])).tolist() == [4, 5]
    assert BUCKET_NAMES[5] == "exact"


@pytest.mark.parametrize("m", [5, 10, 20, 25, 32, 50])
def test_bucket_edges_land_in_the_bucket_they_close(m):
    """A ratio exactly on an edge (4/20 = 0.2) belongs to the interval it closes ((0, .2] -> bucket 0), for any m:
    checked against exact rational arithmetic, and through the engine's float32 match ratio."""
    from fractions import Fraction

    counts = np.arange(m + 1)
    expected = []
    for c in counts.tolist():
        r = Fraction(c, m)
        if c == m:
            expected.append(5)
        else:
            # (.2 j, .2 (j+1)] -> j, and 0 -> 0
            expected.append(max(0, next(j for j in range(5) if r <= Fraction(j + 1, 5))))
    assert bucket_of_count(counts, m).tolist() == expected
    # The engine's float32 ratio of the same rows gives the same counts, hence the same buckets.
    target = np.zeros((m + 1, m), np.int64)
    generated = np.array([[0] * c + [1] * (m - c) for c in counts.tolist()], np.int64)
    assert match_count(generated, target).tolist() == counts.tolist()
    np.testing.assert_array_equal(match_ratio(generated, target), (counts / m).astype(np.float32))


def test_memorized_threshold():
    ratio = np.array([1.0, 0.9, 0.5])
    exact = np.array([True, False, False])
    count = np.rint(ratio * 10).astype(int)  # m = 10
    assert memorized(count, 10, exact).tolist() == [True, False, False]
    assert memorized(count, 10, exact, 0.9).tolist() == [True, True, False]
    # 18 of 20 tokens is a ratio of 0.9 exactly: memorized at threshold 0.9, though the stored float32 ratio
    # 18/20 is 0.89999998 and a float comparison would say no
    assert float(np.float32(18 / 20)) < 0.9
    assert memorized(np.array([18, 17]), 20, np.zeros(2, bool), 0.9).tolist() == [True, False]


def test_transition_matrix_counts():
    prev = np.array([0, 0, 5, 3, 5])
    cur = np.array([0, 5, 5, 5, 2])
    t = transition_matrix(prev, cur)
    assert t.shape == (6, 6) and t.sum() == 5
    assert t[0, 0] == 1 and t[0, 5] == 1 and t[5, 5] == 1 and t[3, 5] == 1 and t[5, 2] == 1


def test_memorization_events_forgetting_and_rememorization():
    prev = np.array([True, False, True, False, False])
    cur = np.array([True, True, False, True, False])
    ever = np.array([True, False, True, True, False])  # probe 3 was memorized at some earlier evaluation
    ev = memorization_events(prev, cur, ever)
    assert ev["newly"].tolist() == [False, True, False, True, False]
    assert ev["first"].tolist() == [False, True, False, False, False]
    assert ev["rememorized"].tolist() == [False, False, False, True, False]
    assert ev["forgotten"].tolist() == [False, False, True, False, False]
    first = memorization_events(None, cur, np.zeros(5, bool))
    assert first["newly"].tolist() == cur.tolist() and not first["forgotten"].any()


def test_entropy_profiles_and_boundary_jump():
    w = 4
    ent = np.array(
        [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 5, 5, 3, 3], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=float
    )
    buckets = np.array([5, 0, 5])
    prof = entropy_profiles(ent, buckets)
    np.testing.assert_allclose(prof[5], [0.5] * 8)
    pre, post, jump = boundary_stats(prof[0], w, width=2)
    assert (pre, post, jump) == (2.0, 5.0, 3.0)
    # width is capped at w and m
    assert boundary_stats(prof[0], w, width=10)[2] == pytest.approx((5 + 5 + 3 + 3) / 4 - (1 + 1 + 2 + 2) / 4)
    assert all(math.isnan(v) for v in boundary_stats(np.ones(4), 0, 2))


def test_record_buckets_on_edges_for_m_20():
    """Through the record building: 4 of 20 tokens right is the 0-20 bucket, 16 of 20 is 60-80 (float ratios put
    both one bucket too high)."""
    from _records import record_of

    from memwatch.engine.result import ExtractionResult

    m, counts = 20, np.array([4, 8, 12, 16, 19, 20])
    target = np.zeros((len(counts), m), np.int64)
    generated = np.array([[0] * c + [1] * (m - c) for c in counts.tolist()], np.int64)
    n = len(counts)
    res = ExtractionResult(
        prefix_len=4,
        suffix_len=m,
        entropy_window=2,
        mode="full",
        generated=generated,
        exact=counts == m,
        match_ratio=match_ratio(generated, target),
        match_count=match_count(generated, target),
        prefix_match_len=prefix_match_len(generated, target),
        edit_similarity=edit_similarity(generated, target),
        entropy=np.ones((n, 2 + m), np.float32),
        suffix_nll=np.ones(n, np.float32),
        near_tie=np.zeros(n, bool),
    )
    record = record_of(res, ["g"] * n)
    # 4/20 -> 0-20, 8/20 -> 20-40, 12/20 -> 40-60, 16/20 -> 60-80, 19/20 -> 80-99, 20/20 -> exact
    assert record.buckets.tolist() == [0, 1, 2, 3, 4, 5]
    assert record.stats["g"].buckets == [1, 1, 1, 1, 1, 1]
