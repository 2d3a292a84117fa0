"""A slide and its tiling -> tile positions over tissue -> tiles read lazily at a target mpp."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import Field

from medret.config import Frozen
from medret.errors import ConfigError
from medret.io.wsi import Slide
from medret.preprocess.wsi.tissue import tissue_fraction, tissue_mask


@dataclass(frozen=True)
class TileSpec:
    x: int  # level-0 column of the top-left corner
    y: int  # level-0 row
    extent: int  # side in level-0 pixels
    tissue: float  # tissue fraction from the thumbnail mask


@dataclass(frozen=True)
class TileAt:
    """Where a tile was read: its slide (a URI or path, as whoever opens it names it), the slide's version
    (an etag; "" where unknown) and the tile's level-0 top-left corner."""

    slide: str
    x: int
    y: int
    version: str = ""


@dataclass(frozen=True)
class Tile:
    image: npt.NDArray[np.uint8]  # (tile_size, tile_size, 3)
    slide_id: str
    x: int
    y: int
    mpp: float
    tissue: float


def tile_grid(
    slide: Slide,
    *,
    tile_size: int = 224,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
    thumbnail_side: int = 1024,
) -> list[TileSpec]:
    """Non-overlapping tiles of ``tile_size`` px at ``mpp`` whose thumbnail tissue fraction is >= ``min_tissue``."""
    if tile_size <= 0:
        raise ConfigError(f"tile_size must be positive, got {tile_size}")
    if mpp <= 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    extent = max(1, round(tile_size * mpp / slide.require_mpp()[0]))
    thumb, down = slide.thumbnail(thumbnail_side)
    mask = tissue_mask(thumb)
    w0, h0 = slide.dimensions
    specs = []
    for y in range(0, h0 - extent + 1, extent):
        for x in range(0, w0 - extent + 1, extent):
            y0, x0 = int(y / down), int(x / down)
            y1, x1 = max(int((y + extent) / down), y0 + 1), max(int((x + extent) / down), x0 + 1)
            frac = float(mask[y0:y1, x0:x1].mean()) if mask[y0:y1, x0:x1].size else 0.0
            if frac >= min_tissue and frac > 0:
                specs.append(TileSpec(x, y, extent, frac))
    return specs


def iter_tiles(
    slide: Slide,
    specs: list[TileSpec],
    *,
    tile_size: int = 224,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
) -> Iterator[Tile]:
    """Read each tile at ``mpp`` and drop those whose own pixels are mostly background."""
    for spec in specs:
        image = slide.read((spec.x, spec.y), (tile_size, tile_size), mpp, "mpp")
        frac = tissue_fraction(image)
        if frac >= min_tissue:
            yield Tile(image, slide.slide_id, spec.x, spec.y, mpp, round(min(frac, spec.tissue), 4))


class TilingConfig(Frozen):
    """How whole slides become tiles (read lazily, region by region)."""

    tile_px: int = Field(default=224, ge=16, le=4096, description="tile side in pixels at `mpp`")
    mpp: float = Field(default=0.5, gt=0, description="target microns per pixel of a tile")
    min_tissue: float = Field(default=0.5, ge=0, le=1, description="minimum tissue fraction to keep a tile")
    default_mpp: float | None = Field(
        default=None, gt=0, description="pixel size to assume for slides that do not state one (else quarantined)"
    )
    tiles_per_unit: int = Field(default=64, ge=1, description="tiles read by one task")


@dataclass(frozen=True)
class SlideTiles:
    """What the slide recipe prepares: tile positions and a way to read each at the target mpp.

    ``read(x, y)`` returns the RGB tile of ``tiling.tile_px`` pixels at ``tiling.mpp`` whose
    level-0 top-left corner is (x, y). The indexing job reads from the slide; an uploaded
    region is one position whose ``read`` returns the region itself.
    """

    positions: Sequence[tuple[int, int, float]]  # (x, y, tissue fraction from the thumbnail mask)
    read: Callable[[int, int], npt.NDArray[np.uint8]]
    tiling: TilingConfig
    slide_id: str = ""
    min_tissue: float | None = None  # None: the tiling's; an uploaded region is kept whatever it shows

    @classmethod
    def of_slide(cls, slide: Slide, positions: Sequence[tuple[int, int, float]], tiling: TilingConfig) -> SlideTiles:
        t = tiling
        return cls(
            positions,
            lambda x, y: slide.read((x, y), (t.tile_px, t.tile_px), t.mpp, "mpp"),
            tiling,
            slide.slide_id,
        )

    @classmethod
    def of_region(cls, rgb: npt.NDArray[np.uint8], tiling: TilingConfig) -> SlideTiles:
        return cls([(0, 0, 1.0)], lambda x, y: rgb, tiling, min_tissue=0.0)


def plan_units(slide: Slide, tiling: TilingConfig) -> list[list[tuple[int, int, float]]]:
    """The slide's tissue tile positions at the tiling's mpp, in groups of ``tiles_per_unit``."""
    t = tiling
    specs = tile_grid(slide, tile_size=t.tile_px, mpp=t.mpp, min_tissue=t.min_tissue)
    pos = [(s.x, s.y, s.tissue) for s in specs]
    return [pos[i : i + t.tiles_per_unit] for i in range(0, len(pos), t.tiles_per_unit)] or [[]]


def read_moved(
    slide: Slide, x: int, y: int, tiling: TilingConfig, *, dx: float = 0.0, dy: float = 0.0, mpp: float | None = None
) -> npt.NDArray[np.uint8]:
    """The tile at level-0 (``x``, ``y``) read again as a rescan would see it: its centre moved by (``dx``, ``dy``)
    pixels of the tile, read at ``mpp`` (default the tiling's) as ``tiling.tile_px`` pixels around that centre.

    What comes into view is the slide's own tissue, never a mirrored edge; the field of view is kept on the
    slide (shifted inwards at its borders).
    """
    t = tiling
    view_mpp = t.mpp if mpp is None else float(mpp)
    if view_mpp <= 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    base = slide.require_mpp()[0]
    extent = t.tile_px * t.mpp / base  # the tile's side in level-0 pixels
    side = t.tile_px * view_mpp / base  # the view's
    cx, cy = x + extent / 2 + dx * extent / t.tile_px, y + extent / 2 + dy * extent / t.tile_px
    w0, h0 = slide.dimensions
    left = round(min(max(cx - side / 2, 0.0), max(w0 - side, 0.0)))
    top = round(min(max(cy - side / 2, 0.0), max(h0 - side, 0.0)))
    return slide.read((left, top), (t.tile_px, t.tile_px), view_mpp, "mpp")


_SLIDES: OrderedDict[str, Slide] = OrderedDict()


def open_cached_slide(path: Path, tiling: TilingConfig) -> Slide:
    """Slides stay open per worker process (a few at a time), so units of one slide reuse the handle.

    A slide that states no pixel size gets ``tiling.default_mpp``, or raises the reader's own error.
    """
    from medret.io.wsi import open_slide

    key = str(path)
    if key in _SLIDES:
        _SLIDES.move_to_end(key)
        return _SLIDES[key]
    slide = open_slide(path)
    if slide.mpp is None:
        if tiling.default_mpp is None:
            try:
                slide.require_mpp()  # raises the reader's own "no pixel size" error
            finally:
                slide.close()
        mpp = float(tiling.default_mpp or 0.0)
        slide.mpp = (mpp, mpp)
    _SLIDES[key] = slide
    while len(_SLIDES) > 4:
        _SLIDES.popitem(last=False)[1].close()
    return slide
