"""Rasterise a lesion onto the grid of a level: coverage per cell -> bits -> a packed code.

Pure array work. A stored lesion is a 3-D slab (``level_mm`` planes over the box); a sketch is
one 2-D plane over the box, at any resolution of at least one pixel per cell (it is resized
to the box by area first). See :class:`~medret.sketch.grid.LesionGridConfig` for the coverage rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import DataError
from medret.sketch.grid import LesionGridConfig, TemplateGrid


def cell_coverage(planes: npt.NDArray[Any], grid: int) -> npt.NDArray[np.float64]:
    """(..., H, W) masks (H, W multiples of ``grid``) -> (grid, grid) fraction of each cell that is lesion,
    averaged over the leading axes (the planes of a slab)."""
    m = np.asarray(planes, np.float64)
    h, w = m.shape[-2:]
    if h % grid or w % grid:
        raise DataError(f"mask planes of {h}x{w} pixels do not split into a {grid}x{grid} grid")
    m = m.reshape(-1, grid, h // grid, grid, w // grid)
    return np.asarray(m.mean(axis=(0, 2, 4)), np.float64)


def bits_of(coverage: npt.NDArray[np.float64], config: LesionGridConfig) -> npt.NDArray[np.bool_]:
    """The coverage rule: cells at least ``coverage`` full; else the fullest cell if it reaches ``min_coverage``."""
    on = coverage >= config.coverage
    if not on.any() and coverage.max(initial=0.0) >= config.min_coverage:
        on.flat[int(np.argmax(coverage))] = True
    return np.asarray(on, bool)


def pack(bits: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """(grid, grid) bits -> packed code (grid*grid/8,) uint8, row-major, numpy.packbits order."""
    return np.packbits(np.asarray(bits, bool).ravel())


def unpack(code: npt.NDArray[np.uint8], grid: int) -> npt.NDArray[np.bool_]:
    return np.unpackbits(np.asarray(code, np.uint8), count=grid * grid).astype(bool).reshape(grid, grid)


def to_box(mask: npt.NDArray[Any], tg: TemplateGrid, *, name: str = "sketch") -> npt.NDArray[np.float64]:
    """A 2-D sketch over the box at any resolution -> (height, width) fraction per box pixel.

    The sketch must cover the box exactly (the template PNG of a level is one such image): its
    aspect ratio must match the box's within 2%, and it needs at least one pixel per cell.
    """
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 2, 3, 4):  # an image: use its first channel, or alpha if any
        m = m[..., -1] if m.shape[-1] in (2, 4) else m[..., 0]
    if m.ndim != 2:
        raise DataError(f"{name}: a sketch mask must be a 2-D image, got shape {tuple(np.shape(mask))}")
    g = tg.config.grid
    h, w = m.shape
    if h < g or w < g:
        raise DataError(f"{name}: a sketch mask needs at least {g}x{g} pixels (one per cell), got {h}x{w}")
    if abs((h / w) / (tg.height / tg.width) - 1) > 0.02:
        raise DataError(
            f"{name}: a sketch mask must cover the template box ({tg.height}x{tg.width} px, "
            f"aspect {tg.height / tg.width:.3f}), got {h}x{w} (aspect {h / w:.3f})"
        )
    m = np.asarray(m > 0, np.float64)
    if (h, w) == (tg.height, tg.width):
        return m
    from PIL import Image

    img = Image.fromarray(m.astype(np.float32), mode="F").resize((tg.width, tg.height), Image.Resampling.BOX)
    return np.asarray(img, np.float64)


def polygons_to_box(polygons: Sequence[Sequence[Sequence[float]]], tg: TemplateGrid) -> npt.NDArray[np.float64]:
    """Polygons of (x, y) points in template millimetres (LPS) -> a filled (height, width) box mask."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (tg.width, tg.height), 0)
    draw = ImageDraw.Draw(img)
    for i, poly in enumerate(polygons):
        pts = np.asarray(poly, float)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
            raise DataError(f"polygon {i} must be at least 3 finite (x, y) points in template mm, got {pts.shape}")
        rows, cols = tg.mm_pixel(pts[:, 0], pts[:, 1])
        draw.polygon([(float(c), float(r)) for r, c in zip(rows, cols, strict=True)], fill=1)
    return np.asarray(img, np.float64)


def sketch_bits(box_mask: npt.NDArray[np.float64], tg: TemplateGrid, *, name: str = "sketch") -> npt.NDArray[np.bool_]:
    """A (height, width) box mask -> (grid, grid) bits; a sketch that sets no bit is an error."""
    bits = bits_of(cell_coverage(box_mask, tg.config.grid), tg.config)
    if not bits.any():
        raise DataError(
            f"{name}: the sketch marks no lesion on the {tg.config.grid}x{tg.config.grid} grid "
            f"(a cell counts when {tg.config.coverage:.0%} of it is drawn); draw a larger lesion"
        )
    return bits
