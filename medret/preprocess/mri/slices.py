"""Slice selection: fixed axial levels in template space, as 2-D encoder inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.volume import Volume

#: Axial levels as fractions of the template brain's inferior-superior extent.
DEFAULT_LEVELS = (0.35, 0.5, 0.65, 0.8)


def axial_levels(template_mask: Volume, levels: Sequence[float] = DEFAULT_LEVELS) -> list[int]:
    """Array indices along z of the template grid at ``levels`` of the brain's z extent."""
    bad = [lv for lv in levels if not 0.0 <= lv <= 1.0]
    if bad:
        raise ConfigError(f"slice levels are fractions of the brain's height in [0, 1], got {bad}")
    zs = np.flatnonzero(template_mask.array.reshape(template_mask.array.shape[0], -1).max(axis=1) > 0.5)
    if zs.size == 0:
        raise ConfigError("the template brain mask is empty")
    lo, hi = int(zs[0]), int(zs[-1])
    return [round(lo + lv * (hi - lo)) for lv in levels]


def select_slices(vol: Volume, indices: Sequence[int]) -> npt.NDArray[np.float32]:
    """(len(indices), y, x) axial planes of a volume already resampled to template space."""
    n = vol.array.shape[0]
    out = [vol.array[min(max(i, 0), n - 1)] for i in indices]
    return np.stack(out).astype(np.float32)
