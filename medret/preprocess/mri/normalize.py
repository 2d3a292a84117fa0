"""Step 5: intensity normalisation inside the brain (z-score, or robust percentile scaling)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, PreprocessError

METHODS = ("zscore", "percentile")


def normalize(
    array: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_],
    *,
    method: str = "zscore",
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> npt.NDArray[np.float32]:
    """Normalise ``array`` with statistics taken inside ``mask``; voxels outside the mask become 0.

    >>> import numpy as np
    >>> a = np.array([0.0, 10.0, 20.0, 30.0], dtype=np.float32)
    >>> [round(float(v), 3) for v in normalize(a, np.array([False, True, True, True]))]
    [0.0, -1.225, 0.0, 1.225]
    """
    if method not in METHODS:
        raise ConfigError(f"normalisation method must be one of {', '.join(METHODS)}, got {method!r}")
    inside = array[mask]
    if inside.size < 2:
        raise PreprocessError("cannot normalise: the brain mask is empty")
    if method == "zscore":
        centre, scale = float(inside.mean()), float(inside.std())
    else:
        lo, hi = np.percentile(inside, percentiles)
        centre, scale = float(lo), float(hi - lo)
    if scale <= 0:
        raise PreprocessError("cannot normalise: intensities inside the brain are constant")
    out = (array - centre) / scale
    if method == "percentile":
        out = np.clip(out, 0.0, 1.0)
    return np.where(mask, out, 0.0).astype(np.float32)
