"""Preprocessing recipes by name: decoded input -> model-ready (H, W) float32 images in [0, 1] or z-scores.

The encoder's config names its recipe (``EncoderConfig.preprocess``); the indexing
job and the query service both call :func:`prepare` with it, so a query is always
preprocessed exactly as the index was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import itemid
from medret.io.base import Decoded
from medret.preprocess.xray import apply_voi, colour_to_unit, invert_monochrome1, resize_aspect, to_grey
from medret.registry import Registry


@dataclass(frozen=True)
class Prepared:
    """One model input and what to record about it (frame, slice level, spacing...)."""

    image: npt.NDArray[np.float32]
    suffix: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


Recipe = Callable[..., list[Prepared]]
RECIPES: Registry[list[Prepared]] = Registry("preprocessing recipe")
#: what each recipe takes: "image" (a :class:`Decoded`), "volume" (a :class:`~medret.io.volume.Volume`) or
#: "tiles" (:class:`~medret.preprocess.wsi.tiling.SlideTiles`); a kind may only be given a recipe of its input
RECIPE_INPUTS: dict[str, str] = {}


def takes(what: str) -> Callable[[Recipe], Recipe]:
    """Record what a recipe takes (register it first)."""

    def deco(fn: Recipe) -> Recipe:
        names = [n for n in RECIPES if RECIPES.get(n) is fn]
        for n in names:
            RECIPE_INPUTS[n] = what
        return fn

    return deco


@takes("image")
@RECIPES.register("xray")
def xray(decoded: Decoded, *, input_size: tuple[int, int] = (224, 224)) -> list[Prepared]:
    """Window (VOI LUT / window / percentiles), invert MONOCHROME1, grey, letterbox; one input per frame."""
    out = []
    for i in range(decoded.frames):
        frame = decoded.frame(i)
        if frame.ndim == 3:
            unit = to_grey(colour_to_unit(frame))
        else:
            unit = invert_monochrome1(apply_voi(frame, decoded.display), decoded.display.photometric)
        image, spacing = resize_aspect(unit, input_size, decoded.spacing)
        meta: dict[str, Any] = {"frame": i} if decoded.frames > 1 else {}
        if spacing:
            meta["spacing_mm"] = [round(s, 5) for s in spacing]
        out.append(Prepared(image, itemid.suffix(frame=i) if decoded.frames > 1 else "", meta))
    return out


def tile_input(rgb: npt.NDArray[Any], input_size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """A slide tile read at the target mpp -> the model input: grey in [0, 1], letterboxed.

    The indexing job and the query service (a tile uploaded as an image) both call this.
    """
    image, _ = resize_aspect(to_grey(colour_to_unit(rgb)), input_size)
    return image


@takes("image")
@RECIPES.register("medmnist")
def medmnist(decoded: Decoded, *, input_size: tuple[int, int] = (28, 28)) -> list[Prepared]:
    """MedMNIST-style: grey, scaled to [0, 1] by the data's bit depth, letterboxed to the input size."""
    frame = decoded.frame(0)
    if frame.ndim == 3:
        unit = to_grey(colour_to_unit(frame))
    elif np.issubdtype(frame.dtype, np.integer):
        unit = (frame.astype(np.float32) / float(np.iinfo(frame.dtype).max)).astype(np.float32)
    else:
        unit = apply_voi(frame, decoded.display, percentiles=(0, 100))
    image, _ = resize_aspect(unit, input_size)
    return [Prepared(image)]


@takes("volume")
@RECIPES.register("mri-brain")
def mri_brain(volume: Any, *, input_size: tuple[int, int] = (128, 128), template: str = "robex") -> list[Prepared]:
    """The brain recipe (:mod:`medret.preprocess.mri`); one input per axial level in template space."""
    from medret.preprocess.mri.recipe import MRIRecipeConfig, describe, load_template, preprocess_brain

    cfg = MRIRecipeConfig(template=template)
    result = preprocess_brain(volume, load_template(cfg.template, cfg.orientation), cfg)
    summary = describe(result)
    out = []
    for level, plane in zip(cfg.levels, result.slices, strict=True):
        image, _ = resize_aspect(plane, input_size)
        out.append(
            Prepared(image, itemid.suffix(level=level), {"level": level, "timings_cpu_s": summary["timings_cpu_s"]})
        )
    return out


@takes("tiles")
@RECIPES.register("wsi-tiles")
def wsi_tiles(tiles: Any, *, input_size: tuple[int, int] = (224, 224)) -> list[Prepared]:
    """Each tile of a :class:`~medret.preprocess.wsi.tiling.SlideTiles` with enough tissue in its own
    pixels -> grey in [0, 1], letterboxed to the input size; the tile position goes in the suffix."""
    from medret.preprocess.wsi.tissue import tissue_fraction

    t = tiles.tiling
    floor = t.min_tissue if tiles.min_tissue is None else tiles.min_tissue
    out = []
    for x, y, planned in tiles.positions:
        rgb = tiles.read(x, y)
        frac = tissue_fraction(rgb)
        if frac < floor:
            continue  # background after all
        meta = {"modality": "SM", "slide_id": tiles.slide_id, "tile_x": x, "tile_y": y, "mpp": t.mpp}
        meta["tissue"] = round(min(frac, planned), 4)
        out.append(Prepared(tile_input(rgb, input_size), itemid.suffix(x=x, y=y), meta))
    return out
