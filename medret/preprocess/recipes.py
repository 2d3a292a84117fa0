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
        out.append(Prepared(image, f"#frame={i}" if decoded.frames > 1 else "", meta))
    return out


@RECIPES.register("medmnist")
def medmnist(decoded: Decoded, *, input_size: tuple[int, int] = (28, 28)) -> list[Prepared]:
    """MedMNIST-style: grey, scaled to [0, 1] by the data's bit depth, letterboxed to the input size."""
    frame = decoded.frame(0)
    unit = (
        to_grey(colour_to_unit(frame)) if frame.ndim == 3 else apply_voi(frame, decoded.display, percentiles=(0, 100))
    )
    if frame.ndim == 2 and np.issubdtype(frame.dtype, np.integer):
        unit = (frame.astype(np.float32) / float(np.iinfo(frame.dtype).max)).astype(np.float32)
    image, _ = resize_aspect(unit, input_size)
    return [Prepared(image)]
