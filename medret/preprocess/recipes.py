"""Preprocessing recipes by name: decoded input -> model-ready float32 images in [0, 1] or z-scores.

The encoder's config names its recipe (``EncoderConfig.preprocess``); the indexing
job and the query service both run the recipe the table recorded for each kind
(:meth:`medret.kinds.ReadContext.recipe`), so a query is always preprocessed exactly
as the index was.

A recipe that takes a ``channels`` keyword makes (H, W) grey inputs for ``channels=1``
and (H, W, 3) RGB for ``channels=3`` (grey sources repeated in each channel); the
context passes the encoder's channel count to the recipes that take it
(:func:`takes_option`), and refuses a colour encoder a recipe without it (``mri-brain``:
grey only).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import itemid
from medret.io.base import Decoded
from medret.preprocess.xray import apply_voi, check_channels, colour_to_unit, fit, invert_monochrome1, resize_aspect
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


@functools.lru_cache(maxsize=256)
def _parameters(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params), any(p.kind is p.VAR_KEYWORD for p in params)


def takes_option(recipe: Recipe, option: str) -> bool:
    """Whether ``recipe`` takes the keyword ``option`` (``channels``): only those are given it.

    >>> takes_option(RECIPES.get("wsi-tiles"), "channels"), takes_option(RECIPES.get("mri-brain"), "channels")
    (True, False)
    """
    names, anything = _parameters(recipe)
    return option in names or anything


@takes("image")
@RECIPES.register("xray")
def xray(decoded: Decoded, *, input_size: tuple[int, int] = (224, 224), channels: int = 1) -> list[Prepared]:
    """Window (VOI LUT / window / percentiles), invert MONOCHROME1, letterbox; one input per frame.

    ``channels=1``: grey (colour frames by luma); ``channels=3``: RGB (grey frames in each channel)."""
    check_channels("xray", channels)
    out = []
    for i in range(decoded.frames):
        frame = decoded.frame(i)
        if frame.ndim == 3:
            unit = colour_to_unit(frame)
        else:
            unit = invert_monochrome1(apply_voi(frame, decoded.display), decoded.display.photometric)
        image, spacing = fit(unit, input_size, channels, decoded.spacing)
        meta: dict[str, Any] = {"frame": i} if decoded.frames > 1 else {}
        if spacing:
            meta["spacing_mm"] = [round(s, 5) for s in spacing]
        out.append(Prepared(image, itemid.suffix(frame=i) if decoded.frames > 1 else "", meta))
    return out


def tile_input(rgb: npt.NDArray[Any], input_size: tuple[int, int], channels: int = 1) -> npt.NDArray[np.float32]:
    """A slide tile read at the target mpp -> the model input in [0, 1], letterboxed: grey (H, W) for
    ``channels=1``, RGB (H, W, 3) for ``channels=3`` (H&E kept in colour).

    The indexing job and the query service (a tile uploaded as an image) both call this.
    """
    image, _ = fit(colour_to_unit(rgb), input_size, check_channels("wsi-tiles", channels))
    return image


@takes("image")
@RECIPES.register("medmnist")
def medmnist(decoded: Decoded, *, input_size: tuple[int, int] = (28, 28), channels: int = 1) -> list[Prepared]:
    """MedMNIST-style: scaled to [0, 1] by the data's bit depth, letterboxed to the input size;
    grey for ``channels=1``, RGB for ``channels=3`` (grey images in each channel)."""
    check_channels("medmnist", channels)
    frame = decoded.frame(0)
    if frame.ndim == 3 and channels == 1 and frame.dtype == np.uint8:
        # grey as the benchmark and the .npz trainer make it (BT.601 luma rounded to uint8), so an indexed
        # RGB image (RetinaMNIST) gets the very code its benchmark image gets
        from medret.io.medmnist import to_grey as grey_uint8

        frame = grey_uint8(frame[None])[0]
    if frame.ndim == 3:
        unit = colour_to_unit(frame)
    elif np.issubdtype(frame.dtype, np.integer):
        unit = (frame.astype(np.float32) / float(np.iinfo(frame.dtype).max)).astype(np.float32)
    else:
        unit = apply_voi(frame, decoded.display, percentiles=(0, 100))
    image, _ = fit(unit, input_size, channels)
    return [Prepared(image)]


@takes("volume")
@RECIPES.register("mri-brain")
def mri_brain(volume: Any, *, input_size: tuple[int, int] = (128, 128), template: str = "robex") -> list[Prepared]:
    """The brain recipe (:mod:`medret.preprocess.mri`); one input per axial level in template space.

    Grey only: it takes no ``channels``, so a colour encoder is refused it (:meth:`medret.kinds.ReadContext.recipe`)."""
    from medret.preprocess.mri.recipe import MRIRecipeConfig, describe, load_template, preprocess_brain

    cfg = MRIRecipeConfig(template=template)
    result = preprocess_brain(volume, load_template(cfg.template, cfg.orientation), cfg)
    summary = describe(result)
    # the transform the slices were resampled with and the grid it applies to, recorded once per volume (on
    # its first slice), so its lesion mask is carried into template space by the very same transform later
    registration = {**result.registration.as_dict(), "subject": result.subject.grid.as_dict(), "template": template}
    out = []
    for i, (level, plane) in enumerate(zip(cfg.levels, result.slices, strict=True)):
        image, _ = resize_aspect(plane, input_size)
        meta: dict[str, Any] = {"level": level, "timings_cpu_s": summary["timings_cpu_s"]}
        if i == 0:
            meta["registration"] = registration
        out.append(Prepared(image, itemid.suffix(level=level), meta))
    return out


@takes("tiles")
@RECIPES.register("wsi-tiles")
def wsi_tiles(tiles: Any, *, input_size: tuple[int, int] = (224, 224), channels: int = 1) -> list[Prepared]:
    """Each tile of a :class:`~medret.preprocess.wsi.tiling.SlideTiles` with enough tissue in its own
    pixels -> :func:`tile_input` (grey, or RGB for ``channels=3``); the tile position goes in the suffix."""
    from medret.preprocess.wsi.tissue import tissue_fraction

    check_channels("wsi-tiles", channels)

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
        out.append(Prepared(tile_input(rgb, input_size, channels), itemid.suffix(x=x, y=y), meta))
    return out
