"""Bag-to-bag matching: every kernel against a plain numpy reference, in any tile order."""

from __future__ import annotations

import numpy as np
import pytest

from medret.slides.match import (
    BagGallery,
    _could_reach,
    best_tiles,
    candidates,
    majority_code,
    median_min,
    prefilter,
    rank,
    search,
    symmetric,
    top_median_min,
    vote,
)

BITS = (16, 48, 64, 128)


def distances(q: np.ndarray, bag: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances (m, n), counted on unpacked bits."""
    return (np.unpackbits(q, axis=1)[:, None, :] != np.unpackbits(bag, axis=1)[None, :, :]).sum(axis=2)


def ref_median_min(q: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
    return np.array([np.median(distances(q, b).min(axis=1)) for b in bags])


def ref_symmetric(q: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
    return np.array(
        [(np.median(distances(q, b).min(axis=1)) + np.median(distances(q, b).min(axis=0))) / 2 for b in bags]
    )


def ref_vote(q: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
    per_slide = np.array([distances(q, b).min(axis=1) for b in bags])  # (slides, query codes)
    nearest = distances(q, np.concatenate(bags)).min(axis=1)
    return (len(q) - (per_slide == nearest).sum(axis=1)).astype(np.float64)


def ref_rank(d: np.ndarray, ids: list[str], k: int) -> list[int]:
    return sorted(range(len(d)), key=lambda s: (d[s], ids[s]))[:k]


def random_set(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], int]:
    """A query bag and a gallery of bags, 1-12 codes each; half the sets draw from a small pool (ties)."""
    bits = int(rng.choice(BITS))
    nbytes = bits // 8
    pool = rng.integers(0, 256, (int(rng.integers(2, 6)), nbytes), dtype=np.uint8)

    def bag() -> np.ndarray:
        n = int(rng.integers(1, 13))
        if rng.random() < 0.5:
            return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
        out = pool[rng.integers(0, len(pool), n)]  # copies of a few codes; half of them get one bit flipped
        flip = rng.integers(0, bits, n)
        for r in np.flatnonzero(rng.random(n) < 0.5):
            out[r, flip[r] // 8] ^= np.uint8(1 << (7 - flip[r] % 8))
        return out

    return bag(), [bag() for _ in range(int(rng.integers(1, 9)))], bits


def shuffled(rng: np.random.Generator, bag: np.ndarray) -> np.ndarray:
    return bag[rng.permutation(len(bag))]


def test_kernels_equal_reference_on_1000_sets_in_any_tile_order() -> None:
    rng = np.random.default_rng(20)
    seen_bits, seen_even = set(), set()
    for _ in range(1000):
        q, bags, bits = random_set(rng)
        seen_bits.add(bits)
        seen_even.add(len(q) % 2)
        ids = [f"s{rng.integers(1000):03d}-{i}" for i in range(len(bags))]
        want = {"median_min": ref_median_min(q, bags), "symmetric": ref_symmetric(q, bags), "vote": ref_vote(q, bags)}
        for qq, gallery_bags in ((q, bags), (shuffled(rng, q), [shuffled(rng, b) for b in bags])):
            g = BagGallery.build(gallery_bags, ids)
            got = {"median_min": median_min(qq, g), "symmetric": symmetric(qq, g), "vote": vote(qq, g)}
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        for name in want:  # the shuffled gallery: ranks and distances as the reference ranks them
            hits = search(qq, g, 3, method=name)  # type: ignore[arg-type]
            top = ref_rank(want[name], ids, 3)
            assert [(h.position, h.distance) for h in hits] == [(s, want[name][s]) for s in top]
    assert seen_bits == set(BITS) and seen_even == {0, 1}


def test_pruned_top_k_equals_the_full_ranking() -> None:
    """Sketch bounds never drop a slide within reach, so scoring only the slides they allow loses nothing."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        bits = int(rng.choice(BITS))
        centres = rng.integers(0, 256, (12, bits // 8), dtype=np.uint8)
        bags = []
        for _ in range(int(rng.integers(1, 120))):  # slides of 1-40 codes near 1-4 of a few centres
            n = int(rng.integers(1, 41))
            own = rng.choice(12, int(rng.integers(1, 5)), replace=False)
            bag = centres[own[rng.integers(0, len(own), n)]]
            flip = rng.integers(0, bits, n)
            bag[np.arange(n), flip // 8] ^= (1 << (7 - flip % 8)).astype(np.uint8)
            bags.append(bag)
        ids = [f"{rng.integers(10**6):06d}-{i}" for i in range(len(bags))]
        g = BagGallery.build(bags, ids)
        assert (g.sketch_offsets[1:] - g.sketch_offsets[:-1] <= 8).all()
        q = bags[int(rng.integers(len(bags)))][: int(rng.integers(1, 41))] if trial % 2 else random_set(rng)[0]
        q = q if q.shape[1] == bits // 8 else rng.integers(0, 256, (int(rng.integers(1, 30)), bits // 8), np.uint8)
        want = ref_median_min(q, bags)
        for tau in (0.0, 1.5, float(np.median(want)), float(want.max())):
            assert _could_reach(q, g, tau)[want <= tau].all()  # never drops a slide that is within tau
        for k in (1, 5, 70, 200):
            pos, dist = top_median_min(q, g, k)
            assert pos.tolist() == ref_rank(want, ids, k)
            np.testing.assert_array_equal(dist, want[pos])
            full = search(q, g, k, prune=False)
            assert [h.position for h in search(q, g, k)] == [h.position for h in full] == pos.tolist()


def test_slide_subsets_and_one_code_bags() -> None:
    rng = np.random.default_rng(1)
    bags = [rng.integers(0, 256, (1, 6), dtype=np.uint8) for _ in range(20)]
    g = BagGallery.build(bags, [str(i) for i in range(20)])
    q = rng.integers(0, 256, (1, 6), dtype=np.uint8)
    full = median_min(q, g)
    np.testing.assert_array_equal(full, ref_median_min(q, bags))
    pick = np.array([7, 3, 3, 19])
    np.testing.assert_array_equal(median_min(q, g, slides=pick), full[pick])
    np.testing.assert_array_equal(symmetric(q, g, slides=pick), ref_symmetric(q, bags)[pick])
    assert median_min(q[0], g).shape == (20,)  # a single code (bytes,) is a one-code bag


def test_evidence_is_the_nearest_tile_lowest_position_on_ties() -> None:
    bag = np.array([[0b1111], [0b0001], [0b0011], [0b0001]], np.uint8)
    g = BagGallery.build([bag], ["a"])
    tiles, d = best_tiles(np.array([[0b0001], [0b1110], [0b0010]], np.uint8), g, 0)
    assert tiles.tolist() == [1, 0, 2] and d.tolist() == [0, 1, 1]
    hit = search(np.array([[0b0001]], np.uint8), g, 1)[0]
    assert hit.slide_id == "a" and hit.tiles.tolist() == [1] and hit.tile_distances.tolist() == [0]


def test_evidence_matches_reference() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        q, bags, _ = random_set(rng)
        g = BagGallery.build(bags, [str(i) for i in range(len(bags))])
        for s, b in enumerate(bags):
            d = distances(q, b)
            tiles, td = best_tiles(q, g, s)
            np.testing.assert_array_equal(tiles, d.argmin(axis=1))
            np.testing.assert_array_equal(td, d.min(axis=1))
            np.testing.assert_array_equal(g.bag(s), b)


def test_rank_ties_by_id_string_order() -> None:
    d = np.array([1.0, 0.5, 1.0, 1.0, 0.5])
    ids = ["b", "z", "a", "c10", "c9"]
    assert rank(d, ids, 5).tolist() == [4, 1, 2, 0, 3]
    assert rank(d, ids, 2).tolist() == [4, 1]
    assert rank(d, ids, 9).tolist() == [4, 1, 2, 0, 3]
    assert rank(d, ids, 0).tolist() == []
    rng = np.random.default_rng(3)
    for _ in range(100):
        d = rng.integers(0, 4, 30) / 2
        ids = [f"{rng.integers(10**6)}" for _ in range(30)]
        k = int(rng.integers(1, 31))
        assert rank(d, ids, k).tolist() == ref_rank(d, ids, k)


def test_majority_code_and_gallery_majority() -> None:
    rng = np.random.default_rng(4)
    for bits in BITS:
        bags = [rng.integers(0, 256, (int(rng.integers(1, 10)), bits // 8), dtype=np.uint8) for _ in range(30)]
        g = BagGallery.build(bags, [str(i) for i in range(30)])
        for s, b in enumerate(bags):
            ones = np.unpackbits(b, axis=1).sum(axis=0)
            want = np.packbits(ones * 2 > len(b))  # an exact half is 0
            np.testing.assert_array_equal(majority_code(b), want)
            np.testing.assert_array_equal(g.majority[s].view(np.uint8)[: bits // 8], want)
    assert majority_code(np.array([[0b10000000], [0b00000000]], np.uint8)).tolist() == [0]


def test_prefilter_with_every_slide_is_exact() -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        q, bags, _ = random_set(rng)
        ids = [f"slide-{i}" for i in rng.permutation(len(bags))]
        g = BagGallery.build(bags, ids)
        exact = median_min(q, g)
        for by in ("majority", "median"):
            cand, d = prefilter(q, g, len(bags) + int(rng.integers(0, 3)), by=by)  # type: ignore[arg-type]
            assert sorted(cand.tolist()) == list(range(len(bags)))
            np.testing.assert_array_equal(d, exact[cand])
            hits = search(q, g, 4, prefilter_n=len(bags), prefilter_by=by)  # type: ignore[arg-type]
            assert [h.position for h in hits] == ref_rank(exact, ids, 4)


def test_candidates_rank_majority_codes() -> None:
    rng = np.random.default_rng(6)
    bags = [rng.integers(0, 256, (int(rng.integers(1, 8)), 6), dtype=np.uint8) for _ in range(60)]
    ids = [f"{i:02d}" for i in range(60)]
    g = BagGallery.build(bags, ids)
    q = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    maj = np.array([majority_code(b) for b in bags])
    by_majority = distances(majority_code(q)[None, :], maj)[0].astype(np.float64)
    by_median = np.median(distances(q, maj), axis=0)
    assert candidates(q, g, 10, by="majority").tolist() == ref_rank(by_majority, ids, 10)
    assert candidates(q, g, 10, by="median").tolist() == ref_rank(by_median, ids, 10)


def test_bad_input_is_refused_with_the_reason() -> None:
    one = np.zeros((1, 6), np.uint8)
    with pytest.raises(ValueError, match="distinct"):
        BagGallery.build([one, one], ["a", "a"])
    with pytest.raises(ValueError, match="empty bags"):
        BagGallery.build([one, np.zeros((0, 6), np.uint8)], ["a", "b"])
    with pytest.raises(ValueError, match="2 bags for 1"):
        BagGallery.build([one, one], ["a"])
    g = BagGallery.build([one], ["a"])
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        median_min(np.zeros((2, 8), np.uint8), g)
    with pytest.raises(ValueError, match="empty"):
        median_min(np.zeros((0, 6), np.uint8), g)
    with pytest.raises(ValueError, match="vote"):
        search(one, g, 1, method="vote", prefilter_n=5)
    with pytest.raises(ValueError, match="method must be one of"):
        search(one, g, 1, method="nearest")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        median_min(one, g, slides=[1])


def test_memory_counts_the_codes() -> None:
    g = BagGallery.build([np.zeros((64, 6), np.uint8)] * 10, [str(i) for i in range(10)])
    assert g.memory_bytes >= 640 * 8 and len(g) == 10
