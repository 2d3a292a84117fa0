"""Step 3: skull stripping by carrying the template's brain mask back into the subject.

The mask is resampled through the inverse of the registration (template -> subject
points), then optionally refined on the subject's own intensities: voxels darker
than the background/tissue threshold inside the mask (CSF gaps between brain and
skull) are dropped, and the largest connected component is kept with its holes filled.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.io.volume import Volume
from medret.preprocess.mri.register import Registration


def carry_mask(mask: Volume, subject: Volume, reg: Registration) -> npt.NDArray[np.bool_]:
    """The template mask on the subject's grid (linear interpolation, then > 0.5)."""
    import SimpleITK as sitk

    warped = sitk.Resample(
        mask.to_sitk(), subject.to_sitk(), reg.transform.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(warped) > 0.5


def refine(mask: npt.NDArray[np.bool_], vol: Volume, *, dark_quantile: float = 0.02) -> npt.NDArray[np.bool_]:
    """Drop the darkest voxels inside the mask, keep the largest component, fill holes slice by slice."""
    from scipy import ndimage

    if not mask.any():
        return mask
    inside = vol.array[mask]
    cut = float(np.quantile(inside, dark_quantile))
    keep = mask & (vol.array > cut)
    labels, n = ndimage.label(keep)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = labels == int(np.argmax(sizes))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in keep])
    return np.asarray(filled, dtype=bool)


def skull_strip(
    subject: Volume, template_mask: Volume, reg: Registration, *, refine_mask: bool = True
) -> npt.NDArray[np.bool_]:
    """A boolean brain mask on the subject's grid, array-aligned with ``subject.array``."""
    mask = carry_mask(template_mask, subject, reg)
    return refine(mask, subject) if refine_mask else mask


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Sørensen-Dice overlap of two boolean masks.

    >>> import numpy as np
    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    0.6666666666666666
    """
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0
