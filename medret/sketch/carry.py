"""Carry a lesion label volume into template space through its image's registration.

The labels never get a registration of their own: they are reoriented like the image was and
resampled (nearest neighbour) through the very transform the image's recipe estimated
(:attr:`BrainResult.registration`), onto the lesion grid's 1 mm reference grid.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import DataError
from medret.io.volume import Volume, VolumeGrid
from medret.preprocess.mri.orient import reorient
from medret.preprocess.mri.register import Registration
from medret.sketch.grid import LesionGridConfig, TemplateGrid, resample_to


def label_values(labels: Volume, config: LesionGridConfig, *, name: str) -> npt.NDArray[np.int16]:
    """The label array mapped to the config's label values; a mask with one non-zero value maps to a
    single-class config's label (e.g. a 0/255 mask)."""
    arr = np.asarray(labels.array)
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: the lesion mask has NaN or infinite voxels")
    values = np.unique(arr[arr != 0])
    if values.size == 0:
        raise DataError(f"{name}: the lesion mask marks no lesion (every voxel is 0)")
    known = [v for v, _ in config.labels]
    if len(known) == 1 and values.size == 1:
        return np.where(arr != 0, known[0], 0).astype(np.int16)
    unknown = [float(v) for v in values if float(v) not in known]
    if unknown:
        raise DataError(
            f"{name}: lesion mask values {unknown[:8]} are not among the configured labels "
            f"{dict(config.labels)}; set LesionGridConfig.labels"
        )
    return arr.astype(np.int16)


def check_same_grid(labels: Volume, image: Volume | VolumeGrid, *, name: str) -> None:
    """The mask must lie on its image's voxel grid (after both were reoriented)."""
    image = image.grid if isinstance(image, Volume) else image
    same = (
        labels.array.shape == tuple(image.shape)
        and np.allclose(labels.spacing, image.spacing, rtol=1e-3)
        and np.allclose(labels.origin, image.origin, atol=0.05 * min(image.spacing))
        and np.allclose(labels.direction, image.direction, atol=1e-3)
    )
    if not same:
        raise DataError(
            f"{name}: the lesion mask's grid (shape {labels.array.shape[::-1]}, spacing "
            f"{tuple(round(s, 3) for s in labels.spacing)}, origin {tuple(round(o, 1) for o in labels.origin)}) "
            f"differs from its image's (shape {tuple(image.shape)[::-1]}, spacing "
            f"{tuple(round(s, 3) for s in image.spacing)}, origin {tuple(round(o, 1) for o in image.origin)}); "
            "a mask must be drawn on the image it belongs to"
        )


def carry_lesion(
    labels: Volume,
    subject: Volume | VolumeGrid,
    registration: Registration,
    tg: TemplateGrid,
    *,
    orientation: str = "LPS",
    name: str = "mask",
) -> npt.NDArray[np.int16]:
    """Label volume on the subject's original grid -> labels on ``tg.ref`` (template space, 1 mm).

    ``subject`` and ``registration`` are the recipe's (``BrainResult.subject``,
    ``BrainResult.registration``): the reoriented image (or just its grid, as the indexing job
    recorded it) and the transform it was resampled with.
    """
    values = label_values(labels, tg.config, name=name)
    oriented = reorient(
        Volume(values.astype(np.float32), labels.spacing, labels.origin, labels.direction, {}), orientation
    )
    check_same_grid(oriented, subject, name=name)
    out = resample_to(oriented, tg.ref, registration.transform, nearest=True)
    return np.rint(out).astype(np.int16)
