"""The lesion grid of the real template, the coverage rule, sketches, regions and Dice from Hamming."""

from __future__ import annotations

import numpy as np
import pytest

from medret.errors import ConfigError, DataError, UnknownNameError
from medret.sketch import raster, regions
from medret.sketch.encoder import LESION_ENCODERS, RasterEncoder, create_lesion_encoder, load_grid
from medret.sketch.grid import LesionGridConfig, TemplateGrid
from medret.sketch.score import best_per_patient, dice_reference, dice_scores, rank_slices, to_columns


@pytest.fixture(scope="module")
def tg() -> TemplateGrid:
    return load_grid(LesionGridConfig())


def ball(tg: TemplateGrid, centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """A ball lesion (label 1) on the reference grid, centre in template mm (LPS)."""
    z, y, x = np.ogrid[: tg.ref.array.shape[0], : tg.ref.array.shape[1], : tg.ref.array.shape[2]]
    ox, oy, oz = tg.ref.origin
    d2 = (x + ox - centre_mm[0]) ** 2 + (y + oy - centre_mm[1]) ** 2 + (z + oz - centre_mm[2]) ** 2
    return (d2 <= radius_mm**2).astype(np.int16)


def test_the_grid_covers_the_brain_in_4_mm_levels(tg: TemplateGrid) -> None:
    d = tg.describe()
    assert d["grid"] == 32 and tg.height % 32 == 0 and tg.width % 32 == 0
    zs = np.flatnonzero(tg.brain.any(axis=(1, 2)))
    assert tg.z0 == zs[0] and tg.n_levels == (zs[-1] - zs[0] + 1) // 4 and tg.n_levels >= 25
    assert np.diff([lv["z_mm"] for lv in d["levels"]]) == pytest.approx(4.0)
    boxed = tg.box(tg.brain)
    assert boxed.sum() == tg.brain.sum(), "the box must hold the whole brain"
    # mirror axis = the brain's midline: the template brain is nearly symmetric about it
    mirrored = boxed[:, :, ::-1]
    assert (boxed & mirrored).sum() / boxed.sum() > 0.9


def test_level_out_of_range_names_the_range(tg: TemplateGrid) -> None:
    with pytest.raises(ConfigError, match=rf"level must be in 0\.\.{tg.n_levels - 1}.*got 99"):
        tg.slab(99)


def test_coverage_rule() -> None:
    cfg = LesionGridConfig(grid=8)
    m = np.zeros((16, 16))
    m[0:2, 0:2] = 1  # one whole cell
    m[2:4, 2] = 1  # half a cell
    m[4, 4] = 1  # a quarter
    bits = raster.bits_of(raster.cell_coverage(m, 8), cfg)
    assert bits.sum() == 2 and bits[0, 0] and bits[1, 1] and not bits[2, 2]
    small = np.zeros((16, 16))
    small[4, 4] = 1  # no cell half full: the fullest one is kept (0.25 >= min_coverage)
    assert raster.bits_of(raster.cell_coverage(small, 8), cfg).sum() == 1
    tiny = np.zeros((4, 16, 16))
    tiny[0, 4, 4] = 1  # 1/16 of one cell-slab: below min_coverage, dropped
    assert raster.bits_of(raster.cell_coverage(tiny, 8), cfg).sum() == 0
    code = raster.pack(bits)
    assert code.shape == (8,) and (raster.unpack(code, 8) == bits).all()


@pytest.mark.parametrize("bad", [{"grid": 10}, {"coverage": 0.05}, {"level_mm": 0}, {"labels": ((1, "a"), (2, "a"))}])
def test_bad_grid_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        LesionGridConfig(**bad)


def test_config_round_trips_through_its_dict() -> None:
    cfg = LesionGridConfig(labels=((1, "necrotic"), (2, "edema"), (4, "enhancing")))
    assert LesionGridConfig.from_dict(cfg.as_dict()) == cfg


def test_sketch_errors_name_the_input(tg: TemplateGrid) -> None:
    with pytest.raises(DataError, match=r"sketch\[edema\]: a sketch mask must be a 2-D image"):
        raster.to_box(np.zeros((2, 3, 4, 5)), tg, name="sketch[edema]")
    with pytest.raises(DataError, match="must cover the template box"):
        raster.to_box(np.zeros((100, 300)), tg)
    with pytest.raises(DataError, match="at least 32x32"):
        raster.to_box(np.zeros((16, 16)), tg)
    with pytest.raises(DataError, match="marks no lesion"):
        raster.sketch_bits(np.zeros((tg.height, tg.width)), tg)
    with pytest.raises(DataError, match="polygon 0"):
        raster.polygons_to_box([[(0, 0), (1, 1)]], tg)


def test_a_sketch_at_another_resolution_gives_the_same_bits(tg: TemplateGrid) -> None:
    m = np.zeros((tg.height, tg.width))
    m[60:96, 30:72] = 1
    from PIL import Image

    half = np.asarray(
        Image.fromarray((m * 255).astype(np.uint8)).resize((tg.width // 2, tg.height // 2), Image.Resampling.NEAREST)
    )
    assert (raster.sketch_bits(raster.to_box(half, tg), tg) == raster.sketch_bits(m, tg)).all()


def test_a_polygon_in_mm_lands_on_the_stored_lesion(tg: TemplateGrid) -> None:
    """A square drawn in template mm around a ball's centre hits the same cells as the ball does."""
    enc = RasterEncoder(tg)
    centre = (30.0, -20.0, tg.level_mm(15))
    rows = enc.encode_volume(ball(tg, centre, 12.0))
    at = next(s for s in rows if s.level == 15)
    assert at.hemisphere == "left" and np.allclose(at.centroid_mm, centre, atol=1.0)
    x, y = centre[0], centre[1]
    r = 12.0 * np.sqrt(np.pi) / 2  # a square of the disc's area
    box = raster.polygons_to_box([[(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]], tg)
    q = enc.encode_sketch(box, 15)
    assert dice_reference(at.code[None], q.code)[0] > 0.7
    assert q.profile.argmax() == at.profile.argmax()


def test_regions_split_hemispheres_and_lobes(tg: TemplateGrid) -> None:
    enc = RasterEncoder(tg)
    names = regions.NAMES
    frontal_left = ball(tg, (35.0, -50.0, tg.level_mm(20)), 8.0).astype(bool)
    p = regions.profile(frontal_left, enc.regions)
    assert names[int(p.argmax())] == "left_frontal"
    mirrored = ball(tg, (-35.0 + 2 * (tg.ref.origin[0] + tg.x0 + tg.width / 2 - 0.5), -50.0, tg.level_mm(20)), 8.0)
    assert names[int(regions.profile(mirrored.astype(bool), enc.regions).argmax())] == "right_frontal"
    assert regions.overlap(p, p[None])[0] == pytest.approx(1.0)


def test_the_registry_lists_its_encoders() -> None:
    assert "raster" in LESION_ENCODERS
    with pytest.raises(UnknownNameError, match="known: raster"):
        create_lesion_encoder(LesionGridConfig(encoder="learned"))


def test_dice_from_hamming_equals_numpy_dice_and_its_ranking() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    codes = np.packbits(rng.random((n, 1024)) < rng.uniform(0.001, 0.2, (n, 1)), axis=1)
    codes[codes.sum(axis=1) == 0, 0] = 1
    codes[100:110] = codes[7]  # ties
    query = np.packbits(rng.random(1024) < 0.05)
    pop = np.unpackbits(codes, axis=1).sum(axis=1).astype(np.int64)
    rows = np.arange(n, dtype=np.int64)
    got = dice_scores(to_columns(codes), pop, rows, query)
    ref = dice_reference(codes, query)
    np.testing.assert_array_equal(got, ref)
    order = rank_slices(got, rows)
    ref_order = sorted(range(n), key=lambda i: (-ref[i], i))
    assert order.tolist() == ref_order
    sub = rows[::3]
    np.testing.assert_array_equal(dice_scores(to_columns(codes), pop, sub, query), ref[::3])


def test_best_slice_per_patient() -> None:
    scores = np.array([0.2, 0.9, 0.8, 0.7, 0.9])
    rows = np.arange(5)
    patients = np.array(["a", "b", "a", "c", "b"], dtype=object)
    hits = best_per_patient(rank_slices(scores, rows), rows, scores, scores, patients, 10)
    assert [(h.patient, h.row) for h in hits] == [("b", 1), ("a", 2), ("c", 3)]
    pooled = best_per_patient(rank_slices(scores, rows), rows, scores, scores, patients, 10, slice_pool=2)
    assert [h.patient for h in pooled] == ["b"]
