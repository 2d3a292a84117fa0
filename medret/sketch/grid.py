"""The lesion grid: axial levels through the template brain and a fixed cell grid over each level.

Template space is resampled once onto a 1 mm reference grid (the template's origin and
direction, 1 mm voxels, the same extent), so levels and cells are whole voxels:

- **levels**: slabs of ``level_mm`` axial planes from the lowest brain plane of the template
  upwards, as many as fit inside the brain (every 4 mm by default); a level's height is the
  z of its slab's centre in template millimetres (LPS).
- **box**: the brain's bounding box over all levels in (y, x), padded by ``margin_mm`` and then
  to a multiple of ``grid`` voxels on each axis, centred on the brain's mid-sagittal column so
  that mirroring a mask left-right (``numpy.fliplr``) mirrors it about the midline exactly.
- **cells**: the box split into ``grid`` x ``grid`` equal cells (e.g. 32 x 32 = 1,024 bits).

Images of a level (the template PNG, a sketch, a stored slab) are (y, x) arrays over the box,
one pixel per millimetre, rows anterior to posterior and columns patient-right to patient-left
(radiological view: the patient's left on the image's right).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.volume import Volume


@dataclass(frozen=True)
class LesionGridConfig:
    """What a lesion code means; recorded in the lesion table's metadata.

    ``coverage``: a cell's bit is set when at least this fraction of the cell (times the slab,
    for a stored 3-D lesion) is lesion. A level where the lesion covers no cell that much but at
    least ``min_coverage`` of one keeps its most covered cell, so small lesions are not lost.
    """

    encoder: str = "raster"
    template: str = "robex"
    level_mm: int = 4
    grid: int = 32
    coverage: float = 0.5
    min_coverage: float = 0.1
    margin_mm: int = 4
    labels: tuple[tuple[int, str], ...] = ((1, "lesion"),)

    def __post_init__(self) -> None:
        if self.level_mm < 1:
            raise ConfigError(f"level_mm must be a positive whole number of millimetres, got {self.level_mm}")
        if self.grid < 2 or (self.grid * self.grid) % 64:
            raise ConfigError(f"grid must make a multiple of 64 bits (grid * grid), got grid={self.grid}")
        if not 0 < self.min_coverage <= self.coverage <= 1:
            raise ConfigError(
                f"need 0 < min_coverage <= coverage <= 1, got min_coverage={self.min_coverage}, "
                f"coverage={self.coverage}"
            )
        names = [n for _, n in self.labels]
        if not self.labels or len(set(names)) != len(names) or any(v <= 0 for v, _ in self.labels):
            raise ConfigError(f"labels must map distinct positive values to distinct names, got {self.labels}")

    @property
    def bits(self) -> int:
        return self.grid * self.grid

    @property
    def classes(self) -> list[str]:
        return [n for _, n in self.labels]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = [list(x) for x in self.labels]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LesionGridConfig:
        d = dict(d)
        d["labels"] = tuple((int(v), str(n)) for v, n in d.get("labels", ((1, "lesion"),)))
        return cls(**d)


#: the BraTS label convention (necrotic core 1, edema 2, enhancing 4)
BRATS_LABELS = ((1, "necrotic"), (2, "edema"), (4, "enhancing"))


def reference_grid(template: Volume) -> Volume:
    """An empty 1 mm grid over the template's extent (its origin and direction)."""
    size = [max(1, math.floor(n * s)) for n, s in zip(template.array.shape[::-1], template.spacing, strict=True)]
    return Volume(np.zeros(size[::-1], np.float32), (1.0, 1.0, 1.0), template.origin, template.direction, {})


def resample_to(vol: Volume, ref: Volume, transform: Any = None, *, nearest: bool) -> npt.NDArray[np.float32]:
    """``vol`` on ``ref``'s grid through ``transform`` (reference points -> ``vol`` points; identity if None)."""
    import SimpleITK as sitk

    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(vol.to_sitk(), ref.to_sitk(), transform or sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayFromImage(out), np.float32)


@dataclass(frozen=True)
class TemplateGrid:
    """Levels, box and cells of one template (build with :func:`template_grid`)."""

    config: LesionGridConfig
    ref: Volume  # the 1 mm reference grid (array: the template image on it)
    brain: npt.NDArray[np.bool_]  # the template brain mask on ``ref``
    z0: int  # first plane of level 0
    n_levels: int
    y0: int
    x0: int
    height: int  # box size in voxels (multiples of grid)
    width: int

    @property
    def cell(self) -> tuple[int, int]:
        return self.height // self.config.grid, self.width // self.config.grid

    def check_level(self, level: int) -> int:
        if not 0 <= int(level) < self.n_levels:
            raise ConfigError(
                f"level must be in 0..{self.n_levels - 1} for template {self.config.template!r}, got {level}"
            )
        return int(level)

    def slab(self, level: int) -> slice:
        z = self.z0 + self.check_level(level) * self.config.level_mm
        return slice(z, z + self.config.level_mm)

    def level_mm(self, level: int) -> float:
        """The z (template mm, LPS) of a level's slab centre."""
        s = self.slab(level)
        return float(self.ref.origin[2] + (s.start + s.stop - 1) / 2.0)

    def box(self, planes: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """(..., y, x) planes on the reference grid -> the box (..., height, width)."""
        return planes[..., self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width]

    def pixel_mm(self, rows: npt.ArrayLike, cols: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Box pixel (row, col) -> template (x, y) mm, LPS (the reference grid is axis-aligned 1 mm)."""
        ox, oy, _ = self.ref.origin
        return ox + self.x0 + np.asarray(cols, float), oy + self.y0 + np.asarray(rows, float)

    def mm_pixel(self, x_mm: npt.ArrayLike, y_mm: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Template (x, y) mm, LPS -> box pixel (row, col), fractional."""
        ox, oy, _ = self.ref.origin
        return np.asarray(y_mm, float) - oy - self.y0, np.asarray(x_mm, float) - ox - self.x0

    def template_slice(self, level: int) -> npt.NDArray[np.float32]:
        """The template image over the box, averaged over the level's slab."""
        return np.asarray(self.box(self.ref.array[self.slab(level)]).mean(axis=0), np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "template": self.config.template,
            "grid": self.config.grid,
            "level_mm": self.config.level_mm,
            "box_px": [self.height, self.width],
            "cell_mm": list(self.cell),
            "levels": [{"level": i, "z_mm": round(self.level_mm(i), 2)} for i in range(self.n_levels)],
            "classes": self.config.classes,
        }


def _axis_direction_ok(direction: tuple[float, ...]) -> bool:
    return bool(np.allclose(np.abs(np.asarray(direction).reshape(3, 3)), np.eye(3), atol=1e-3))


def template_grid(image: Volume, mask: Volume, config: LesionGridConfig | None = None) -> TemplateGrid:
    """The grid of a template (image and brain mask, already reoriented to LPS as the recipe loads them)."""
    config = config or LesionGridConfig()
    if not _axis_direction_ok(image.direction) or image.orientation != "LPS":
        raise ConfigError(
            f"the template must be axis-aligned LPS (load it with load_template), got {image.orientation}"
        )
    ref = reference_grid(image)
    img = resample_to(image, ref, nearest=False)
    brain = resample_to(mask, ref, nearest=True) > 0.5
    if not brain.any():
        raise ConfigError(f"the brain mask of template {config.template!r} is empty")
    zs, ys, xs = (np.flatnonzero(brain.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    n_levels = (int(zs[-1]) - int(zs[0]) + 1) // config.level_mm
    g, m = config.grid, config.margin_mm
    ny, nx = brain.shape[1:]
    height = g * math.ceil((ys[-1] - ys[0] + 1 + 2 * m) / g)
    centre = (int(xs[0]) + int(xs[-1]) + 1) / 2.0
    half = g * math.ceil((max(centre - xs[0], xs[-1] + 1 - centre) + m) / g)
    width = 2 * half
    y0 = int(ys[0]) - m - (height - (int(ys[-1]) - int(ys[0]) + 1 + 2 * m)) // 2
    x0 = round(centre) - half
    pad = max(0, -y0, -x0, y0 + height - ny, x0 + width - nx)
    if pad:  # the box reaches past the template's field of view: pad the reference grid
        img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        brain = np.pad(brain, ((0, 0), (pad, pad), (pad, pad)))
        origin = (ref.origin[0] - pad, ref.origin[1] - pad, ref.origin[2])
        y0, x0 = y0 + pad, x0 + pad
    else:
        origin = ref.origin
    ref = Volume(img, ref.spacing, origin, ref.direction, {"template": config.template})
    return TemplateGrid(config, ref, brain, int(zs[0]), n_levels, y0, x0, height, width)
