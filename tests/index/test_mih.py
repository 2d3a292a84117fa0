"""Multi-index hashing: exact top-k, identical to brute force (distances and ids, ties by row)."""

from __future__ import annotations

import numpy as np
import pytest

from medret.index.mih import MultiIndex, choose_m, probe_cost, substring_layout
from medret.index.search import topk, topk_reference

FORCE_PROBE = 1 << 60  # a budget no query reaches: every query is answered by probing the tables


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """Codes as BENCHMARKS.md defines them: a random centre with 0-3 distinct random bits flipped."""
    bits = centres.shape[1] * 8
    out = centres[rng.integers(0, len(centres), n)].copy()
    flips = rng.integers(0, 4, n)
    pos = np.argsort(rng.random((n, bits)), axis=1)[:, :3] if n * bits <= 1 << 26 else None
    if pos is None:  # large n: draw three positions per row and redraw the rows where two collide
        pos = rng.integers(0, bits, (n, 3))
        while (bad := (pos[:, 0] == pos[:, 1]) | (pos[:, 0] == pos[:, 2]) | (pos[:, 1] == pos[:, 2])).any():
            pos[bad] = rng.integers(0, bits, (int(bad.sum()), 3))
    for j in range(3):
        r = np.flatnonzero(flips > j)
        out[r, pos[r, j] // 8] ^= (1 << (7 - pos[r, j] % 8)).astype(np.uint8)
    return out


def query_sets(rng: np.random.Generator, db: np.ndarray, fresh: np.ndarray, q: int) -> np.ndarray:
    """Rows of the database, fresh draws from its generator and uniform random codes, q of each."""
    uniform = rng.integers(0, 256, (q, db.shape[1]), dtype=np.uint8)
    return np.concatenate([db[rng.integers(0, len(db), q)], fresh[:q], uniform])


def check(index: MultiIndex, db: np.ndarray, queries: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Every k against one brute-force ranking (a stable sort: the first k of it are the top k).

    Returns, for each k, which queries were answered by the scan rather than the tables.
    """
    ref_i, ref_d = topk_reference(db, queries, max(ks))
    fell = {}
    for k in ks:
        ids, dists, f = index.search_counted(queries, k)
        assert ids.dtype == np.int64 and dists.dtype == np.int32 and ids.shape == dists.shape == (len(queries), k)
        want = min(k, ref_i.shape[1])
        np.testing.assert_array_equal(ids[:, :want], ref_i[:, :want], err_msg=f"ids, k={k}")
        np.testing.assert_array_equal(dists[:, :want], ref_d[:, :want], err_msg=f"distances, k={k}")
        assert (ids[:, want:] == -1).all() and (dists[:, want:] == -1).all()
        fell[k] = f
    return fell


@pytest.mark.parametrize("bits", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_small_databases_all_paths(bits: int, kind: str) -> None:
    rng = np.random.default_rng(bits + len(kind))
    n = 3000
    if kind == "random":
        db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        fresh = rng.integers(0, 256, (8, bits // 8), dtype=np.uint8)
    else:
        centres = rng.integers(0, 256, (2000, bits // 8), dtype=np.uint8)
        db, fresh = clustered(rng, centres, n), clustered(rng, centres, 8)
    queries = query_sets(rng, db, fresh, 8)
    ks = (1, 10, 100, 1000, n + 7)
    # the tables alone (no scan), the default (probing or scanning as cheaper), and the scan alone
    assert not any(f.any() for f in check(MultiIndex.build(db, budget=FORCE_PROBE), db, queries, ks[:-1]).values())
    check(MultiIndex.build(db), db, queries, ks)
    assert all(f.all() for f in check(MultiIndex.build(db, budget=0), db, queries, ks).values())


@pytest.mark.parametrize("m", [2, 3, 5, 7, 32])
def test_any_number_of_tables(m: int) -> None:
    rng = np.random.default_rng(m)
    db = rng.integers(0, 256, (2000, 4), dtype=np.uint8)
    db[100:160] = db[7]
    index = MultiIndex.build(db, m=m, budget=FORCE_PROBE)
    assert index.m == m and index.lens.sum() == 32 and index.lens.max() - index.lens.min() <= 1
    check(index, db, query_sets(rng, db, rng.integers(0, 256, (6, 4), dtype=np.uint8), 6), (1, 10, 100))


@pytest.mark.parametrize(
    ("kind", "n", "bits", "budget"),
    [
        ("random", 200_000, 64, None),
        ("clustered", 200_000, 64, None),
        ("random", 200_000, 64, FORCE_PROBE),
        ("clustered", 200_000, 64, FORCE_PROBE),
        ("clustered", 100_000, 128, None),
    ],
)
def test_large_databases(kind: str, n: int, bits: int, budget: int | None) -> None:
    rng = np.random.default_rng(n + bits + len(kind))
    if kind == "random":
        db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        fresh = rng.integers(0, 256, (10, bits // 8), dtype=np.uint8)
    else:
        centres = rng.integers(0, 256, (2000, bits // 8), dtype=np.uint8)
        db, fresh = clustered(rng, centres, n), clustered(rng, centres, 10)
    index = MultiIndex.build(db, budget=budget)
    if bits == 64:
        assert index.memory_bytes <= 48 * n
    queries = query_sets(rng, db, fresh, 10)
    fell = check(index, db, queries, (1, 10, 100, 1000))
    if kind == "clustered" or budget == FORCE_PROBE:  # near neighbours are found by probing
        assert not fell[10][:20].any()
    # the batch (threads) and one query at a time agree, and match the linear scan
    ids, dists = index.search(queries, 100)
    one = [index.search(q[None], 100) for q in queries[:4]]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in one]), ids[:4])
    np.testing.assert_array_equal(np.concatenate([d for _, d in one]), dists[:4])
    lin_i, lin_d = topk(db, queries, 100)
    np.testing.assert_array_equal(ids, lin_i)
    np.testing.assert_array_equal(dists, lin_d)


def test_heavy_duplicates_and_ties() -> None:
    rng = np.random.default_rng(5)
    db = rng.integers(0, 256, (30_000, 8), dtype=np.uint8)
    db[rng.choice(len(db), 4000, replace=False)] = db[11]  # one code shared by 4,001 rows
    db[rng.choice(len(db), 1500, replace=False)] = db[12] ^ np.uint8(1)  # another, one bit from row 12
    queries = np.concatenate([db[[11, 12, 13]], db[[11]] ^ np.uint8(128), rng.integers(0, 256, (4, 8), np.uint8)])
    for budget in (None, FORCE_PROBE):
        check(MultiIndex.build(db, budget=budget), db, queries, (1, 10, 100, 1000))
    same = np.repeat(db[:1], 5000, axis=0)  # every row alike: one distinct code
    index = MultiIndex.build(same)
    assert index.distinct == 1
    check(index, same, np.concatenate([same[:1], queries]), (1, 10, 1000, 6000))


def test_random_trials() -> None:
    # many small databases: any length, duplicate share, k, tables and budget (probe, scan or either)
    rng = np.random.default_rng(1307)
    for trial in range(60):
        nbytes = int(rng.choice([1, 2, 3, 4, 6, 8, 9, 16]))
        n = int(rng.integers(1, 1500))
        pool = rng.integers(0, 256, (max(1, int(n * rng.choice([0.02, 0.3, 1.0]))), nbytes), dtype=np.uint8)
        db = pool[rng.integers(0, len(pool), n)] ^ (rng.random((n, nbytes)) < rng.choice([0.0, 0.02])).astype(np.uint8)
        queries = np.concatenate([db[rng.integers(0, n, 3)], rng.integers(0, 256, (3, nbytes), dtype=np.uint8)])
        m = int(rng.integers(1, min(nbytes * 8, 12) + 1)) if rng.random() < 0.5 else None
        if m is not None and nbytes * 8 / m > 28:
            m = None
        budget = [None, 0, FORCE_PROBE][trial % 3]
        index = MultiIndex.build(db, m=m, budget=budget)
        k = int(rng.choice([1, 2, 5, 10, 100, 1000, n, n + 3]))
        ref_i, ref_d = topk_reference(db, queries, k)
        ids, dists = index.search(queries, k)
        np.testing.assert_array_equal(ids, ref_i, err_msg=f"trial {trial}: n={n} bytes={nbytes} m={index.m} k={k}")
        np.testing.assert_array_equal(dists, ref_d, err_msg=f"trial {trial}")


def test_tiny_and_empty_databases() -> None:
    empty = MultiIndex.build(np.zeros((0, 8), np.uint8))
    ids, dists = empty.search(np.zeros((3, 8), np.uint8), 5)
    assert ids.shape == (3, 5) and (ids == -1).all() and (dists == -1).all()
    one = np.array([[3, 1]], np.uint8)
    ids, dists = MultiIndex.build(one).search(np.array([[3, 0], [0, 0]], np.uint8), 2)
    assert ids.tolist() == [[0, -1], [0, -1]] and dists.tolist() == [[1, -1], [3, -1]]
    ids, dists = MultiIndex.build(one).search(np.zeros((0, 2), np.uint8), 4)
    assert ids.shape == dists.shape == (0, 4)


def test_bad_input_names_the_value() -> None:
    index = MultiIndex.build(np.zeros((10, 8), np.uint8))
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        index.search(np.zeros((1, 8), np.uint8), 0)
    with pytest.raises(ValueError, match=r"shape \(q, 8\), got uint8 \(1, 4\)"):
        index.search(np.zeros((1, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="packed uint8"):
        MultiIndex.build(np.zeros((10, 8), np.int64))
    with pytest.raises(ValueError, match="m must be between 1 and the code length 64, got 65"):
        substring_layout(64, 65)


def test_m_is_the_cheapest_probing_within_memory() -> None:
    # more codes per bucket and fewer buckets than the paper's log2(n)-bit substrings
    assert [choose_m(64, n) for n in (1_000_000, 10_000_000, 100_000_000, 200_000, 1000, 1)] == [5, 4, 3, 5, 6, 8]
    assert choose_m(128, 1_000_000) == 7 and choose_m(16, 10_000_000) == 1
    assert probe_cost(64, 10_000_000, 4, 10) < min(probe_cost(64, 10_000_000, m, 10) for m in (3, 5))
    starts, lens = substring_layout(64, 3)
    assert starts.tolist() == [0, 21, 42] and lens.tolist() == [21, 21, 22]
