"""A slide's mosaic: deterministic, independent of tile order, small slides whole, caps kept."""

from __future__ import annotations

import numpy as np
import pytest

from medret.errors import ConfigError, SchemaError
from medret.slides.mosaic import MosaicConfig, _capped, select_mosaic

TILE = 224


def slide(rng: np.random.Generator, n: int, nbytes: int = 6, centres: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` tiles at distinct grid places, codes near a few random centres (as tissue types cluster)."""
    side = int(np.ceil(np.sqrt(n * 1.5)))
    place = rng.choice(side * side, n, replace=False)
    xy = np.stack([place % side, place // side], axis=1) * TILE
    c = rng.integers(0, 256, (centres, nbytes), dtype=np.uint8)
    codes = c[rng.integers(0, centres, n)]
    flip = rng.integers(0, nbytes * 8, n)
    codes[np.arange(n), flip // 8] ^= (1 << (7 - flip % 8)).astype(np.uint8)
    return codes, xy


def test_same_tiles_in_any_order_and_on_every_rerun() -> None:
    rng = np.random.default_rng(0)
    for n in (10, 37, 200, 1500):
        codes, xy = slide(rng, n)
        colour = rng.random((n, 3)) * 255
        for config in (MosaicConfig(), MosaicConfig(by="colour"), MosaicConfig(clusters=4, seed=3, fraction=0.2)):
            first = select_mosaic(codes, xy, colour, config)
            np.testing.assert_array_equal(select_mosaic(codes, xy, colour, config), first)
            for _ in range(3):
                p = rng.permutation(n)
                np.testing.assert_array_equal(p[select_mosaic(codes[p], xy[p], colour[p], config)], first)
            assert len(np.unique(first)) == len(first)


def test_small_slides_use_all_their_tiles() -> None:
    rng = np.random.default_rng(1)
    config = MosaicConfig(clusters=9, min_per_cluster=2)
    for n in (1, 2, 17, 18):
        codes, xy = slide(rng, n)
        assert sorted(select_mosaic(codes, xy, config=config).tolist()) == list(range(n))
    codes, xy = slide(rng, 19)
    assert len(select_mosaic(codes, xy, config=config)) < 19


def test_fraction_per_cluster_and_the_cap() -> None:
    rng = np.random.default_rng(2)
    codes, xy = slide(rng, 2000, centres=9)
    uncapped = select_mosaic(codes, xy, config=MosaicConfig(max_per_slide=10_000))
    assert 100 <= len(uncapped) <= 100 + 9  # ceil(5% of each cluster): 5% of all, plus at most one per cluster
    capped = select_mosaic(codes, xy, config=MosaicConfig())
    assert len(capped) == 64
    few = select_mosaic(codes, xy, config=MosaicConfig(max_per_slide=9))
    assert len(few) == 9 and len({bytes(c) for c in codes[few]}) >= 5  # one per cluster: the centres all show


def test_cap_keeps_the_floor_and_shares_the_rest() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        k = int(rng.integers(1, 12))
        floor = rng.integers(1, 3, k)
        wanted = floor + rng.integers(0, 40, k)
        cap = int(floor.sum() + rng.integers(0, 60))
        got = _capped(wanted, floor, cap)
        assert (got >= floor).all() and (got <= wanted).all()
        assert got.sum() == min(cap, wanted.sum())
    np.testing.assert_array_equal(_capped(np.array([5, 5, 3]), np.array([1, 1, 1]), 6), [2, 2, 2])


def test_picks_spread_over_the_slide() -> None:
    xy = np.array([(x, y) for y in range(10) for x in range(10)]) * TILE
    codes = np.zeros((100, 6), np.uint8)  # one cluster: the picks are spread by place alone
    got = select_mosaic(codes, xy, config=MosaicConfig(clusters=1, fraction=0.05))
    places = sorted((int(x) // TILE, int(y) // TILE) for x, y in xy[got])
    assert places == [(0, 0), (0, 9), (4, 4), (9, 0), (9, 9)]  # the tile nearest the centre, then the corners


def test_colour_clusters_find_a_small_stain_region() -> None:
    rng = np.random.default_rng(4)
    codes, xy = slide(rng, 400, centres=1)
    colour = np.tile([230.0, 200.0, 220.0], (400, 1)) + rng.normal(0, 2, (400, 3))
    colour[:10] = [120.0, 60.0, 140.0]  # ten dark tiles
    got = select_mosaic(codes, xy, colour, MosaicConfig(clusters=2, by="colour"))
    assert (got < 10).any()
    ignored = select_mosaic(codes, xy, colour * 0 + rng.random((400, 3)), MosaicConfig(clusters=2))
    np.testing.assert_array_equal(ignored, select_mosaic(codes, xy, config=MosaicConfig(clusters=2)))


def test_bad_config_and_input_name_the_value() -> None:
    with pytest.raises(ConfigError, match="fraction must be in"):
        MosaicConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="max_per_slide=8"):
        MosaicConfig(max_per_slide=8)
    with pytest.raises(ConfigError, match="'texture'"):
        MosaicConfig(by="texture")  # type: ignore[arg-type]
    codes = np.zeros((3, 6), np.uint8)
    with pytest.raises(ConfigError, match="colour"):
        select_mosaic(codes, np.zeros((3, 2)), config=MosaicConfig(by="colour"))
    with pytest.raises(SchemaError, match="xy"):
        select_mosaic(codes, np.zeros((2, 2)))
    with pytest.raises(SchemaError, match="codes"):
        select_mosaic(codes.astype(np.int64), np.zeros((3, 2)))  # type: ignore[arg-type]
