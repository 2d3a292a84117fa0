"""Lesion encoders: a template-space label volume -> one code per (level, class); a sketch -> a code.

Registered by name like the image encoders (``LESION_ENCODERS``); the lesion table records the
config, and :func:`create_lesion_encoder` rebuilds the same encoder from it, so a learned lesion
encoder can replace the rasteriser behind the same API.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import numpy.typing as npt

from medret.registry import Registry
from medret.sketch import raster, regions
from medret.sketch.grid import LesionGridConfig, TemplateGrid, template_grid


@dataclass(frozen=True)
class LesionSlice:
    """One lesion class at one level of the template: its code and what describes it."""

    level: int
    level_mm: float
    cls: str
    code: npt.NDArray[np.uint8]
    bits: int
    area_mm2: float  # mean lesion area over the slab's planes
    centroid_mm: tuple[float, float, float]  # LPS, template space
    hemisphere: str  # right | left | both
    profile: npt.NDArray[np.float32]  # fractions over regions.NAMES


class LesionEncoder(Protocol):
    grid: TemplateGrid

    def encode_volume(self, labels: npt.NDArray[np.int16]) -> list[LesionSlice]: ...

    def encode_sketch(self, box_mask: npt.NDArray[np.float64], level: int, *, name: str = "sketch") -> LesionSlice: ...


LESION_ENCODERS: Registry[LesionEncoder] = Registry("lesion encoder")


def hemisphere(left_fraction: float) -> str:
    return "left" if left_fraction >= 0.9 else "right" if left_fraction <= 0.1 else "both"


@LESION_ENCODERS.register("raster")
class RasterEncoder:
    """The coverage-rule rasteriser of :mod:`medret.sketch.raster` (no learning)."""

    def __init__(self, grid: TemplateGrid) -> None:
        self.grid = grid
        self.regions = region_map_of(grid)
        self.midline = grid.x0 + grid.width / 2.0 - 0.5  # column index of the box's mirror axis

    def describe(self, level: int, cls: str, slab: npt.NDArray[np.bool_], bits: npt.NDArray[np.bool_]) -> LesionSlice:
        tg = self.grid
        s = tg.slab(level)
        z, y, x = np.nonzero(slab)
        ox, oy, oz = tg.ref.origin
        centroid = (
            (float(ox + x.mean()), float(oy + y.mean()), float(oz + s.start + z.mean())) if z.size else (0.0,) * 3
        )
        left = float((x > self.midline).mean()) if x.size else 0.0
        return LesionSlice(
            level=level,
            level_mm=tg.level_mm(level),
            cls=cls,
            code=raster.pack(bits),
            bits=int(bits.sum()),
            area_mm2=float(slab.sum()) / slab.shape[0],
            centroid_mm=centroid,
            hemisphere=hemisphere(left),
            profile=regions.profile(slab, self.regions[s]),
        )

    def encode_volume(self, labels: npt.NDArray[np.int16]) -> list[LesionSlice]:
        tg = self.grid
        out = []
        for value, cls in tg.config.labels:
            lesion = labels == value
            if not lesion.any():
                continue
            for level in range(tg.n_levels):
                slab = lesion[tg.slab(level)]
                if not slab.any():
                    continue
                bits = raster.bits_of(raster.cell_coverage(tg.box(slab), tg.config.grid), tg.config)
                if bits.any():
                    out.append(self.describe(level, cls, slab, bits))
        return out

    def encode_sketch(self, box_mask: npt.NDArray[np.float64], level: int, *, name: str = "sketch") -> LesionSlice:
        tg = self.grid
        bits = raster.sketch_bits(box_mask, tg, name=name)
        plane = np.zeros(tg.ref.array.shape[1:], bool)
        plane[tg.y0 : tg.y0 + tg.height, tg.x0 : tg.x0 + tg.width] = box_mask >= 0.5
        slab = np.broadcast_to(plane, (tg.config.level_mm, *plane.shape))
        return self.describe(tg.check_level(level), "", slab, bits)


def region_map_of(tg: TemplateGrid) -> npt.NDArray[np.int8]:
    return regions.region_map(tg.brain, tg.x0 + tg.width / 2.0 - 0.5)


@lru_cache(maxsize=4)
def load_grid(config: LesionGridConfig, data_root: str = "") -> TemplateGrid:
    """The (cached) grid of the config's template, loaded the way the MRI recipe loads it."""
    from medret.preprocess.mri.recipe import load_template

    t = load_template(config.template, "LPS", data_root)
    return template_grid(t.image, t.mask, config)


def create_lesion_encoder(config: LesionGridConfig, data_root: str = "") -> LesionEncoder:
    return LESION_ENCODERS.get(config.encoder)(load_grid(config, data_root))
