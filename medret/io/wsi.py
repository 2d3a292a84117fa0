"""Whole-slide images: one interface over OpenSlide, tiffslide and DICOM WSI (pydicom).

Reads speak physical units like TIAToolbox: a level-0 location, an output size and
a resolution with units (``mpp`` or ``level``). The reader picks the coarsest
pyramid level that is at least as fine as asked and resamples from there, so a
whole slide is never loaded into memory.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import (
    ConfigError,
    CorruptFileError,
    EmptyFileError,
    MissingSpacingError,
    ObjectNotFoundError,
    UnsupportedFormatError,
)
from medret.io.base import DEFAULT_PIXEL_BUDGET, check_budget

log = logging.getLogger(__name__)

UNITS = ("mpp", "level")
Region = Callable[[tuple[int, int], int, tuple[int, int]], npt.NDArray[np.uint8]]


@dataclass
class Slide:
    """An open slide. ``read_region`` takes level-0 (x, y), a level and a (w, h) size at that level."""

    path: str
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: tuple[float, float] | None
    objective_power: float | None
    vendor: str | None
    _read: Region = field(repr=False)
    _close: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def slide_id(self) -> str:
        return Path(self.path).name

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_mpp(self) -> tuple[float, float]:
        if self.mpp is None:
            raise MissingSpacingError(
                self.path,
                "the slide does not state its microns per pixel (no mpp in its metadata); "
                "give it explicitly (mpp=..., or --mpp on the command line)",
            )
        return self.mpp

    def level_mpp(self, level: int) -> float:
        return self.require_mpp()[0] * self.level_downsamples[level]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (never upsample when avoidable)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
        if not 0 <= level < self.level_count:
            raise ConfigError(f"level must be in [0, {self.level_count - 1}] for {self.slide_id}, got {level}")
        if size[0] <= 0 or size[1] <= 0:
            raise ConfigError(f"region size must be positive, got {size}")
        try:
            return self._read(location, level, size)
        except (ConfigError, CorruptFileError):
            raise
        except Exception as err:  # backends raise assorted types on damaged tiles
            raise CorruptFileError(
                self.path, f"cannot read region at {location} level {level} size {size} ({type(err).__name__}: {err})"
            ) from err

    def read(
        self,
        location: tuple[int, int],
        size: tuple[int, int],
        resolution: float,
        units: str = "mpp",
    ) -> npt.NDArray[np.uint8]:
        """An RGB (h, w, 3) array of ``size`` (w, h) at ``resolution`` ``units``, top-left at level-0 ``location``."""
        if units not in UNITS:
            raise ConfigError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
        if units == "level":
            return self.read_region(location, int(resolution), size)
        if resolution <= 0:
            raise ConfigError(f"resolution must be positive, got {resolution} {units}")
        downsample = resolution / self.require_mpp()[0]
        level = self.best_level(downsample)
        scale = downsample / self.level_downsamples[level]  # >= 1 unless the target is finer than level 0
        src = (max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale)))
        region = self.read_region(location, level, src)
        return resize_rgb(region, size) if src != size else region

    def thumbnail(self, max_side: int = 1024) -> tuple[npt.NDArray[np.uint8], float]:
        """A thumbnail no larger than ``max_side`` and its downsample relative to level 0."""
        w0, h0 = self.dimensions
        downsample = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        region = self.read_region((0, 0), level, (lw, lh))
        size = (max(1, round(w0 / downsample)), max(1, round(h0 / downsample)))
        return (resize_rgb(region, size) if (lw, lh) != size else region), downsample


def resize_rgb(arr: npt.NDArray[np.uint8], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Antialiased resize of an RGB array to ``size`` = (w, h)."""
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def _rgb(img: Any, background: int = 255) -> npt.NDArray[np.uint8]:
    """RGBA (OpenSlide, transparent outside the scanned area) -> RGB on white."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = (arr[..., :3].astype(np.uint16) * alpha + background * (255 - alpha)) // 255
        return rgb.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _mpp_from(props: Any, prefix: str) -> tuple[float, float] | None:
    try:
        x, y = float(props[f"{prefix}.mpp-x"]), float(props[f"{prefix}.mpp-y"])
    except (KeyError, TypeError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 else None


def _power(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _from_openslide_api(s: Any, path: str, backend: str, read: Region) -> Slide:
    """A :class:`Slide` over any object with OpenSlide's API (OpenSlide itself, tiffslide)."""
    props = s.properties
    return Slide(
        path=path,
        backend=backend,
        level_dimensions=[tuple(d) for d in s.level_dimensions],
        level_downsamples=[float(d) for d in s.level_downsamples],
        mpp=_mpp_from(props, backend),
        objective_power=_power(props.get(f"{backend}.objective-power")),
        vendor=props.get(f"{backend}.vendor"),
        _read=read,
        _close=s.close,
    )


def _open_openslide(path: str) -> Slide:
    import openslide

    s = openslide.OpenSlide(path)
    return _from_openslide_api(s, path, "openslide", lambda loc, level, size: _rgb(s.read_region(loc, level, size)))


def _open_tiffslide(path: str) -> Slide:
    import tiffslide

    s = tiffslide.TiffSlide(path)
    return _from_openslide_api(
        s, path, "tiffslide", lambda loc, level, size: _rgb(s.read_region(loc, level, size, as_array=True))
    )


def _open_dicom(path: str) -> Slide:
    """A single-file DICOM WSI instance (TILED_FULL), decoded frame by frame with pydicom."""
    import pydicom
    from pydicom.pixels.decoders.base import get_decoder

    from medret.io.dicom import WSI_SOP_CLASS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        raise UnsupportedFormatError(path, "a DICOM file, but not a VL Whole Slide Microscopy image")
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    tile_w, tile_h = int(ds.Columns), int(ds.Rows)
    across = math.ceil(width / tile_w)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames < across * math.ceil(height / tile_h):
        raise CorruptFileError(path, f"{frames} frames cannot tile a {width}x{height} matrix in {tile_w}x{tile_h}")
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    cache: dict[int, npt.NDArray[np.uint8]] = {}

    def frame(i: int) -> npt.NDArray[np.uint8]:
        if i not in cache:
            if len(cache) > 64:
                cache.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr, _ = decoder.as_array(ds, index=i)
            cache[i] = _rgb(arr)
        return cache[i]

    def read(loc: tuple[int, int], level: int, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
        x0, y0 = loc
        out = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        for ty in range(max(y0, 0) // tile_h, min(y0 + size[1], height) // tile_h + 1):
            for tx in range(max(x0, 0) // tile_w, min(x0 + size[0], width) // tile_w + 1):
                if tx >= across or ty * tile_h >= height:
                    continue
                tile = frame(ty * across + tx)
                ox, oy = tx * tile_w - x0, ty * tile_h - y0
                sx, sy = max(0, -ox), max(0, -oy)
                dx, dy = max(0, ox), max(0, oy)
                w = min(tile_w - sx, size[0] - dx, width - tx * tile_w - sx)
                h = min(tile_h - sy, size[1] - dy, height - ty * tile_h - sy)
                if w > 0 and h > 0:
                    out[dy : dy + h, dx : dx + w] = tile[sy : sy + h, sx : sx + w]
        return out

    mpp = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    try:
        spacing = shared[0].PixelMeasuresSequence[0].PixelSpacing
        mpp = (float(spacing[1]) * 1000.0, float(spacing[0]) * 1000.0)
    except (AttributeError, IndexError, TypeError, KeyError):
        if ds.get("ImagedVolumeWidth") and ds.get("ImagedVolumeHeight"):
            mpp = (float(ds.ImagedVolumeWidth) * 1000.0 / width, float(ds.ImagedVolumeHeight) * 1000.0 / height)
    return Slide(
        path=path,
        backend="pydicom",
        level_dimensions=[(width, height)],
        level_downsamples=[1.0],
        mpp=mpp,
        objective_power=_power(ds.get("ObjectiveLensPower")),
        vendor=str(ds.get("Manufacturer") or "") or None,
        _read=read,
    )


BACKENDS: dict[str, Callable[[str], Slide]] = {
    "openslide": _open_openslide,
    "tiffslide": _open_tiffslide,
    "pydicom": _open_dicom,
}


def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | tuple[float, float] | None = None,
    backends: tuple[str, ...] = ("openslide", "tiffslide", "pydicom"),
    pixel_budget: int = DEFAULT_PIXEL_BUDGET * 25,
) -> Slide:
    """Open a slide with the first backend that can; ``mpp`` overrides (or supplies) the pixel size."""
    p = str(path)
    if not os.path.isfile(p):
        raise ObjectNotFoundError(f"{p}: no such file")
    if os.path.getsize(p) == 0:
        raise EmptyFileError(p, "file is empty (0 bytes)")
    reasons = []
    for name in backends:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                slide = BACKENDS[name](p)
            break
        except (MissingSpacingError, ConfigError):
            raise
        except Exception as err:  # each backend signals "not mine" differently
            reasons.append(f"{name}: {str(err).splitlines()[0][:120] if str(err) else type(err).__name__}")
    else:
        raise CorruptFileError(p, "no slide reader can open it (" + "; ".join(reasons) + ")")
    w, h = slide.dimensions
    check_budget(p, w * h, pixel_budget, f"{w}x{h} at level 0")
    if mpp is not None:
        mx, my = (mpp, mpp) if isinstance(mpp, int | float) else mpp
        if mx <= 0 or my <= 0:
            raise ConfigError(f"mpp must be positive, got {mpp}")
        slide.mpp = (float(mx), float(my))
    log.debug("opened %s with %s: %s levels", p, slide.backend, slide.level_count)
    return slide
