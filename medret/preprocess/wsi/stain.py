"""Macenko stain normalisation (Macenko et al., ISBI 2009) as a pure function on RGB arrays."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import PreprocessError

#: Reference H&E stain vectors (optical density, columns H and E) and 99th-percentile concentrations.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX = np.array([1.9705, 1.0308])


def optical_density(rgb: npt.NDArray[np.uint8], background: float = 240.0) -> npt.NDArray[np.float64]:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / background)


def stain_vectors(rgb: npt.NDArray[np.uint8], *, beta: float = 0.15, alpha: float = 1.0) -> npt.NDArray[np.float64]:
    """The (3, 2) H and E optical-density vectors of an image, by Macenko's angle percentiles."""
    od = optical_density(rgb)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 100:
        raise PreprocessError(f"too little stained tissue to estimate stains ({len(od)} pixels above OD {beta})")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    return stains * np.sign(stains.sum(axis=0, keepdims=True))


def macenko_normalize(
    rgb: npt.NDArray[np.uint8],
    *,
    target_stains: npt.NDArray[np.float64] = REFERENCE_STAINS,
    target_max: npt.NDArray[np.float64] = REFERENCE_MAX,
    background: float = 240.0,
) -> npt.NDArray[np.uint8]:
    """Map an H&E image onto the reference stain colours and concentration range."""
    stains = stain_vectors(rgb)
    od = optical_density(rgb, background)
    conc, *_ = np.linalg.lstsq(stains, od.T, rcond=None)
    max_c = np.percentile(conc, 99, axis=1)
    conc *= (target_max / np.maximum(max_c, 1e-6))[:, None]
    out = background * np.exp(-(target_stains @ conc))
    return np.clip(out.T.reshape(rgb.shape), 0, 255).astype(np.uint8)
