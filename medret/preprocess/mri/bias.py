"""Step 4: N4 bias-field correction (SimpleITK), fitted on a shrunken image for speed.

The field is smooth, so it is estimated on the volume shrunk by ``shrink`` and then
evaluated at full resolution (``GetLogBiasFieldAsImage``) and divided out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.volume import Volume


def n4_correct(
    vol: Volume,
    mask: npt.NDArray[np.bool_] | None = None,
    *,
    shrink: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    control_points: int = 4,
) -> tuple[Volume, npt.NDArray[np.float32]]:
    """Return the corrected volume and the multiplicative bias field that was removed."""
    import SimpleITK as sitk

    if shrink < 1:
        raise ConfigError(f"shrink must be >= 1, got {shrink}")
    img = vol.to_sitk()
    floor = float(np.min(vol.array))
    positive = sitk.Cast(img - floor + 1.0, sitk.sitkFloat32)  # N4 works on the log of positive values
    if mask is None:
        mask_img = sitk.OtsuThreshold(positive, 0, 1, 200)
    else:
        mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
        mask_img.CopyInformation(img)
    factors = [min(shrink, max(1, n // 16)) for n in img.GetSize()]  # keep >= 16 voxels per axis
    small = sitk.Shrink(positive, factors)
    small_mask = sitk.Shrink(mask_img, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.SetNumberOfControlPoints([control_points] * 3)
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(positive)).astype(np.float32)
    field = np.exp(log_field)
    corrected = (vol.array - floor + 1.0) / field + floor - 1.0
    return Volume(corrected.astype(np.float32), vol.spacing, vol.origin, vol.direction, vol.meta), field
